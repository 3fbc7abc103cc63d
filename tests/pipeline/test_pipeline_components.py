"""Components called directly (their python_func, no kfp runner): ingest, validate_data with a
good and a corrupted input, stop_run; and the conventions every component follows."""
from __future__ import annotations

import inspect
import json

import pyarrow as pa
import pytest
from kfp.dsl import HTML, Dataset, Metrics

from unipinrec import format as fmt


@pytest.fixture(scope="module")
def raw(tmp_path_factory, tiny_config_text):
    from components import ingest

    out = Dataset(uri=str(tmp_path_factory.mktemp("ingest") / "raw"))
    ingest.python_func(raw=out, config_yaml=tiny_config_text, num_users=30)
    return out


def test_ingest_writes_a_raw_dataset(raw):
    meta = fmt.read_meta(raw.path)
    assert meta["source"] == "synthetic" and meta["num_users"] == 30  # the size parameter beat the config
    assert raw.metadata["num_events"] == meta["num_events"] == fmt.count_rows(f"{raw.path}/events") > 0


def test_ingest_copies_a_raw_folder_and_names_bad_parameters(raw, tmp_path, tiny_config_text):
    from components import ingest
    from unipinrec.steps import StepError

    copy = Dataset(uri=str(tmp_path / "copy"))
    ingest.python_func(raw=copy, config_yaml=tiny_config_text, source="raw", data_path=raw.path)
    assert fmt.count_rows(f"{copy.path}/events") == raw.metadata["num_events"]
    with pytest.raises(StepError, match="source: 'kafka'"):
        ingest.python_func(raw=Dataset(uri=str(tmp_path / "x")), config_yaml=tiny_config_text, source="kafka")
    with pytest.raises(StepError, match="data_path"):
        ingest.python_func(raw=Dataset(uri=str(tmp_path / "y")), config_yaml=tiny_config_text, source="movielens-1m")


def _validate(raw_path, out):
    from components import validate_data

    report, results = HTML(uri=str(out / "report.html")), Metrics(uri=str(out / "results"))
    out.mkdir()
    res = validate_data.python_func(raw=Dataset(uri=str(raw_path)), report=report, results=results)
    return res, (out / "report.html").read_text(), json.loads((out / "results").read_text())


def test_validate_data_passes_good_data(raw, tmp_path):
    res, page, results = _validate(raw.path, tmp_path / "good")
    assert res.passed is True and "FAIL" not in res.summary
    assert "PASSED" in page and results["failed_expectations"] == 0 and results["rows_events"] > 0


def test_validate_data_reports_failed_expectations(raw, tmp_path):
    import shutil

    bad = tmp_path / "bad_raw"
    shutil.copytree(raw.path, bad)
    items = fmt.read_sharded(bad / "items")
    dup = pa.concat_tables([items, items.slice(0, 3)])  # three duplicated item ids
    fmt.write_sharded(bad / "items", dup, dup.schema)
    res, page, results = _validate(bad, tmp_path / "bad")
    assert res.passed is False
    assert "FAIL item_id_unique" in res.summary
    assert "FAILED" in page and "item_id_unique" in page
    assert results["failed_expectations"] >= 1


def test_stop_run_fails_with_the_reason():
    from components import stop_run

    with pytest.raises(RuntimeError, match="(?s)nothing was trained or deployed.*FAIL action_in_vocabulary"):
        stop_run.python_func(reason="contract 'events': FAILED\n  FAIL action_in_vocabulary")


def test_every_component_documents_its_parameters_and_imports_inside():
    import components
    from components._image import PROJECT_IMAGE

    assert PROJECT_IMAGE.count(":") == 1 and not PROJECT_IMAGE.endswith(":latest")
    for comp in components.ALL:
        func = comp.python_func
        doc = inspect.getdoc(func) or ""
        assert "Args:" in doc, comp.name
        for name in inspect.signature(func).parameters:
            assert f"{name}:" in doc, f"{comp.name}: parameter {name} is not documented"
        src = inspect.getsource(func)
        assert "from unipinrec" in src or comp.name == "stop-run"  # library imports live in the body
        container = comp.component_spec.implementation.container
        assert container.image == PROJECT_IMAGE
        assert "pip install" not in " ".join(container.command or [])

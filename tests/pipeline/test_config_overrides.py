"""The pipeline's `config_overrides` parameter: carried by the compiled pipeline to every step that
reads the config, applied by the components through the strict loader (a bad key names itself)."""
from __future__ import annotations

import pytest
from kfp.dsl import Dataset

from unipinrec import format as fmt

READS_CONFIG = {"ingest", "build-features", "build-examples", "train"}


def test_the_compiled_pipeline_passes_config_overrides_to_every_step_that_reads_the_config(local_ir):
    doc, tasks = local_ir.doc, local_ir.tasks
    root = doc["root"]["inputDefinitions"]["parameters"]
    assert root["config_overrides"]["parameterType"] == "STRING" and root["config_overrides"]["defaultValue"] == ""
    for name in READS_CONFIG:
        comp = doc["components"][tasks[name]["componentRef"]["name"]]
        assert "config_overrides" in comp["inputDefinitions"]["parameters"], name
        source = tasks[name]["inputs"]["parameters"]["config_overrides"]["componentInputParameter"]
        assert source in ("config_overrides", "pipelinechannel--config_overrides"), (name, source)
    others = {n for n, t in tasks.items() if not n.startswith("condition")
              and "config_overrides" in t.get("inputs", {}).get("parameters", {})}
    assert others == READS_CONFIG


def test_components_apply_the_overrides(tmp_path, tiny_config_text):
    from components import ingest
    from unipinrec import steps
    from unipinrec.config import ConfigError

    out = Dataset(uri=str(tmp_path / "raw"))
    ingest.python_func(raw=out, config_yaml=tiny_config_text,
                       config_overrides="data.synthetic_users=25; data.synthetic_items=40\ndata.synthetic_seed=7")
    meta = fmt.read_meta(out.path)
    assert (meta["num_users"], meta["num_items"], meta["seed"]) == (25, 40, 7)
    with pytest.raises(ConfigError, match="^data.num_users: renamed to data.synthetic_users"):
        ingest.python_func(raw=Dataset(uri=str(tmp_path / "x")), config_yaml=tiny_config_text,
                           config_overrides="data.num_users=25")
    assert not (tmp_path / "x").exists()
    # the size parameter still beats the config and its overrides; no overrides = the text unchanged
    cfg = steps.parse_config(tiny_config_text, overrides=["data.synthetic_users=25"], num_users=30, epochs=0.5)
    assert (cfg.data.synthetic_users, cfg.train.epochs, cfg.train.max_steps) == (30, 0.5, 0)
    assert steps.with_overrides(tiny_config_text, " ; ") is tiny_config_text
    text = steps.with_overrides(tiny_config_text, "model.dropout=0.25")
    assert steps.parse_config(text).model.dropout == 0.25

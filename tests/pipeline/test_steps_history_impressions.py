"""The pipeline's Feast steps follow `data.history_impressions`: the store, the examples built
from it and their meta all hold impressions (action 0) in the history when the config says so,
and a store built with the other rule is refused."""
from __future__ import annotations

import pytest
import yaml

from unipinrec import format as fmt
from unipinrec import steps
from unipinrec.features import FeatureStoreError, read_feature_meta

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _with_impressions(config_text: str, on: bool) -> str:
    data = yaml.safe_load(config_text)
    data["data"]["history_impressions"] = on
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture(scope="module")
def raw(tmp_path_factory, tiny_config_text):
    out = tmp_path_factory.mktemp("steps-imp") / "raw"
    steps.ingest(out, source="synthetic", config_yaml=tiny_config_text, num_users=30)
    return out


def test_config_with_history_impressions_gives_examples_with_impressions(raw, tmp_path, tiny_config_text):
    config = _with_impressions(tiny_config_text, True)
    meta = steps.build_features(raw, tmp_path / "repo", config_yaml=config)
    assert meta["sources"]["history_impressions"] is True
    assert read_feature_meta(tmp_path / "repo")["sources"]["history_impressions"] is True
    out = steps.build_examples(raw, tmp_path / "repo", tmp_path / "ex", config_yaml=config,
                               report_dir=tmp_path / "report")
    assert out["contract_passed"], out["contract_failed"]
    assert out["history_differs_from_builder"] == 0
    ex_meta = fmt.read_meta(tmp_path / "ex")
    assert ex_meta["history_impressions"] is True and ex_meta["history_source"] == "feast:unipinrec_v1"
    histories = fmt.read_sharded(tmp_path / "ex" / "train").column("history").to_pylist()
    actions = [a["action"] for h in histories for a in h]
    assert actions.count(0) > 0 and any(a != 0 for a in actions)


def test_default_config_keeps_impressions_out_and_a_mismatched_store_is_refused(raw, tmp_path, tiny_config_text):
    plain = _with_impressions(tiny_config_text, False)
    steps.build_features(raw, tmp_path / "repo", config_yaml=plain)
    out = steps.build_examples(raw, tmp_path / "repo", tmp_path / "ex", config_yaml=plain)
    assert out["history_differs_from_builder"] == 0
    assert fmt.read_meta(tmp_path / "ex")["history_impressions"] is False
    histories = fmt.read_sharded(tmp_path / "ex" / "train").column("history").to_pylist()
    assert histories and all(a["action"] != 0 for h in histories for a in h)
    # examples wanting impressions from a store built without them
    with pytest.raises(FeatureStoreError, match="history_impressions=False.*history_impressions=True"):
        steps.build_examples(raw, tmp_path / "repo", tmp_path / "ex2", config_yaml=_with_impressions(tiny_config_text, True))

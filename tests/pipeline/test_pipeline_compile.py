"""The compiled pipeline: valid IR YAML that kfp loads back, naming every component; the
cluster settings; the recurring-run request; submit/schedule (unipinrec.kfp_client, and the CLI
that compiles first) through a stand-in kfp client."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

EXPECTED = {"ingest", "validate-data", "stop-run", "build-features", "bucket-ids", "build-examples", "merge-examples",
            "train", "evaluate", "gate", "build-index", "package", "deploy"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from pipelines.run import compile_pipeline

    d = tmp_path_factory.mktemp("compiled")
    return {"local": compile_pipeline(d / "local.yaml"),
            "cluster": compile_pipeline(d / "cluster.yaml", cluster=True, gpus=1, image="example.org/up:1.2.3")}


@pytest.mark.parametrize("target", ["local", "cluster"])
def test_yaml_loads_back_in_kfp_and_names_every_component(compiled, target):
    from kfp import components

    from pipelines.run import component_names

    path = compiled[target]
    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "unipinrec"
    spec = loaded.pipeline_spec
    assert {n.removeprefix("comp-") for n, c in spec.components.items() if c.executor_label} == EXPECTED
    assert set(component_names(path)) == EXPECTED
    assert {"config_yaml", "source", "num_users", "seed", "gate_tolerance", "deploy_dir"} <= set(
        loaded.component_spec.inputs)


def _condition_of(doc: dict, task: str) -> str:
    """The trigger condition of the DAG task that (transitively) holds `task`."""
    comps = doc["components"]
    holder = next(n for n, c in comps.items() if task in c.get("dag", {}).get("tasks", {}))
    for c in [doc["root"], *comps.values()]:
        for t in c.get("dag", {}).get("tasks", {}).values():
            if t.get("componentRef", {}).get("name") == holder:
                return t.get("triggerPolicy", {}).get("condition", "")
    raise AssertionError(f"no task runs {holder}")


def test_the_run_stops_before_training_when_validation_fails(compiled):
    doc = yaml.safe_load(compiled["local"].read_text())
    top = set(doc["root"]["dag"]["tasks"])
    assert {"ingest", "validate-data"} <= top and not {"train", "deploy", "stop-run"} & top
    assert _condition_of(doc, "train") == "inputs.parameter_values['pipelinechannel--validate-data-passed'] == true"
    assert _condition_of(doc, "stop-run").startswith("!(") and "validate-data-passed" in _condition_of(doc, "stop-run")
    assert _condition_of(doc, "deploy") == "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    assert _condition_of(doc, "build-index") == _condition_of(doc, "deploy")


def test_caching_is_off_only_for_steps_with_side_effects(local_ir):
    caching = {n: t.get("cachingOptions", {}).get("enableCache", False) for n, t in local_ir.tasks.items()
               if not n.startswith(("condition", "for-loop"))}
    assert {n for n, on in caching.items() if not on} == {"gate", "deploy", "stop-run"}


def test_every_step_runs_on_the_one_project_image_without_installs(compiled):
    from components._image import PROJECT_IMAGE

    for target, image in (("local", PROJECT_IMAGE), ("cluster", "example.org/up:1.2.3")):
        doc = next(yaml.safe_load_all(compiled[target].read_text()))
        executors = doc["deploymentSpec"]["executors"]
        assert len(executors) == len(EXPECTED)
        for ex in executors.values():
            c = ex["container"]
            assert c["image"] == image
            assert "pip install" not in " ".join(c["command"] + c.get("args", []))


def test_cluster_variant_mounts_the_registry_and_asks_for_a_gpu(compiled):
    text = compiled["cluster"].read_text()
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == 2  # the pipeline spec and the kubernetes platform spec
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = {n for n, e in platform.items() if e.get("pvcMount")}
    assert mounted == {"exec-build-features", "exec-build-examples", "exec-train", "exec-gate", "exec-deploy"}
    train = docs[0]["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert train["accelerator"]["resourceCount"] == "1"
    root = docs[0]["root"]["inputDefinitions"]["parameters"]
    assert root["deploy_mode"]["defaultValue"] == "kubernetes"
    assert root["feature_env"]["defaultValue"] == "cluster"


def test_cluster_steps_carry_the_labels_the_network_policies_admit(compiled):
    """The feature steps reach Redis and the feature server, the deploy step the serving Service:
    each pod carries the label those NetworkPolicies select, and no other step gets one."""
    from pathlib import Path

    platform = list(yaml.safe_load_all(compiled["cluster"].read_text()))[1]["platforms"]["kubernetes"]
    labels = {n: (e.get("podMetadata") or {}).get("labels", {}) for n, e in platform["deploymentSpec"]["executors"].items()}
    root = Path(__file__).parents[2] / "manifests"

    def admitted(path: str, policy: str) -> list[dict]:
        doc = next(d for d in yaml.safe_load_all((root / path).read_text()) if d["metadata"]["name"] == policy)
        return [p["podSelector"]["matchLabels"] for rule in doc["spec"]["ingress"] for p in rule["from"]
                if "podSelector" in p]

    def admits(selectors: list[dict], pod: dict) -> bool:
        return any(sel and all(pod.get(k) == v for k, v in sel.items()) for sel in selectors)

    for step in ("exec-build-features", "exec-build-examples"):
        assert admits(admitted("feast/networkpolicy.yaml", "feast-redis"), labels[step])
        assert admits(admitted("feast/networkpolicy.yaml", "feast-feature-server"), labels[step])
    assert admits(admitted("base/networkpolicy.yaml", "unipinrec-serving"), labels["exec-deploy"])
    assert not admits(admitted("base/networkpolicy.yaml", "unipinrec-serving"), labels["exec-build-features"])
    assert {n for n, got in labels.items() if got} == {"exec-build-features", "exec-build-examples", "exec-deploy"}


def test_recurring_run_uses_the_latest_version_one_at_a_time():
    from unipinrec.kfp_client import recurring_run_body

    body = recurring_run_body("exp-1", "pipe-1", "0 3 * * *", {"seed": 1})
    assert body.max_concurrency == 1 and body.no_catchup is True
    assert body.pipeline_version_reference.pipeline_id == "pipe-1"
    assert body.pipeline_version_reference.pipeline_version_id is None  # = latest, resolved per run
    assert body.trigger.cron_schedule.cron == "0 0 3 * * *"
    assert body.runtime_config.parameters == {"seed": 1}
    with pytest.raises(ValueError, match="cron"):
        recurring_run_body("e", "p", "daily", {})


class FakeClient:
    """Records the calls `submit` and `schedule` make on a kfp.Client."""

    def __init__(self, existing_pipeline=None):
        self.calls = []
        self.existing = existing_pipeline
        self._recurring_run_api = SimpleNamespace(recurring_run_service_create_recurring_run=self._create_rr)

    def run_pipeline(self, experiment_id, job_name, pipeline_package_path=None, **kw):
        self.calls.append(("run", pipeline_package_path, {"experiment_id": experiment_id, **kw}))
        assert next(yaml.safe_load_all(open(pipeline_package_path)))["pipelineInfo"]["name"] == "unipinrec"
        return SimpleNamespace(run_id="run-1")

    def get_experiment(self, experiment_name=None, namespace=None):
        raise ValueError(f"No experiment is found with name {experiment_name}.")

    def get_pipeline_id(self, name):
        self.calls.append(("get_pipeline_id", name))
        return self.existing

    def upload_pipeline(self, path, pipeline_name, description):
        self.calls.append(("upload_pipeline", pipeline_name))
        return SimpleNamespace(pipeline_id="pipe-new")

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id):
        self.calls.append(("upload_version", pipeline_id))
        return SimpleNamespace(pipeline_version_id="ver-2")

    def create_experiment(self, name, namespace=None):
        self.calls.append(("create_experiment", name))
        return SimpleNamespace(experiment_id=f"exp-{name}")

    def _create_rr(self, recurring_run):
        self.calls.append(("recurring_run", recurring_run))
        return SimpleNamespace(recurring_run_id="rr-1")


def test_submit_and_schedule_through_a_kfp_client(compiled):
    from unipinrec.kfp_client import RunRequest, schedule, submit_run

    c = FakeClient()
    assert submit_run(c, RunRequest(package_path=str(compiled["cluster"]), params={"seed": 3})) == "run-1"
    assert c.calls[-1][2]["params"] == {"seed": 3} and c.calls[-1][2]["experiment_id"] == "exp-unipinrec"

    c = FakeClient(existing_pipeline="pipe-old")
    out = schedule(c, compiled["cluster"], "0 3 * * *", {})
    kinds = [k[0] for k in c.calls]
    assert kinds == ["get_pipeline_id", "upload_version", "create_experiment", "recurring_run"]  # a new version
    rr = c.calls[-1][1]
    assert rr.pipeline_version_reference.pipeline_id == "pipe-old"
    assert rr.pipeline_version_reference.pipeline_version_id is None and rr.max_concurrency == 1
    assert out["recurring_run_id"] == "rr-1" and out["pipeline_version"] == "latest"

    c = FakeClient(existing_pipeline=None)
    schedule(c, compiled["cluster"], "0 3 * * *", {})
    assert [k[0] for k in c.calls][:3] == ["get_pipeline_id", "upload_pipeline", "upload_version"]


def test_cli_submit_compiles_the_cluster_pipeline_and_submits_it(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import unipinrec.kfp_client as kfp_client
    from unipinrec.cli import app

    c = FakeClient()
    monkeypatch.setattr(kfp_client, "make_client", lambda host, namespace=None, existing_token=None: c)
    r = CliRunner().invoke(app, ["pipeline", "submit", "--host", "http://127.0.0.1:9", "--param", "seed=4",
                                 "--run-name", "r1"])
    assert r.exit_code == 0 and "submitted run run-1" in r.output, r.output
    (_, path, kw), = [call for call in c.calls if call[0] == "run"]  # the package was read during the call
    assert kw["params"] == {"seed": 4} and kw["enable_caching"] is None
    r = CliRunner().invoke(app, ["pipeline", "submit", "--package", str(tmp_path / "x.yaml"), "--pipeline-name", "p"])
    assert r.exit_code == 1 and "not both" in r.output


def test_cli_compile_and_bad_options(tmp_path):
    from typer.testing import CliRunner

    from unipinrec.cli import app

    r = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(tmp_path / "p.yaml")])
    assert r.exit_code == 0, r.output
    assert "13 components" in r.output and (tmp_path / "p.yaml").exists()
    r = CliRunner().invoke(app, ["pipeline", "compile", "--target", "moon", "--out", str(tmp_path / "q.yaml")])
    assert r.exit_code == 1 and "--target" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n")
    r = CliRunner().invoke(app, ["pipeline", "run", "--local", "--config", str(bad)])
    assert r.exit_code == 1 and "train.lr" in r.output
    r = CliRunner().invoke(app, ["pipeline", "run"])
    assert r.exit_code == 1 and "--local" in r.output
    r = CliRunner().invoke(app, ["pipeline", "run", "--local", "--example-buckets", "0"])
    assert r.exit_code == 1 and "--example-buckets must be >= 1" in r.output
    r = CliRunner().invoke(app, ["pipeline", "run", "--local", "--epochs", "-1"])
    assert r.exit_code == 1 and "--epochs must be >= 0" in r.output
    r = CliRunner().invoke(app, ["pipeline", "run", "--local", "--source", "moon"])
    assert r.exit_code == 1 and "--source: 'moon'" in r.output
    r = CliRunner().invoke(app, ["pipeline", "schedule", "--host", "http://127.0.0.1:9", "--cron", "daily"])
    assert r.exit_code == 1 and "cron" in r.output

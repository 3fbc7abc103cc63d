"""The local deploy step against a real TorchServe (token auth on): a new model version is
registered, made the default and the old one unregistered while requests keep coming; none
is dropped, and the server ends up with only the new version."""
from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

if shutil.which("java") is None:
    pytest.skip("TorchServe needs Java (17)", allow_module_level=True)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NUM_ITEMS, L = 200, 16


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    from unipinrec.index import build_index_for_model
    from unipinrec.serving.synthetic import make_model_dir
    from unipinrec.serving.torchserve import build_archive

    root = tmp_path_factory.mktemp("hot-swap")
    out = {}
    for name, seed in (("v1", 0), ("v2", 1)):
        version = make_model_dir(root / name, num_items=NUM_ITEMS, max_history=L, seed=seed)
        build_index_for_model(root / name, root / f"{name}-index", num_queries=50)
        mar = build_archive(root / name, root / f"{name}-index", root / f"{name}-store")
        out[name] = (version, root / name, mar)
    assert out["v1"][0] != out["v2"][0]
    return root, out


def test_deploy_hot_swaps_without_dropping_requests(archives):
    from unipinrec import release
    from unipinrec.deployment_record import DeploymentRecord
    from unipinrec.serving.synthetic import random_history
    from unipinrec.serving.torchserve import free_port

    root, a = archives
    deploy_dir = root / "deploy"
    release.deploy_local(a["v1"][2], a["v1"][1], deploy_dir)
    info = release.serve_deployed(deploy_dir, ports=(free_port(), free_port(), free_port()), token_auth=True,
                                  timeout_s=240)
    try:
        assert info["token_auth"] is True
        per_thread: list[list[tuple[int, str | None]]] = [[], []]
        stop = threading.Event()
        rng = np.random.default_rng(0)

        def client(seen):
            while not stop.is_set():
                body = {"user_id": 7, "history": random_history(rng, 12, NUM_ITEMS), "k": 5}
                status, out, _ = release.recommend(deploy_dir, body)
                seen.append((status, out.get("model_version") if isinstance(out, dict) else str(out)[:200]))

        threads = [threading.Thread(target=client, args=(seen,)) for seen in per_thread]
        for t in threads:
            t.start()
        time.sleep(1.0)
        outcome = release.deploy_local(a["v2"][2], a["v2"][1], deploy_dir)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)

        assert outcome.hot_swapped and outcome.previous_version == a["v1"][0]
        for seen in per_thread:
            assert seen and all(status == 200 for status, _ in seen), [s for s in seen if s[0] != 200][:5]
            versions = [v for _, v in seen]
            assert versions[0] == a["v1"][0] and versions[-1] == a["v2"][0]
            first_new = versions.index(a["v2"][0])
            assert set(versions[first_new:]) == {a["v2"][0]}  # once a client sees v2, never v1 again
        server = release.running_server(deploy_dir / "server")
        assert [v["modelVersion"] for v in release.versions(server)] == [a["v2"][0]]
        record = DeploymentRecord(deploy_dir)
        assert record.current()["model_version"] == a["v2"][0] and record.current()["previous"] == a["v1"][0]
        assert record.last("deploy")["hot_swapped"] is True
    finally:
        release.stop_deployed(deploy_dir)
    assert release.running_server(deploy_dir / "server") is None

"""A real TorchServe (Java frontend + Python worker) serving tiny packaged models over HTTP.

Started once for this module on free loopback ports, always stopped. Token auth is off here
only: this is a local test server (cluster manifests keep it on).
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

requests = pytest.importorskip("requests")
if shutil.which("java") is None:
    pytest.skip("TorchServe needs Java (17)", allow_module_level=True)

from hypothesis import HealthCheck, given, settings  # noqa: E402
import shared_bodies  # noqa: E402  (tests/serving/shared_bodies.py)
from shared_bodies import ARCHIVES, BAD, JSON, L, body, local_engine  # noqa: E402

from unipinrec.serving import torchserve as ts  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("torchserve")
    store = root / "store"
    ts.build_archive(tiny.unified, tiny.unified_index, store)
    ts.build_archive(tiny.unified, tiny.unified_index, store, name="unipinrec_recompute", engine={"share_kv": False})
    ts.build_archive(tiny.retrieval, tiny.retrieval_index, store, name="unipinrec_baseline", ranking_dir=tiny.ranking)
    ports = (ts.free_port(), ts.free_port(), ts.free_port())
    info = ts.start(store, root / "run", ports=ports, token_auth=False, timeout_s=240)
    try:
        yield info
    finally:
        ts.stop(root / "run")


@pytest.fixture(scope="module")
def http():
    with requests.Session() as s:
        yield s


def url(server, model="unipinrec"):
    return f"{server.inference}/predictions/{model}"


def post(http, server, payload, model="unipinrec", headers=JSON):
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return http.post(url(server, model), data=data, headers=headers, timeout=60)


def assert_serving(http, server):
    r = post(http, server, body(user_id=9999, seed=99))
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 8


def test_one_request_flow(http, server):
    r = post(http, server, body())
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["items"]) == 8 and {"item_id", "score", "retrieval_score", "tasks"} <= set(out["items"][0])
    assert {"encode", "retrieve", "rank", "total"} <= set(out["timings_ms"])
    assert r.headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("model, kwargs", ARCHIVES)
def test_served_scores_equal_the_in_process_engine(http, server, tiny, model, kwargs):
    engine = local_engine(tiny, kwargs)
    for seed, n in ((1, 3), (2, 16), (3, 25)):
        b = body(user_id=50 + seed, n=n, seed=seed)
        served = post(http, server, b, model).json()
        local = engine.handle(b)
        assert [i["item_id"] for i in served["items"]] == [i["item_id"] for i in local["items"]]
        np.testing.assert_allclose([i["score"] for i in served["items"]], [i["score"] for i in local["items"]],
                                   rtol=1e-5, atol=1e-6)
        assert served["model_version"] == local["model_version"]


def test_split_retrieve_and_rank_share_state_in_the_worker(http, server):
    b = body(user_id=70, n=12, seed=7)
    one = post(http, server, b).json()
    r = post(http, server, {**b, "stage": "retrieve"})
    assert r.status_code == 200, r.text
    handle = r.json()["handle"]
    ranked = post(http, server, {"user_id": 70, "stage": "rank", "handle": handle, "k": 8})
    assert ranked.status_code == 200, ranked.text
    assert [i["item_id"] for i in ranked.json()["items"]] == [i["item_id"] for i in one["items"]]
    gone = post(http, server, {"user_id": 70, "stage": "rank", "handle": "not-a-handle"})
    assert gone.status_code == 404 and gone.json()["error"]["field"] == "handle"


def test_client_text_never_reaches_the_status_line(http, server):
    r = post(http, server, {"user_id": 70, "stage": "rank", "handle": "h\u00fc\r\nX-Injected: 1"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "handle"
    assert "X-Injected" not in r.headers and r.reason == "Not Found"


BAD = [*BAD, ("json-like content type", json.dumps(body()), {"Content-Type": "application/jsonx"}, 415,
                   "Content-Type")]


@pytest.mark.parametrize("name, payload, headers, status, field", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field_and_the_worker_keeps_serving(http, server, name, payload, headers,
                                                                          status, field):
    r = post(http, server, payload, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
    assert_serving(http, server)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_with_parameters_or_other_case_is_served(http, server, content_type):
    r = post(http, server, body(user_id=85), headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("value, media", [("application/json", "application/json"),
                                          ("application/json; charset=utf-8", "application/json"),
                                          ("APPLICATION/JSON ;charset=UTF-8", "application/json"),
                                          ("application/jsonx", "application/jsonx"), ("application/json+x", "application/json+x"),
                                          ("json", "text/plain"), ("", "text/plain")])
def test_media_type_is_the_type_without_parameters(value, media):
    from unipinrec.serving.handler_support import media_type

    assert media_type(value) == media


def test_long_and_empty_histories_are_served(http, server):
    long = post(http, server, body(user_id=90, n=L + 10))
    assert long.status_code == 200 and long.json()["history_truncated"] == 10
    cold = post(http, server, {"user_id": 91, "history": [], "k": 4})
    assert cold.status_code == 200 and cold.json()["cold_start"] and len(cold.json()["items"]) == 4


def test_concurrent_requests_are_batched_without_mixing_answers(http, server):
    bodies = [body(user_id=300 + i, n=2 + 3 * i, seed=30 + i) for i in range(8)]
    sequential = [post(http, server, b).json() for b in bodies]

    def call(b):
        with requests.Session() as s:
            return post(s, server, b).json()

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(call, bodies))
    for a, b in zip(sequential, concurrent):
        assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
        np.testing.assert_allclose([i["score"] for i in a["items"]], [i["score"] for i in b["items"]], rtol=1e-5,
                                   atol=1e-6)


def test_metrics_endpoint_reports_stage_latency_and_kv_cache(http, server):
    b = body(user_id=400, seed=40)
    post(http, server, b)
    post(http, server, b)  # the same history again: a KV cache hit
    text = requests.get(f"{server.metrics}/metrics", timeout=10).text
    assert 'UniPinRecStageLatencySeconds_bucket{Stage="encode"' in text
    assert 'UniPinRecStageLatencySeconds_count{Stage="rank"' in text
    hits = [line for line in text.splitlines() if line.startswith('UniPinRecKVCacheLookups{Result="hits"')]
    assert hits and float(hits[0].rsplit(" ", 1)[1]) >= 1
    assert "UniPinRecErrors" in text and "ts_inference_requests_total" in text


# --- fuzz: generated bodies to the running server ------------------------------------------

bodies = shared_bodies.bodies()


def test_fuzzed_bodies_never_get_a_5xx(http, server):
    seen = {"count": 0, "ok": 0}

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bodies)
    def check(case):
        payload, headers = case
        r = post(http, server, payload, headers=headers)
        seen["count"] += 1
        seen["ok"] += r.status_code == 200
        assert r.status_code < 500, (r.status_code, r.text[:300], payload[:300])

    check()
    assert seen["count"] >= 1000
    assert_serving(http, server)


def test_a_worker_traceback_logged_after_the_frontend_saw_the_death_is_still_found(tmp_path):
    """TorchServe's frontend log can say a worker died before the worker's log holds its
    traceback (separate appenders): the error named to the user waits for it, briefly."""
    import threading
    import time

    from unipinrec.serving.torchserve import _last_python_error

    log = tmp_path / "model_log.log"
    log.write_text("2026-12-01T00:00:00 [INFO ] W-9000 MODEL_LOG - loading\n")
    assert _last_python_error(log, wait_s=0.2) is None

    def late():
        time.sleep(0.5)
        with open(log, "a") as f:
            f.write("2026-12-01T00:00:01 [INFO ] W-9000 MODEL_LOG - ValueError: weights do not match the config\n")

    threading.Thread(target=late).start()
    assert _last_python_error(log, wait_s=5.0) == "ValueError: weights do not match the config"

"""The real KServe model server (uvicorn + KServe's data plane + our kserve.Model) serving tiny
packaged models over HTTP: v1 and Open Inference Protocol v2 answers equal the in-process engine
and TorchServe, bad input gets TorchServe's 4xx, fuzzed bodies never get a 5xx.

Started once for this module through `unipinrec serve --runtime kserve` on a free loopback port,
with token auth on (the token from the run folder), and always stopped.
"""
from __future__ import annotations

import json
import time
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("kserve")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import shared_bodies  # noqa: E402  (tests/serving/shared_bodies.py)
from shared_bodies import ARCHIVES, BAD, JSON, L, NUM_ITEMS, body, local_engine, mutated  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from unipinrec.cli import app  # noqa: E402
from unipinrec.serving import kserve_server as ks  # noqa: E402
from unipinrec.serving import torchserve as ts  # noqa: E402
from unipinrec.serving.engine import Engine  # noqa: E402
from unipinrec.serving.synthetic import random_history  # noqa: E402

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("kserve-store")
    ts.build_archive(tiny.unified, tiny.unified_index, root)
    ts.build_archive(tiny.unified, tiny.unified_index, root, name="unipinrec_recompute", engine={"share_kv": False})
    ts.build_archive(tiny.retrieval, tiny.retrieval_index, root, name="unipinrec_baseline", ranking_dir=tiny.ranking)
    return root


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    run = tmp_path_factory.mktemp("kserve-run")
    r = runner.invoke(app, ["serve", "--runtime", "kserve", "--model-store", str(store), "--run-dir", str(run),
                            "--port", str(ts.free_port()), "--timeout", "240"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["runtime"] == "kserve"
    try:
        yield ks.KServeInfo.load(run)
    finally:
        r = runner.invoke(app, ["serve", "--runtime", "kserve", "--stop", "--run-dir", str(run)])
        assert r.exit_code == 0 and "stopped" in r.output, r.output


@pytest.fixture(scope="module")
def http(server):
    with requests.Session() as s:
        s.headers.update(server.headers())
        yield s


def v1(server, model="unipinrec"):
    return f"{server.inference}/v1/models/{model}:predict"


def post(http, url, payload, headers=JSON):
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return http.post(url, data=data, headers=headers, timeout=60)


def v2_body(bodies: list[dict]) -> dict:
    """The v2 tensors of several TorchServe-style bodies (histories concatenated, with lengths)."""
    hist = [a for b in bodies for a in b["history"]]

    def t(name, values, dtype="INT64"):
        return {"name": name, "shape": [len(values)], "datatype": dtype, "data": values}

    return {"inputs": [t("user_id", [b["user_id"] for b in bodies]),
                       t("history_length", [len(b["history"]) for b in bodies]),
                       *[t(f"history_{c}", [a[c] for a in hist]) for c in ("item_id", "action", "ts")],
                       t("k", [b["k"] for b in bodies]), t("num_candidates", [b["num_candidates"] for b in bodies]),
                       t("request_ts", [b["request_ts"] for b in bodies])]}


def v2_rows(out: dict) -> list[dict]:
    """A v2 response -> per user {"item_id": [...], "score": [...]} (padding dropped)."""
    by = {o["name"]: o for o in out["outputs"]}
    B, K = by["item_id"]["shape"]
    rows = []
    for j in range(B):
        n = by["num_items"]["data"][j]
        rows.append({name: by[name]["data"][j * K:j * K + n] for name in ("item_id", "score", "retrieval_score")})
    return rows


def assert_same_items(served_items, local_items):
    assert [i["item_id"] for i in served_items] == [i["item_id"] for i in local_items]
    np.testing.assert_allclose([i["score"] for i in served_items], [i["score"] for i in local_items],
                               rtol=1e-5, atol=1e-6)


def assert_serving(http, server):
    r = post(http, v1(server), body(user_id=9999, seed=99))
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 8


# --- answers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, kwargs", ARCHIVES)
def test_v1_and_v2_answers_equal_the_in_process_engine(http, server, tiny, model, kwargs):
    engine = local_engine(tiny, kwargs)
    bodies = [body(user_id=50 + seed, n=n, seed=seed) for seed, n in ((1, 3), (2, 16), (3, 25))]
    local = [engine.handle(b) for b in bodies]
    for b, want in zip(bodies, local):
        r = post(http, v1(server, model), b)
        assert r.status_code == 200, r.text
        assert_same_items(r.json()["items"], want["items"])
        assert r.json()["model_version"] == want["model_version"]
    r = post(http, f"{server.inference}/v2/models/{model}/infer", v2_body(bodies))
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == local[0]["model_version"]
    for row, want in zip(v2_rows(r.json()), local):
        assert row["item_id"] == [i["item_id"] for i in want["items"]]
        np.testing.assert_allclose(row["score"], [i["score"] for i in want["items"]], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(row["retrieval_score"], [i["retrieval_score"] for i in want["items"]],
                                   rtol=1e-5, atol=1e-6)


def test_v1_instances_batch_keeps_each_answer_and_error_apart(http, server, tiny):
    engine = Engine.from_dirs(tiny.unified, tiny.unified_index)
    good = [body(user_id=60, n=5, seed=6), body(user_id=61, n=9, seed=7)]
    bad = {"user_id": 62, "history": [{"item_id": 5, "action": 1, "ts": 1}]}
    r = post(http, v1(server), {"instances": [good[0], bad, good[1], {"k": 3}]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 4
    assert_same_items(preds[0]["items"], engine.handle(good[0])["items"])
    assert_same_items(preds[2]["items"], engine.handle(good[1])["items"])
    assert preds[1]["error"]["status"] == 422 and preds[1]["error"]["field"] == "history[0].item_id"
    assert preds[3]["error"]["field"] == "user_id"
    r = post(http, v1(server), {"instances": {"user_id": 1}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "instances"


def test_v2_tensors_are_documented_in_the_metadata(http, server):
    meta = http.get(f"{server.inference}/v2/models/unipinrec", timeout=10).json()
    assert [i["name"] for i in meta["inputs"]][:3] == ["user_id", "history_length", "history_item_id"]
    outs = {o["name"] for o in meta["outputs"]}
    assert {"item_id", "score", "retrieval_score", "num_items", "task_engaged"} <= outs


def test_cold_start_and_long_histories_over_v2(http, server):
    b = {"inputs": [{"name": "user_id", "shape": [2], "datatype": "INT64", "data": [91, 92]},
                    {"name": "history_length", "shape": [2], "datatype": "INT64", "data": [0, L + 4]},
                    *[{"name": f"history_{c}", "shape": [L + 4], "datatype": "INT64",
                       "data": [a[c] for a in random_history(np.random.default_rng(5), L + 4, NUM_ITEMS)]}
                      for c in ("item_id", "action", "ts")],
                    {"name": "k", "shape": [2], "datatype": "INT64", "data": [4, 6]}]}
    r = post(http, f"{server.inference}/v2/models/unipinrec/infer", b)
    assert r.status_code == 200, r.text
    by = {o["name"]: o for o in r.json()["outputs"]}
    assert by["item_id"]["shape"] == [2, 6] and by["num_items"]["data"] == [4, 6]
    assert by["item_id"]["data"][4:6] == [-1, -1]  # row 0 asked for 4: padded


# --- errors -----------------------------------------------------------------------------------------


BAD = [*BAD, ("int beyond int64", b'{"user_id": 99999999999999999999999}', JSON, 422, "user_id"),
       ("json-like content type", json.dumps(body()), {"Content-Type": "application/jsonx"}, 415, "Content-Type")]


@pytest.mark.parametrize("name, payload, headers, status, field", BAD, ids=[b[0] for b in BAD])
def test_bad_v1_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(http, server, name, payload, headers,
                                                                             status, field):
    r = post(http, v1(server), payload, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
    assert_serving(http, server)


def _v2(*inputs):
    return {"inputs": [{"name": n, "shape": s, "datatype": d, "data": v} for n, s, d, v in inputs]}


HIST = [("history_length", [1], "INT64", [1]), ("history_item_id", [1], "INT64", [1001]),
        ("history_action", [1], "INT64", [1]), ("history_ts", [1], "INT64", [100])]
USER = ("user_id", [1], "INT64", [1])
BAD_V2 = [
    ("no user_id", _v2(*HIST), 422, "user_id"),
    ("unknown tensor", _v2(USER, ("slate", [1], "INT64", [1])), 422, "slate"),
    ("unknown item", _v2(USER, HIST[0], ("history_item_id", [1], "INT64", [5]), *HIST[2:]), 422, "history_item_id[0]"),
    ("half a history", _v2(USER, *HIST[:2]), 422, "history_action"),
    ("lengths do not add up", _v2(USER, ("history_length", [1], "INT64", [2]), *HIST[1:]), 422, "history_item_id"),
    ("shape mismatch", _v2(("user_id", [3], "INT64", [1]), *HIST), 422, "user_id"),
    ("float data", _v2(USER, *HIST[:3], ("history_ts", [1], "INT64", [1.5])), 422, "history_ts[0]"),
    ("float datatype", _v2(("user_id", [1], "FP32", [1.0])), 422, "user_id"),
    ("k of the wrong length", _v2(("user_id", [2], "INT64", [1, 2]), ("k", [3], "INT64", [1, 2, 3])), 422, "k"),
    ("k over the limit", _v2(USER, ("k", [1], "INT64", [10**9])), 422, "k[0]"),
    ("action out of range", _v2(USER, *HIST[:2], ("history_action", [1], "INT64", [99]), HIST[3]), 422,
     "history_action[0]"),
    ("malformed JSON", b'{"inputs": [', 400, "body"),
    ("inputs not a list", {"inputs": 3}, 422, "inputs"),
    ("no shape", {"inputs": [{"name": "user_id", "datatype": "INT64", "data": [1]}]}, 422, "inputs[0].shape"),
    ("NaN outside a request", b'[NaN]', 422, "body"),  # FastAPI's own handler fails to render it: a 500
    ("oversize body", b'{"inputs": [], "pad": "' + b"x" * (17 * 2**20) + b'"}', 413, "body"),
    ("an input twice", _v2(USER, ("k", [1], "INT64", [3]), ("k", [1], "INT64", [10**9])), 422, "k"),
    ("a JSON string", json.dumps(json.dumps(_v2(USER))), 400, "body"),  # KServe's own refusal, our envelope
]


@pytest.mark.parametrize("name, payload, status, field", BAD_V2, ids=[b[0] for b in BAD_V2])
def test_bad_v2_input_is_a_4xx_naming_the_tensor(http, server, name, payload, status, field):
    r = post(http, f"{server.inference}/v2/models/unipinrec/infer", payload)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
    assert_serving(http, server)


def test_bodies_the_server_would_read_unchecked_are_refused_first(http, server):
    """A chunked body (no Content-Length: read whole before any size check, +1.7 GB for 1 GiB)
    is a 411, and the binary tensor extension (parsed by KServe, its errors 500s) a 415, both
    before the body is read; the server keeps serving."""
    url = f"{server.inference}/v2/models/unipinrec/infer"
    chunks = (b"x" * 2**16 for _ in range(64))  # requests sends a generator chunked
    r = http.post(url, data=chunks, headers=JSON, timeout=60)
    assert r.status_code == 411 and r.json()["error"]["field"] == "Transfer-Encoding"
    r = post(http, url, b'{"id": 1}', headers={**JSON, "Inference-Header-Content-Length": "9"})
    assert r.status_code == 415 and r.json()["error"]["field"] == "Inference-Header-Content-Length"
    r = post(http, url, _v2(USER), headers={**JSON, "X-Pad": "p" * 40_000})  # one write: h11 passed it whole
    assert r.status_code == 431 and r.json()["error"]["field"] == "headers"
    assert_serving(http, server)


def test_an_unfinished_head_is_closed_at_the_gateways_deadline(http, server):
    """KServe's uvicorn waited forever for a request head (no token check before it is whole):
    now the gateway's 10 s head deadline closes the connection, and the server keeps serving."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(server.inference)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/unipinrec/infer HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        t = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server, no answer
        assert 9.0 < time.monotonic() - t < 25.0
    assert_serving(http, server)


def test_concurrent_requests_are_batched_without_mixing_answers_or_errors(http, server):
    bodies = [body(user_id=300 + i, n=2 + 3 * i, seed=30 + i) for i in range(8)]
    bodies[3] = mutated(history=[{"item_id": 5, "action": 1, "ts": 1}])
    sequential = [post(http, v1(server), b) for b in bodies]
    headers = server.headers()

    def call(b):
        with requests.Session() as s:
            s.headers.update(headers)
            return post(s, v1(server), b)

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(call, bodies))
    for i, (a, b) in enumerate(zip(sequential, concurrent)):
        assert a.status_code == b.status_code == (422 if i == 3 else 200), (i, b.text)
        if i != 3:
            assert_same_items(b.json()["items"], a.json()["items"])


def test_token_auth_health_and_closed_management(server):
    with requests.Session() as anon:
        r = post(anon, v1(server), body())
        assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
        r = post(anon, v1(server), body(), headers={**JSON, "Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = post(anon, v1(server), body(), headers={**JSON, "X-UniPinRec-Token": server.headers()["Authorization"][7:]})
        assert r.status_code == 200, r.text
        # probes need no token; readiness comes from the model (engine built, engine thread alive)
        assert anon.get(f"{server.inference}/v2/models/unipinrec/ready", timeout=10).status_code == 200
        assert anon.get(f"{server.inference}/v1/models/unipinrec", timeout=10).json()["ready"] is True
        assert anon.get(f"{server.inference}/v2/health/live", timeout=10).json() == {"live": True}
        assert anon.get(f"{server.inference}/v2/models/nope/ready", timeout=10).status_code == 404
        # KServe's model repository API would unload models: closed, with or without a token
        for headers in ({}, server.headers()):
            r = anon.post(f"{server.inference}/v2/repository/models/unipinrec/unload", headers=headers, timeout=10)
            assert r.status_code == 404
        assert anon.get(f"{server.inference}/v2/models/unipinrec/ready", timeout=10).status_code == 200
        for _ in range(2):  # the same history twice: a KV cache hit
            post(anon, v1(server), body(user_id=400, seed=40), headers={**JSON, **server.headers()})
        assert post(anon, v1(server), {"k": 3}, headers={**JSON, **server.headers()}).status_code == 422
        text = anon.get(f"{server.inference}/metrics", timeout=10).text
        assert "request_predict_seconds" in text  # KServe's own
        assert 'UniPinRecStageLatencySeconds_count{Stage="encode",model="unipinrec"}' in text
        hits = [line for line in text.splitlines() if line.startswith("UniPinRecKVCacheLookups_total")
                and 'Result="hits"' in line and 'model="unipinrec"' in line]
        assert hits and float(hits[0].rsplit(" ", 1)[1]) >= 1
        assert 'UniPinRecErrors_total{Status="401"}' not in text  # auth is not a model error
        assert 'UniPinRecErrors_total{Status="422"}' in text


def test_split_retrieve_and_rank_share_state_in_the_engine(http, server):
    b = body(user_id=70, n=12, seed=7)
    one = post(http, v1(server), b).json()
    r = post(http, v1(server), {**b, "stage": "retrieve"})
    assert r.status_code == 200, r.text
    ranked = post(http, v1(server), {"user_id": 70, "stage": "rank", "handle": r.json()["handle"], "k": 8})
    assert ranked.status_code == 200, ranked.text
    assert [i["item_id"] for i in ranked.json()["items"]] == [i["item_id"] for i in one["items"]]
    gone = post(http, v1(server), {"user_id": 70, "stage": "rank", "handle": "not-a-handle"})
    assert gone.status_code == 404 and gone.json()["error"]["field"] == "handle"


# --- against TorchServe -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchserve(store, tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java (17)")
    run = tmp_path_factory.mktemp("ts-run")
    ports = (ts.free_port(), ts.free_port(), ts.free_port())
    info = ts.start(store, run, models=["unipinrec=unipinrec.mar"], ports=ports, token_auth=False, timeout_s=240)
    try:
        yield info
    finally:
        ts.stop(run)


def test_same_answers_and_errors_as_torchserve(http, server, torchserve):
    with requests.Session() as t:
        for b in [body(user_id=500 + s, n=4 * s, seed=s) for s in range(4)]:
            a = post(http, v1(server), b).json()
            c = post(t, f"{torchserve.inference}/predictions/unipinrec", b).json()
            assert_same_items(a["items"], c["items"])
        for name, payload, headers, status, field in BAD:
            a = post(http, v1(server), payload, headers=headers)
            c = post(t, f"{torchserve.inference}/predictions/unipinrec", payload, headers=headers)
            assert (a.status_code, a.json()["error"]["field"]) == (c.status_code, c.json()["error"]["field"]), name


# --- fuzz -------------------------------------------------------------------------------------------

scalars, json_values, near_valid = shared_bodies.scalars, shared_bodies.json_values, shared_bodies.near_valid
v1_bodies = shared_bodies.bodies(st.lists(near_valid, max_size=3).map(lambda d: (json.dumps({"instances": d}), JSON)))
tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["user_id", "history_length", "history_item_id", "history_action", "history_ts",
                              "history_surface", "k", "num_candidates", "request_ts", "exclude_seen", "x"]),
     "shape": st.lists(st.integers(-1, 4), max_size=2), "datatype": st.sampled_from(["INT64", "INT8", "FP32", "BOOL", "BYTES"]),
     "data": st.lists(st.integers(-2, 1310) | scalars, max_size=4)})
v2_bodies = st.lists(tensor, max_size=6, unique_by=lambda t: t["name"]).map(lambda ts_: {"inputs": ts_}) | json_values


def test_fuzzed_v1_bodies_never_get_a_5xx(http, server):
    seen = {"count": 0, "ok": 0}

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(v1_bodies)
    def check(case):
        payload, headers = case
        r = post(http, v1(server), payload, headers=headers)
        seen["count"] += 1
        seen["ok"] += r.status_code == 200
        assert r.status_code < 500, (r.status_code, r.text[:300], payload[:300])

    check()
    assert seen["count"] >= 1000 and seen["ok"] > 0
    assert_serving(http, server)


def test_fuzzed_v2_bodies_never_get_a_5xx(http, server):
    seen = {"count": 0}

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(v2_bodies)
    def check(payload):
        r = post(http, f"{server.inference}/v2/models/unipinrec/infer", payload)
        seen["count"] += 1
        assert r.status_code < 500, (r.status_code, r.text[:300], json.dumps(payload)[:300])

    check()
    assert seen["count"] >= 300
    assert_serving(http, server)

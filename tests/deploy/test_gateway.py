"""The token gateway against a stand-in for TorchServe 0.12's token authorization.

The stand-in behaves like TorchServe as observed on 0.12.0 (see test_gateway_torchserve.py
for the real thing): every inference path, /ping included, needs `Authorization: Bearer
<inference key>` and a wrong key gets HTTP 400 "Token Authorization failed"; the management
API needs the management key (`GET /models/NAME` lists workers, READY once the model is
loaded); the token API (`/token?type=inference|management` with the API key) draws a new key
and rewrites key_file.json.
"""
from __future__ import annotations

import http.client
import json
import select
import socket
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from unipinrec.serving.gateway import Gateway, Limits, make_server


class FakeTorchServe:
    def __init__(self, key_file):
        self.key_file, self.n, self.seen = key_file, 0, []
        self.api_key, self.mgmt_key, self.worker = "api-key", "mgmt-key-0", "READY"
        self.mgmt_expires = datetime.now(timezone.utc) + timedelta(hours=1)
        self.rotate(expires_in=timedelta(hours=1))
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as TorchServe's netty does: the latency test measures the gateway

            def _reply(self, status, obj):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.do_POST()

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization", "")
                outer.seen.append((self.command, self.path, auth, body))
                if self.path.startswith("/token"):
                    if auth != f"Bearer {outer.api_key}":
                        return self._reply(400, {"message": "Token Authorization failed"})
                    if self.path.endswith("type=management"):
                        outer.mgmt_key = f"mgmt-key-{outer.n}"
                        outer.mgmt_expires = datetime.now(timezone.utc) + timedelta(hours=1)
                        outer.write_key_file()
                    else:
                        outer.rotate(expires_in=timedelta(hours=1))
                    return self._reply(200, {})
                if self.path.startswith("/models"):
                    if auth != f"Bearer {outer.mgmt_key}" or outer.mgmt_expires <= datetime.now(timezone.utc):
                        return self._reply(400, {"message": "Token Authorization failed. Token either incorrect"})
                    return self._reply(200, [{"modelName": "unipinrec", "workers": [{"id": "9000", "status": outer.worker}]}])
                if auth != f"Bearer {outer.key}" or outer.expired:
                    return self._reply(400, {"code": 400, "type": "InvalidKeyException", "message":
                                             "Token Authorization failed. Token either incorrect, expired, or not provided correctly"})
                if self.path == "/ping":
                    return self._reply(200, {"status": "Healthy"})
                if self.path.startswith("/predictions/"):
                    return self._reply(*outer.predict(json.loads(body)))
                return self._reply(404, {"message": "not found"})

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def predict(self, req) -> tuple[int, dict]:
        return 200, {"items": [], "model_version": "v1", "echo": req}

    def rotate(self, expires_in: timedelta) -> None:
        self.n += 1
        self.key = f"inference-key-{self.n}"
        self.expires = datetime.now(timezone.utc) + expires_in
        self.write_key_file()

    @property
    def expired(self) -> bool:
        return self.expires <= datetime.now(timezone.utc)

    def write_key_file(self) -> None:
        def stamp(t):
            return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"  # TorchServe writes nanoseconds
        self.key_file.write_text(json.dumps({
            "management": {"key": self.mgmt_key, "expiration time": stamp(self.mgmt_expires)},
            "inference": {"key": self.key, "expiration time": stamp(self.expires)},
            "API": {"key": self.api_key}}, indent=2))


@pytest.fixture
def limits():
    return Limits()


@pytest.fixture
def stack(tmp_path, limits):
    key_file, token_file = tmp_path / "key_file.json", tmp_path / "token"
    token_file.write_text("client-token-1\nclient-token-2\n")
    ts = FakeTorchServe(key_file)
    alive = {"child": True}
    gw = Gateway(ts.url, ts.url, key_file, token_file, child_alive=lambda: alive["child"])
    server = make_server(gw, "127.0.0.1", 0, limits).start()
    port = server.server_address[1]

    def call(method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        out = r.status, r.read()
        conn.close()
        return out

    yield {"ts": ts, "gw": gw, "call": call, "token_file": token_file, "alive": alive, "key_file": key_file,
           "gw_port": port, "server": server}
    server.shutdown()
    ts.server.shutdown()


BEARER = {"Authorization": "Bearer client-token-1"}


def test_prediction_needs_a_client_token(stack):
    status, body = stack["call"]("POST", "/predictions/unipinrec", {"user_id": 1})
    assert status == 401 and b"inference token" in body
    status, _ = stack["call"]("POST", "/predictions/unipinrec", {"user_id": 1}, {"Authorization": "Bearer nope"})
    assert status == 401
    assert not [s for s in stack["ts"].seen if s[1].startswith("/predictions")]  # never reached TorchServe


@pytest.mark.parametrize("headers", [BEARER, {"Authorization": "Bearer client-token-2"},
                                     {"X-UniPinRec-Token": "client-token-1"}])
def test_prediction_is_forwarded_with_the_pods_own_key(stack, headers):
    status, body = stack["call"]("POST", "/predictions/unipinrec", {"user_id": 42, "k": 3}, headers)
    assert status == 200 and json.loads(body)["echo"] == {"user_id": 42, "k": 3}
    method, path, auth, _ = stack["ts"].seen[-1]
    assert (method, path, auth) == ("POST", "/predictions/unipinrec", "Bearer inference-key-1")


def test_ping_needs_no_client_token_but_reaches_torchserve_with_its_keys(stack):
    assert stack["call"]("GET", "/ping")[0] == 200
    assert [s[1:3] for s in stack["ts"].seen[-2:]] == [("/ping", "Bearer inference-key-1"),
                                                        ("/models/unipinrec", "Bearer mgmt-key-0")]


def test_ping_is_503_until_a_worker_has_loaded_the_model(stack):
    stack["ts"].worker = "UNLOADING"  # what TorchServe 0.12 reports for a started, still loading worker
    status, body = stack["call"]("GET", "/ping")
    assert status == 503 and b"no worker READY" in body
    assert stack["call"]("GET", "/v1/models/unipinrec")[1] == b'{"name": "unipinrec", "ready": false}'
    stack["ts"].worker = "READY"
    assert stack["call"]("GET", "/ping")[0] == 200


def test_expired_management_key_is_refreshed_for_the_readiness_check(stack):
    ts = stack["ts"]
    ts.mgmt_expires = datetime.now(timezone.utc) - timedelta(seconds=1)
    ts.write_key_file()
    assert stack["call"]("GET", "/ping")[0] == 200
    assert ("POST", "/token?type=management") in [s[:2] for s in ts.seen]


def test_management_and_unknown_paths_are_never_forwarded(stack):
    for path in ("/models", "/token?type=inference", "/predictions/../models", "/metrics"):
        assert stack["call"]("GET", path)[0] == 401
        assert stack["call"]("POST", path, b"", BEARER)[0] == 404
    assert not any(s[1].startswith(("/models", "/token", "/metrics")) for s in stack["ts"].seen)


def test_expired_key_is_refreshed_through_the_token_api(stack):
    ts = stack["ts"]
    ts.expires = datetime.now(timezone.utc) - timedelta(seconds=1)
    ts.write_key_file()
    status, _ = stack["call"]("POST", "/predictions/unipinrec", {"user_id": 1}, BEARER)
    assert status == 200
    token_calls = [s for s in ts.seen if s[1].startswith("/token")]
    assert token_calls and token_calls[0][2] == "Bearer api-key"
    assert ts.seen[-1][2] == "Bearer inference-key-2"


def test_key_rejected_by_torchserve_is_refreshed_once_and_retried(stack):
    ts = stack["ts"]
    ts.key = "rotated-elsewhere"  # TorchServe's key no longer matches the file the gateway read
    ts.expires = datetime.now(timezone.utc) - timedelta(seconds=1)
    status, _ = stack["call"]("POST", "/predictions/unipinrec", {"user_id": 1}, BEARER)
    assert status == 200 and ts.seen[-1][2] == f"Bearer {ts.key}"


def test_token_file_rotation_needs_no_restart(stack):
    assert stack["call"]("POST", "/predictions/unipinrec", {"user_id": 1}, BEARER)[0] == 200
    stack["token_file"].write_text("# rotated\nnew-token-with-a-different-length\n")
    assert stack["call"]("POST", "/predictions/unipinrec", {"user_id": 1}, BEARER)[0] == 401
    assert stack["call"]("POST", "/predictions/unipinrec", {"user_id": 1},
                         {"Authorization": "Bearer new-token-with-a-different-length"})[0] == 200


def test_empty_token_file_lets_nobody_in(stack):
    stack["token_file"].write_text("\n")
    assert stack["call"]("POST", "/predictions/unipinrec", {"user_id": 1}, {"Authorization": "Bearer "})[0] == 401


def test_before_torchserve_writes_its_key_ping_is_503(stack):
    stack["key_file"].unlink()
    gw = Gateway(stack["ts"].url, stack["ts"].url, stack["key_file"], stack["token_file"])
    reply = gw.handle("GET", "/ping", {}, b"")
    assert reply.status == 503 and b"starting" in reply.body


def test_livez_follows_the_child_and_the_upstream(stack):
    assert stack["call"]("GET", "/livez")[0] == 200
    stack["alive"]["child"] = False
    assert stack["call"]("GET", "/livez")[0] == 503
    stack["alive"]["child"] = True
    stack["ts"].server.shutdown()
    stack["ts"].server.server_close()
    assert stack["call"]("GET", "/livez")[0] == 503


def test_kserve_v1_protocol(stack):
    status, body = stack["call"]("POST", "/v1/models/unipinrec:predict",
                                 {"instances": [{"user_id": 1}, {"user_id": 2}]}, BEARER)
    assert status == 200
    assert [p["echo"]["user_id"] for p in json.loads(body)["predictions"]] == [1, 2]
    assert stack["call"]("POST", "/v1/models/unipinrec:predict", {"rows": []}, BEARER)[0] == 400
    status, body = stack["call"]("GET", "/v1/models/unipinrec")
    assert status == 200 and json.loads(body) == {"name": "unipinrec", "ready": True}


def test_kserve_v1_instances_succeed_or_fail_alone(stack, monkeypatch):
    """One bad instance gets its own error object in place (it failed the whole body, the
    good answers discarded), as the KServe model server answers; past 256 instances a 413."""
    real = stack["ts"].predict

    def predict(req):
        if req["user_id"] == 13:
            return 422, {"error": {"status": 422, "field": "history[0].item_id", "message": "unknown item id 5"}}
        return real(req)

    monkeypatch.setattr(stack["ts"], "predict", predict)
    status, body = stack["call"]("POST", "/v1/models/unipinrec:predict",
                                 {"instances": [{"user_id": 1}, {"user_id": 13}, {"user_id": 2}]}, BEARER)
    assert status == 200
    preds = json.loads(body)["predictions"]
    assert [p.get("echo", {}).get("user_id") for p in preds] == [1, None, 2]
    assert preds[1]["error"]["field"] == "history[0].item_id"
    status, body = stack["call"]("POST", "/v1/models/unipinrec:predict", {"instances": [{"user_id": 1}] * 257}, BEARER)
    assert status == 413 and b"256" in body


def test_a_head_over_the_limit_is_refused_even_in_one_write(stack):
    status, body = stack["call"]("POST", "/predictions/unipinrec", {"user_id": 1}, {**BEARER, "X-Pad": "p" * 40_000})
    assert status == 431 and b"request head" in body
    assert stack["call"]("POST", "/predictions/unipinrec?x=" + "q" * 40_000, {"user_id": 1}, BEARER)[0] == 431
    assert not [s for s in stack["ts"].seen if s[1].startswith("/predictions")]
    assert stack["call"]("POST", "/predictions/unipinrec", {"user_id": 1}, BEARER)[0] == 200


@pytest.mark.parametrize("limits", [Limits(upstream_threads=1)])
def test_probes_are_answered_while_every_upstream_thread_is_busy(stack, monkeypatch):
    """Clients holding every upstream thread (here a slow TorchServe and one thread) do not
    hold the kubelet's probes: /livez and /ping answer from their own threads."""
    release, real = threading.Event(), stack["ts"].predict
    monkeypatch.setattr(stack["ts"], "predict", lambda req: (release.wait(30), real(req))[1])
    slow = threading.Thread(target=stack["call"], args=("POST", "/predictions/unipinrec", {"user_id": 1}, BEARER))
    slow.start()
    try:
        deadline = time.monotonic() + 10
        while not any(s[1].startswith("/predictions") for s in stack["ts"].seen) and time.monotonic() < deadline:
            time.sleep(0.01)  # the one upstream thread is now inside TorchServe
        assert stack["call"]("GET", "/livez")[0] == 200
        assert stack["call"]("GET", "/ping")[0] == 200
        assert slow.is_alive()  # answered while the prediction still waits
    finally:
        release.set()
        slow.join(30)


def test_liveness_answers_while_readiness_waits_on_a_stalled_torchserve(stack, monkeypatch):
    """Readiness asks TorchServe (which may accept connections and stall); liveness must not
    wait behind it, or the kubelet restarts a pod whose TorchServe is only slow."""
    release, real = threading.Event(), stack["gw"].ready
    monkeypatch.setattr(stack["gw"], "ready", lambda: (release.wait(30), real())[1])
    waiting = [threading.Thread(target=stack["call"], args=("GET", "/ping")) for _ in range(3)]
    for t in waiting:
        t.start()
    try:
        time.sleep(0.3)  # both readiness threads now wait
        assert stack["call"]("GET", "/livez")[0] == 200
        assert all(t.is_alive() for t in waiting)
    finally:
        release.set()
        for t in waiting:
            t.join(30)


@pytest.mark.parametrize("limits", [Limits(max_body=10)])
def test_oversized_or_chunked_bodies_are_refused(stack):
    assert stack["call"]("POST", "/predictions/unipinrec", {"user_id": 123456789}, BEARER)[0] == 413
    port = stack["gw_port"]
    for head, status in ((b"Content-Length: nonsense", b"400"), (b"Transfer-Encoding: chunked", b"411")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /predictions/unipinrec HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer client-token-1\r\n"
                         + head + b"\r\n\r\n")
            assert sock.recv(100).split(b" ")[1] == status
    assert not [s for s in stack["ts"].seen if s[1].startswith("/predictions")]


def test_answers_are_not_held_back_by_nagle(stack):
    """Headers and body may go out as two writes: with Nagle on, each answer would wait ~40 ms
    for the client's delayed ACK (measured before: p50 44 ms through the gateway vs 1.1 ms direct)."""
    conn = http.client.HTTPConnection("127.0.0.1", stack["gw_port"], timeout=10)
    took = []
    for _ in range(21):
        t = time.perf_counter()
        conn.request("POST", "/predictions/unipinrec", body=b'{"user_id": 1}',
                     headers={"Content-Type": "application/json", **BEARER})
        assert conn.getresponse().read()
        took.append(time.perf_counter() - t)
    conn.close()
    assert sorted(took)[10] < 0.03, took


# ------------------------------------------------------------------------------------------------
# issue 11: held down without a token (finding 2), key rotation by answer text (4), nested JSON (8)

def _open(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head)
    return sock


def _until_closed(sock: socket.socket, within_s: float) -> bytes:
    """What the server sent before closing; fails when it keeps the connection open longer."""
    sock.settimeout(within_s)
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def _drip_until_closed(sock: socket.socket, within_s: float) -> float:
    """Send a byte every 0.1 s until the server closes; seconds it took."""
    t = time.monotonic()
    while time.monotonic() - t < within_s:
        try:
            sock.sendall(b"X")
        except OSError:  # reset by the server
            return time.monotonic() - t
        if select.select([sock], [], [], 0.1)[0] and sock.recv(1) == b"":
            return time.monotonic() - t
    raise AssertionError(f"still open after {within_s} s")


def test_unauthenticated_body_is_refused_before_it_is_read(stack):
    """The head says 16 MB are coming and carries no token: the answer is a 401 at once, not after
    reading (and holding) the body."""
    head = (b"POST /predictions/unipinrec HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 16000000\r\n\r\n")
    with _open(stack["gw_port"], head + b"x" * 1000) as sock:
        t = time.monotonic()
        got = _until_closed(sock, within_s=3)
    assert got.split(b" ")[1] == b"401" and time.monotonic() - t < 3


@pytest.mark.parametrize("limits", [Limits(head_timeout_s=0.5, body_timeout_s=0.5)])
def test_slow_heads_and_bodies_are_cut_off(stack):
    port = stack["gw_port"]
    with _open(port, b"POST /predictions/unipinrec HTTP/1.1\r\nHost: x\r\n") as sock:  # head never finished
        assert _until_closed(sock, within_s=3) == b""
    with _open(port, b"POST /predictions/unipinrec HTTP/1.1\r\n") as sock:  # a header byte now and then
        assert _drip_until_closed(sock, within_s=3) < 2

    head = (b"POST /predictions/unipinrec HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer client-token-1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user_id\"")
    with _open(port, head) as sock:  # authenticated, body never finished
        assert _until_closed(sock, within_s=3).split(b" ")[1] == b"408"
    assert not [s for s in stack["ts"].seen if s[1].startswith("/predictions")]


async def _echo_body(scope, receive, send):
    """An app that reads the whole body itself (as KServe's does) and answers it back."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def test_the_protocols_body_deadline_closes_a_body_that_stops_coming():
    """For a server whose app reads bodies itself (KServe-native: no gateway in front), the
    protocol's body deadline closes a connection whose body stops coming (a byte now and then held
    it, and the app's read, for ever); a whole body within the deadline is answered, and on a
    kept-alive connection a finished request's deadline does not cut the next one."""
    import uvicorn

    from unipinrec.serving.gateway import _head_timed_protocol

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_echo_body, http=_head_timed_protocol(5.0, body_timeout_s=0.6),
                                           lifespan="off", log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        with _open(port, head + b"abc") as sock:  # 3 bytes of 10, then nothing
            t = time.monotonic()
            assert _until_closed(sock, within_s=5) == b""
            assert 0.5 < time.monotonic() - t < 3.0
        with _open(port, b"") as sock:
            for pause in (0.3, 0.3, 0.9):  # slow bodies, each whole within 0.6 s of its head; idle between
                sock.sendall(head + b"abcde")
                time.sleep(0.3)
                sock.sendall(b"fghij")
                got = b""
                while not got.endswith(b"abcdefghij"):
                    got += sock.recv(4096)
                assert got.startswith(b"HTTP/1.1 200")
                time.sleep(pause - 0.3)
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


def test_many_slow_unauthenticated_clients_do_not_hold_the_gateway(stack):
    """300 half-sent heads and 50 half-sent unauthenticated bodies stay connected (or are cut
    off) while an authenticated client keeps getting quick answers; no thread per connection."""
    port, threads_before = stack["gw_port"], threading.active_count()
    slow = [_open(port, b"POST /predictions/unipinrec HTTP/1.1\r\nHost: x\r\nContent-Le") for _ in range(300)]
    slow += [_open(port, b"POST /predictions/unipinrec HTTP/1.1\r\nHost: x\r\nContent-Length: 16000000\r\n\r\n"
                   + b"x" * 65536) for _ in range(50)]
    try:
        took = []
        for i in range(20):
            t = time.perf_counter()
            status, _ = stack["call"]("POST", "/predictions/unipinrec", {"user_id": i}, BEARER)
            took.append(time.perf_counter() - t)
            assert status == 200
        assert max(took) < 1.0, took
        assert threading.active_count() - threads_before < 40  # the upstream pool, not one per connection
    finally:
        for sock in slow:
            sock.close()


def test_listen_backlog_is_not_five(stack):
    """`ss` reports a listening socket's backlog as its Send-Q."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{stack['gw_port']}"], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[2]) == Limits().backlog


def test_a_model_answer_that_echoes_the_token_failure_text_does_not_rotate_the_key(stack):
    """A 400 from the model whose JSON quotes 'Token Authorization failed' (a client-chosen field
    name) is the model's answer, passed through; only TorchServe's own InvalidKeyException rotates."""
    ts = stack["ts"]
    bait = {"Token Authorization failed": 1}
    original = ts.predict
    ts.predict = lambda req: (400, {"error": {"status": 400, "field": next(iter(req)), "message": "extra field"}}) \
        if req == bait else original(req)
    for _ in range(5):
        status, body = stack["call"]("POST", "/predictions/unipinrec", bait, BEARER)
        assert status == 400 and b"Token Authorization failed" in body
    assert not [s for s in ts.seen if s[1].startswith("/token")]
    assert ts.key == "inference-key-1"


def test_deeply_nested_kserve_v1_body_is_a_400(stack):
    for body in (b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                 b'{"instances": [{"user_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"):
        status, answer = stack["call"]("POST", "/v1/models/unipinrec:predict", body, BEARER)
        assert status == 400 and b"instances" in answer
    assert stack["call"]("POST", "/v1/models/unipinrec:predict", {"instances": [{"user_id": 1}]}, BEARER)[0] == 200


@pytest.mark.parametrize("content_type, status", [("application/json", 200), ("application/json; charset=utf-8", 200),
                                                  ("application/jsonx", 415), ("text/plain", 415)])
def test_kserve_v1_content_type_is_exactly_json(stack, content_type, status):
    assert stack["call"]("POST", "/v1/models/unipinrec:predict", {"instances": [{"user_id": 1}]},
                         {**BEARER, "Content-Type": content_type})[0] == status


def test_log_file_is_size_rotated(tmp_path):
    import logging

    from unipinrec.serving.gateway import _log_to

    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in ("unipinrec.gateway", "uvicorn")}
    try:
        _log_to(tmp_path / "gateway.log", max_bytes=2000)
        for i in range(200):  # what a flood of malformed requests makes uvicorn write
            logging.getLogger("uvicorn.error").warning("Invalid HTTP request received. %d", i)
        logging.getLogger("unipinrec.gateway").info("model server exited with status 1")
    finally:
        for name, (handlers, level, propagate) in saved.items():
            for h in logging.getLogger(name).handlers:
                h.close()
            logging.getLogger(name).handlers[:], logging.getLogger(name).level = handlers, level
            logging.getLogger(name).propagate = propagate
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gateway.log", "gateway.log.1", "gateway.log.2", "gateway.log.3"], files
    assert all((tmp_path / f).stat().st_size <= 2000 for f in files)
    assert "model server exited" in (tmp_path / "gateway.log").read_text()

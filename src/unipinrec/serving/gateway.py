"""Token gateway in front of TorchServe, and the supervisor that runs both in one container.

Why it exists: TorchServe 0.12 keeps token authorization on (we never disable it), but it
draws fresh random keys in every process, writes them to `key_file.json` in its working
directory, lets the inference key expire (`token_expiration_min`, default 60), and even
`/ping` needs the key. Behind a Service with several replicas no client can hold a key that
every pod accepts, and kubelet probes cannot send one. The gateway fixes that without
weakening anything:

* TorchServe binds inference and management to 127.0.0.1; only the gateway reaches them,
  with the pod's own key read from the key file (refreshed through the management token API
  with the API key when it expires, or when TorchServe itself rejects it: its own
  `InvalidKeyException` answer, never text inside a model's answer).
* Clients send `Authorization: Bearer <token>` (or `X-UniPinRec-Token`, which survives the
  API server's service proxy); tokens come from a mounted Secret file, one per line, re-read
  when the file changes (rotation without restarts), compared in constant time.
* Unauthenticated: `/ping` (readiness: TorchServe's /ping *and* a worker of the model READY,
  from the management API), `/livez` (the gateway and its child process), KServe v1 readiness
  `GET /v1/models/<name>`. Everything else needs a token;
  only prediction paths are forwarded, never management.

Holding it down without a token must not be possible (issue 11), so the HTTP side is an
asyncio server (uvicorn's h11 protocol, in the pinned stack through Feast): a connection costs
a few KB, not a thread. The token is checked from the request head before any body is read
(an unauthenticated request is answered 401 and its connection closed); the head must arrive
within `head_timeout_s`, the body within `body_timeout_s`; a Content-Length over `max_body` is
a 413 before reading; the listen backlog and the number of open connections are bounded. Calls
to TorchServe (blocking, kept-alive connections per thread) run in a bounded thread pool.
"""
from __future__ import annotations

import asyncio
import hmac
import http.client
import json
import logging
import logging.handlers
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import Message
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

TOKEN_HEADER = "X-UniPinRec-Token"
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # starts alphanumeric: no "..", no traversal to other APIs
_PREDICT = re.compile(rf"^/predictions/{_NAME}(/{_NAME})?$")
_V1_PREDICT = re.compile(rf"^/v1/models/({_NAME}):predict$")
_V1_READY = re.compile(rf"^/v1/models/({_NAME})$")
log = logging.getLogger("unipinrec.gateway")


@dataclass(frozen=True)
class Limits:
    """What one client may cost the gateway."""
    max_body: int = 16 * 1024 * 1024   # bytes; TorchServe's max_request_size in the cluster config
    head_timeout_s: float = 10.0       # request line + headers, from connect (or the previous answer)
    body_timeout_s: float = 30.0       # the whole body, from the end of the head
    max_connections: int = 4096        # open at once; beyond it new requests get uvicorn's 503
    backlog: int = 2048                # listen(2) queue
    upstream_threads: int = 32         # concurrent calls to TorchServe
    max_head: int = 16 * 1024          # bytes of request line + headers (h11's incomplete-event cap)


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"


def _json(status: int, obj) -> Reply:
    return Reply(status, json.dumps(obj).encode())


@dataclass
class Admitted:
    """A request the gateway will answer: `answer(body)` runs in the upstream thread pool (a
    probe in its own: clients that keep every upstream thread busy must not fail the kubelet's
    liveness and readiness checks)."""
    answer: Callable[[bytes], Reply]
    reads_body: bool = False
    probe: str = ""  # "live" | "ready": the thread pool of its own


MAX_INSTANCES = 256  # a KServe v1 body's instances, as the KServe model server allows


def _is_json(content_type: str) -> bool:
    """application/json, parameters (charset) allowed; not a prefix match (application/jsonx)."""
    msg = Message()
    msg["content-type"] = content_type
    return msg.get_content_type() == "application/json"


def _rejected_key(reply: Reply) -> bool:
    """TorchServe's own refusal of a key: its ErrorResponse {"code", "type": "InvalidKeyException",
    "message"} with status 400 (0.12) or 401. A model's answer is the handler's JSON and never has
    that shape, whatever text a client got it to echo."""
    if reply.status not in (400, 401):
        return False
    try:
        obj = json.loads(reply.body)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and set(obj) <= {"code", "type", "message"} and obj.get("type") == "InvalidKeyException"


class WatchedFile:
    """A small file re-read when its mtime or size changes."""

    def __init__(self, path: Path, parse: Callable[[str], Any]):
        self.path, self._parse = Path(path), parse
        self._stamp: tuple[int, int] | None = None
        self.value: Any = None
        self._lock = threading.Lock()

    def get(self, force: bool = False):
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if force or stamp != self._stamp:
                try:
                    self.value = self._parse(self.path.read_text())
                    self._stamp = stamp
                except (ValueError, KeyError, OSError):
                    return self.value  # caught mid-write: keep the last good value
            return self.value


def _parse_keys(text: str) -> dict:
    """{"inference": (key, expiry), "management": (key, expiry), "api": key} from key_file.json."""
    data = json.loads(text)
    out: dict = {"api": data["API"]["key"]}
    for kind in ("inference", "management"):
        expiry = data[kind].get("expiration time")
        # Python 3.11 parses TorchServe's "2026-01-01T00:00:00.123456789Z"
        out[kind] = (data[kind]["key"], datetime.fromisoformat(expiry) if expiry else None)
    return out


def parse_tokens(text: str) -> list[bytes]:
    lines = (line.strip() for line in text.splitlines())
    return [line.encode() for line in lines if line and not line.startswith("#")]


class Gateway:
    """The request logic, separate from the HTTP server so tests can call `handle` directly."""

    def __init__(self, upstream: str, management: str, key_file: Path, token_file: Path,
                 child_alive: Callable[[], bool] = lambda: True, timeout_s: float = 300.0,
                 model: str = "unipinrec"):
        self.upstream, self.management, self.model = urlsplit(upstream), urlsplit(management), model
        self.keys = WatchedFile(key_file, _parse_keys)
        self.tokens = WatchedFile(token_file, parse_tokens)
        self.child_alive, self.timeout_s = child_alive, timeout_s
        self._local = threading.local()
        self._refresh_lock = threading.Lock()

    # -- client side -------------------------------------------------------------------
    def authorized(self, headers: dict[str, str]) -> bool:
        tokens = self.tokens.get() or []
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get(TOKEN_HEADER.lower(), "").strip()
        if not given or not tokens:
            return False
        return any(hmac.compare_digest(given.encode(), t) for t in tokens)

    def admit(self, method: str, path: str, headers: dict[str, str]) -> "Reply | Admitted":
        """From the request head alone: a Reply now (401, 404), or how to answer once the body
        (if the route takes one) is read. Never reads a body, never calls TorchServe."""
        path = path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in headers.items()}
        if path == "/livez":
            return Admitted(lambda _: self.livez(), probe="live")
        if path == "/ping" and method == "GET":
            return Admitted(lambda _: self.ready(), probe="ready")
        if (m := _V1_READY.match(path)) and method == "GET":
            return Admitted(lambda _: self.v1_ready(m.group(1)), probe="ready")
        if not self.authorized(headers):
            return _json(401, {"code": 401, "message": "missing or invalid inference token"})
        content_type = headers.get("content-type", "application/json")
        if method == "POST" and _PREDICT.match(path):
            return Admitted(lambda body: self.forward("POST", path, body, content_type), reads_body=True)
        if method == "POST" and (m := _V1_PREDICT.match(path)):
            if not _is_json(content_type):
                return _json(415, {"code": 415, "message": f"Content-Type must be application/json, got {content_type!r}"})
            return Admitted(lambda body: self.v1_predict(m.group(1), body), reads_body=True)
        return _json(404, {"code": 404, "message": f"no route {method} {path}"})

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        decision = self.admit(method, path, headers)
        return decision if isinstance(decision, Reply) else decision.answer(body)

    def v1_ready(self, model: str) -> Reply:
        up = self.ready()
        return _json(200 if up.status == 200 else 503, {"name": model, "ready": up.status == 200})

    def livez(self) -> Reply:
        """Alive: the child runs and, once it has started (key file written), accepts connections."""
        if not self.child_alive():
            return _json(503, {"status": "model server exited"})
        if self.keys.get() is not None:
            try:
                socket.create_connection((self.upstream.hostname, self.upstream.port), timeout=2).close()
            except OSError as e:
                return _json(503, {"status": f"model server not accepting connections: {type(e).__name__}"})
        return _json(200, {"status": "alive"})

    def v1_predict(self, model: str, body: bytes) -> Reply:
        """KServe v1: {"instances": [request, ...]} -> {"predictions": [answer, ...]}, each
        instance's answer or its error object in place, as the KServe model server answers."""
        try:
            instances = json.loads(body).get("instances")
        except (ValueError, AttributeError, RecursionError):  # RecursionError: deeply nested JSON
            instances = None
        if not isinstance(instances, list):
            return _json(400, {"code": 400, "message": "instances: expected {\"instances\": [request, ...]}"})
        if len(instances) > MAX_INSTANCES:
            return _json(413, {"code": 413, "message": f"instances: {len(instances)} is over the limit of {MAX_INSTANCES}"})
        try:
            bodies = [json.dumps(inst).encode() for inst in instances]
        except RecursionError:
            return _json(400, {"code": 400, "message": "instances: nested too deeply"})
        return _json(200, {"predictions": [self._instance(model, data) for data in bodies]})

    def _instance(self, model: str, data: bytes) -> dict:
        r = self.forward("POST", f"/predictions/{model}", data)
        try:
            answer = json.loads(r.body)
        except ValueError:
            answer = None
        if r.status == 200 and isinstance(answer, dict):
            return answer
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            return answer  # the handler's own error, naming the field
        message = "the model server answered with something other than JSON" if answer is None else (
            str(answer.get("message", answer)) if isinstance(answer, dict) else str(answer))
        return {"error": {"status": r.status if r.status != 200 else 502, "field": "body", "message": message[:500]}}

    # -- TorchServe side ---------------------------------------------------------------
    def _conn(self, target) -> http.client.HTTPConnection:
        conns = self._local.__dict__.setdefault("conns", {})
        key = (target.hostname, target.port)
        if key not in conns:
            conns[key] = http.client.HTTPConnection(target.hostname, target.port, timeout=self.timeout_s)
        return conns[key]

    def _send(self, target, method: str, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        for attempt in (0, 1):  # a kept-alive connection may have been closed by TorchServe
            conn = self._conn(target)
            try:
                conn.request(method, path, body=body or None, headers=headers)
                r = conn.getresponse()
                return Reply(r.status, r.read(), r.getheader("Content-Type", "application/json"))
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                conn.close()
                self._local.conns.pop((target.hostname, target.port), None)
                if attempt:
                    return _json(503, {"code": 503, "message": f"model server unreachable: {type(e).__name__}"})
        raise AssertionError("unreachable")

    def _key(self, kind: str = "inference", force: bool = False) -> str | None:
        keys = self.keys.get(force)
        if keys and keys[kind][1] and keys[kind][1] <= datetime.now(timezone.utc):
            self.refresh_key(kind)
            keys = self.keys.get(True)
        return keys[kind][0] if keys else None

    def refresh_key(self, kind: str = "inference", rejected: str | None = None) -> None:
        """Ask TorchServe for a new inference or management key (its token API, with the API key).

        Called when the key file says the key expired, or with `rejected` when TorchServe
        refused a key (clock edge, rotation): then it refreshes unless another thread already did.
        """
        with self._refresh_lock:
            keys = self.keys.get(True)
            if not keys:
                return
            key, expires = keys[kind]
            if rejected is not None:
                if key != rejected:
                    return  # already replaced since the rejected request
            elif expires is None or expires > datetime.now(timezone.utc):
                return  # another thread refreshed it already
            self._send(self.management, "POST", f"/token?type={kind}", b"",
                       {"Authorization": f"Bearer {keys['api']}"})

    def _call(self, target, kind: str, method: str, path: str, body: bytes, content_type: str) -> Reply:
        key = self._key(kind)
        if key is None:
            return _json(503, {"code": 503, "message": "model server is starting (no key file yet)"})
        headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
        reply = self._send(target, method, path, body, headers)
        if _rejected_key(reply):
            self.refresh_key(kind, rejected=key)  # expired or rotated under us: one retry with a fresh key
            headers["Authorization"] = f"Bearer {self._key(kind, force=True)}"
            reply = self._send(target, method, path, body, headers)
        return reply

    def forward(self, method: str, path: str, body: bytes, content_type: str = "application/json") -> Reply:
        return self._call(self.upstream, "inference", method, path, body, content_type)

    def ready(self) -> Reply:
        """TorchServe's /ping, and at least one worker of the model READY.

        TorchServe 0.12 answers /ping "Healthy" as soon as workers are *started*, before they
        have loaded the model; routing traffic then gets 503s. The management API's model
        description says when a worker is READY.
        """
        ping = self.forward("GET", "/ping", b"")
        if ping.status != 200:
            return ping
        desc = self._call(self.management, "management", "GET", f"/models/{self.model}", b"", "application/json")
        try:
            workers = [w for m in json.loads(desc.body) for w in m.get("workers", [])] if desc.status == 200 else []
        except (ValueError, AttributeError, TypeError):
            workers = []
        ready = sum(w.get("status") == "READY" for w in workers)
        if not ready:
            return _json(503, {"status": "Unhealthy", "message": f"model {self.model}: no worker READY yet",
                               "workers": [w.get("status") for w in workers]})
        return _json(200, {"status": "Healthy", "ready_workers": ready})


# -- HTTP side: uvicorn ------------------------------------------------------------------------


def _head_timed_protocol(head_timeout_s: float, after_answer_s: float | None = None,
                         body_timeout_s: float | None = None):
    """uvicorn's h11 protocol with a deadline on request heads, and on bodies when given.

    uvicorn times out idle kept-alive connections but not a head that arrives slowly: without
    this, a client sending a header byte now and then holds its connection forever. The deadline
    runs from the connection to the end of the first head, and from each answer to the end of
    the next head (`after_answer_s`, default the same: a server keeping connections alive
    longer gives them that long). `body_timeout_s`: a body not whole that long after its head
    closes the connection too (for an app that reads bodies itself, as KServe's does; the
    gateway's own app answers a 408 instead).
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _body_deadline: asyncio.TimerHandle | None = None

        def _arm(self, timeout_s: float = head_timeout_s) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            waiting_for = self.cycle  # a new head replaces the cycle
            self._deadline = self.loop.call_later(timeout_s, self._expire, waiting_for)

        def _expire(self, waiting_for) -> None:
            if self.cycle is waiting_for and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            cycle = self.cycle
            if self._body_deadline is not None and not getattr(cycle, "more_body", False):
                self._body_deadline.cancel()  # that body is whole (or a new one began whole)
                self._body_deadline = None
            if body_timeout_s is not None and cycle is not before and getattr(cycle, "more_body", False):
                if self._body_deadline is not None:
                    self._body_deadline.cancel()
                self._body_deadline = self.loop.call_later(body_timeout_s, self._body_expired, cycle)

        def _body_expired(self, cycle) -> None:
            if self.cycle is cycle and cycle.more_body and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            self._arm(head_timeout_s if after_answer_s is None else after_answer_s)
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            for timer in (self._deadline, self._body_deadline):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

    return HeadTimedH11


def head_bytes(scope) -> int:
    """About the size of a request head as sent: its request line and header lines."""
    line = len(scope["method"]) + len(scope["raw_path"]) + len(scope.get("query_string", b"")) + 12
    return line + sum(len(k) + len(v) + 4 for k, v in scope["headers"])


async def _respond(send, reply: Reply, close: bool = False) -> None:
    headers = [(b"content-type", reply.content_type.encode("latin-1")),
               (b"content-length", str(len(reply.body)).encode())]
    if close:  # uvicorn closes after the answer; any unread body is never read
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _read_body(receive, length: int) -> bytes | None:
    """The body, or None when the client went away. Stops at `length` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > length:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class GatewayApp:
    """The ASGI application: admit from the head, then read the body (bounded in size and
    time), then answer in the upstream thread pool."""

    def __init__(self, gateway: Gateway, limits: Limits = Limits()):
        self.gateway, self.limits = gateway, limits
        self.pool = ThreadPoolExecutor(max_workers=limits.upstream_threads, thread_name_prefix="gateway-upstream")
        # liveness apart from readiness too: readiness waits on TorchServe, which may stall
        self.probes = {"live": ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-live"),
                       "ready": ThreadPoolExecutor(max_workers=2, thread_name_prefix="gateway-ready")}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if head_bytes(scope) > self.limits.max_head:
            # h11 bounds only a head that arrives in pieces; one sent in a single write is whole at once
            return await _respond(send, _json(431, {"code": 431, "message": f"request head over {self.limits.max_head} "
                                                                            "bytes"}), close=True)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["raw_path"].decode("latin-1")
        decision = self.gateway.admit(scope["method"], path, headers)
        sends_body = "transfer-encoding" in headers or headers.get("content-length", "0") not in ("", "0")
        if isinstance(decision, Reply):
            return await _respond(send, decision, close=sends_body or decision.status >= 400)
        body = b""
        if decision.reads_body:
            refusal, length = self._length(headers)
            if refusal is not None:
                return await _respond(send, refusal, close=True)
            if length:
                try:
                    async with asyncio.timeout(self.limits.body_timeout_s):
                        body = await _read_body(receive, length)
                except TimeoutError:
                    return await _respond(send, _json(408, {"code": 408, "message": (
                        f"body not received within {self.limits.body_timeout_s:g} s")}), close=True)
                if body is None:
                    return await _respond(send, _json(400, {"code": 400, "message": "incomplete body"}), close=True)
        pool = self.probes[decision.probe] if decision.probe else self.pool
        reply = await asyncio.get_running_loop().run_in_executor(pool, decision.answer, body)
        await _respond(send, reply, close=sends_body and not decision.reads_body)

    def close(self) -> None:
        """Drop what waits in the thread pools (the server has stopped taking requests)."""
        for pool in (self.pool, *self.probes.values()):
            pool.shutdown(wait=False, cancel_futures=True)

    def _length(self, headers: dict[str, str]) -> tuple[Reply | None, int]:
        limit = self.limits.max_body
        if "transfer-encoding" in headers:
            return _json(411, {"code": 411, "message": f"send a Content-Length body of at most {limit} bytes"}), 0
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if length > limit:
            return _json(413, {"code": 413, "message": f"{length} bytes is over the limit of {limit}"}), 0
        if length < 0:
            return _json(400, {"code": 400, "message": "Content-Length: not a number of bytes"}), 0
        return None, length


def make_server(gateway: Gateway, host: str, port: int, limits: Limits = Limits()) -> "GatewayServer":
    return GatewayServer(gateway, host, port, limits)


class GatewayServer:
    """uvicorn serving a `GatewayApp` on a socket bound here (so port 0 works and the backlog is ours).

    `serve_forever()` blocks (in the main thread uvicorn handles SIGTERM/SIGINT); `start()` runs
    it in a daemon thread; `shutdown()` stops it and waits.
    """

    def __init__(self, gateway: Gateway, host: str, port: int, limits: Limits = Limits()):
        import uvicorn

        self.limits, self.app = limits, GatewayApp(gateway, limits)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=limits.backlog)
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            self.app, http=_head_timed_protocol(limits.head_timeout_s), lifespan="off", log_config=None,
            access_log=False, backlog=limits.backlog, limit_concurrency=limits.max_connections,
            timeout_keep_alive=5, timeout_graceful_shutdown=10, h11_max_incomplete_event_size=limits.max_head,
            server_header=False, ws="none")
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self) -> "GatewayServer":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="gateway")
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        self.app.close()
        self.socket.close()


# -- the container's process: gateway + TorchServe ----------------------------------------------


def _log_to(log_file: Path | None, max_bytes: int = 10 * 2**20) -> None:
    """Gateway and uvicorn warnings to stderr (the container log, rotated by the kubelet) or to
    a size-rotated file (+ 3 old ones). Access lines are not logged: TorchServe's access_log has them."""
    handler: logging.Handler = (logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=3)
                                if log_file else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s - %(message)s"))
    for name, level in (("unipinrec.gateway", logging.INFO), ("uvicorn", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def run(listen: str, upstream: str, management: str, key_file: Path, token_file: Path,
        command: list[str], grace_s: float = 25.0, model: str = "unipinrec", limits: Limits = Limits()) -> int:
    """Start `command` (TorchServe) in its own process group; serve until it exits or SIGTERM.

    Exit status: 0 after SIGTERM/SIGINT (the child is stopped with SIGTERM, then SIGKILL after
    `grace_s`); the child's status (or 1) when the child exits on its own, so the kubelet
    restarts the container.
    """
    child = subprocess.Popen(command, start_new_session=True) if command else None
    gateway = Gateway(upstream, management, key_file, token_file,
                      child_alive=lambda: child is None or child.poll() is None, model=model)
    host, _, port = listen.rpartition(":")
    server = make_server(gateway, host.strip("[]") or "0.0.0.0", int(port), limits)
    signalled = threading.Event()

    def on_signal(*_) -> None:  # uvicorn restores this handler and re-raises the signal it caught
        signalled.set()
        server.server.should_exit = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watcher = None
    if child is not None:
        def watch() -> None:
            child.wait()
            log.warning("model server exited with status %s", child.returncode)
            server.server.should_exit = True
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    log.info("listening on %s, forwarding to %s", listen, upstream)
    server.serve_forever()
    server.app.close()
    if child is None:
        return 0
    _stop_group(child, grace_s)
    if watcher is not None:
        watcher.join(5)  # a daemon thread writing to stderr during interpreter shutdown aborts Python
    return 0 if signalled.is_set() else (child.returncode or 1)


def _stop_group(child: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the child's whole process group (TorchServe's JVM and Python workers), then SIGKILL."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        child.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(child.pid, signal.SIGKILL)  # stragglers (workers) even after the launcher exited
    except ProcessLookupError:
        pass
    child.wait()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m unipinrec.serving.gateway",
                                description="Token gateway in front of TorchServe; runs COMMAND (after --) as the model server.")
    p.add_argument("--listen", default="0.0.0.0:8080")
    p.add_argument("--upstream", default="http://127.0.0.1:8085", help="TorchServe inference address")
    p.add_argument("--management", default="http://127.0.0.1:8081", help="TorchServe management address (token API)")
    p.add_argument("--key-file", type=Path, required=True, help="TorchServe's key_file.json (in its working directory)")
    p.add_argument("--token-file", type=Path, required=True, help="client tokens, one per line (a mounted Secret)")
    p.add_argument("--model", default="unipinrec", help="the model whose READY workers make the pod ready")
    p.add_argument("--log-file", type=Path, help="write the gateway's log here, size-rotated (default: stderr)")
    d = Limits()
    p.add_argument("--max-body", type=int, default=d.max_body, help="bytes; larger bodies get 413 before they are read")
    p.add_argument("--head-timeout", type=float, default=d.head_timeout_s, help="seconds for a request's head")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s, help="seconds for a request's body")
    p.add_argument("--max-connections", type=int, default=d.max_connections)
    p.add_argument("--upstream-threads", type=int, default=d.upstream_threads)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- torchserve --start --foreground ...")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    _log_to(args.log_file)
    limits = Limits(max_body=args.max_body, head_timeout_s=args.head_timeout, body_timeout_s=args.body_timeout,
                    max_connections=args.max_connections, upstream_threads=args.upstream_threads)
    return run(args.listen, args.upstream, args.management, args.key_file, args.token_file, command,
               model=args.model, limits=limits)


if __name__ == "__main__":
    sys.exit(main())

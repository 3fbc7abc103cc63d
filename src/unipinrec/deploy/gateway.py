"""Token gateway in front of TorchServe, and the supervisor that runs both in one container.

Why it exists: TorchServe 0.12 keeps token authorization on (we never disable it), but it
draws fresh random keys in every process, writes them to `key_file.json` in its working
directory, lets the inference key expire (`token_expiration_min`, default 60), and even
`/ping` needs the key. Behind a Service with several replicas no client can hold a key that
every pod accepts, and kubelet probes cannot send one. The gateway fixes that without
weakening anything:

* TorchServe binds inference and management to 127.0.0.1; only the gateway reaches them,
  with the pod's own key read from the key file (refreshed through the management token API
  with the API key when it expires or is rejected).
* Clients send `Authorization: Bearer <token>` (or `X-UniPinRec-Token`, which survives the
  API server's service proxy); tokens come from a mounted Secret file, one per line, re-read
  when the file changes (rotation without restarts), compared in constant time.
* Unauthenticated: `/ping` (readiness: TorchServe's /ping *and* a worker of the model READY,
  from the management API), `/livez` (the gateway and its child process), KServe v1 readiness
  `GET /v1/models/<name>`. Everything else needs a token;
  only prediction paths are forwarded, never management.

Standard library only, so it runs in the serving image with nothing extra.
"""
from __future__ import annotations

import hmac
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

TOKEN_HEADER = "X-UniPinRec-Token"
MAX_BODY = 16 * 1024 * 1024
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # starts alphanumeric: no "..", no traversal to other APIs
_PREDICT = re.compile(rf"^/predictions/{_NAME}(/{_NAME})?$")
_V1_PREDICT = re.compile(rf"^/v1/models/({_NAME}):predict$")
_V1_READY = re.compile(rf"^/v1/models/({_NAME})$")


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"


def _json(status: int, obj) -> Reply:
    return Reply(status, json.dumps(obj).encode())


class _WatchedFile:
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


def _parse_tokens(text: str) -> list[bytes]:
    lines = (line.strip() for line in text.splitlines())
    return [line.encode() for line in lines if line and not line.startswith("#")]


class Gateway:
    """The request logic, separate from the HTTP server so tests can call `handle` directly."""

    def __init__(self, upstream: str, management: str, key_file: Path, token_file: Path,
                 child_alive: Callable[[], bool] = lambda: True, timeout_s: float = 300.0,
                 model: str = "unipinrec"):
        self.upstream, self.management, self.model = urlsplit(upstream), urlsplit(management), model
        self.keys = _WatchedFile(key_file, _parse_keys)
        self.tokens = _WatchedFile(token_file, _parse_tokens)
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

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        path = path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in headers.items()}
        if path == "/livez":
            return self.livez()
        if path == "/ping" and method == "GET":
            return self.ready()
        if (m := _V1_READY.match(path)) and method == "GET":
            up = self.ready()
            return _json(200 if up.status == 200 else 503, {"name": m.group(1), "ready": up.status == 200})
        if not self.authorized(headers):
            return _json(401, {"code": 401, "message": "missing or invalid inference token"})
        if method == "POST" and _PREDICT.match(path):
            return self.forward("POST", path, body, headers.get("content-type", "application/json"))
        if method == "POST" and (m := _V1_PREDICT.match(path)):
            return self.v1_predict(m.group(1), body)
        return _json(404, {"code": 404, "message": f"no route {method} {path}"})

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
        """KServe v1: {"instances": [request, ...]} -> {"predictions": [answer, ...]}."""
        try:
            instances = json.loads(body).get("instances")
        except (ValueError, AttributeError):
            instances = None
        if not isinstance(instances, list):
            return _json(400, {"code": 400, "message": "instances: expected {\"instances\": [request, ...]}"})
        answers = []
        for inst in instances:
            r = self.forward("POST", f"/predictions/{model}", json.dumps(inst).encode())
            if r.status != 200:
                return r
            try:
                answers.append(json.loads(r.body))
            except ValueError:
                return _json(502, {"code": 502, "message": "the model server answered with something other than JSON"})
        return _json(200, {"predictions": answers})

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
        if reply.status in (400, 401) and b"Token Authorization failed" in reply.body:
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "unipinrec-gateway"
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK (about 40 ms per response on Linux).
    disable_nagle_algorithm = True

    server: "GatewayServer"

    def _serve(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if self.headers.get("Transfer-Encoding") or not 0 <= length <= MAX_BODY:
            status = 413 if length > MAX_BODY else (411 if self.headers.get("Transfer-Encoding") else 400)
            reply = _json(status, {"code": status, "message": "send a Content-Length body of at most 16 MiB"})
            self.close_connection = True
        else:
            body = self.rfile.read(length) if length else b""
            reply = self.server.gateway.handle(self.command, self.path, dict(self.headers.items()), body)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def log_message(self, fmt: str, *args) -> None:  # access logs stay in TorchServe's access_log
        pass


class GatewayServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], gateway: Gateway):
        super().__init__(address, _Handler)
        self.gateway = gateway


def make_server(gateway: Gateway, host: str, port: int) -> GatewayServer:
    return GatewayServer((host, port), gateway)


def run(listen: str, upstream: str, management: str, key_file: Path, token_file: Path,
        command: list[str], grace_s: float = 25.0, model: str = "unipinrec") -> int:
    """Start `command` (TorchServe) in its own process group; serve until it exits or SIGTERM.

    Exit status: 0 after SIGTERM/SIGINT (the child is stopped with SIGTERM, then SIGKILL after
    `grace_s`); the child's status (or 1) when the child exits on its own, so the kubelet
    restarts the container.
    """
    child = subprocess.Popen(command, start_new_session=True) if command else None
    gateway = Gateway(upstream, management, key_file, token_file,
                      child_alive=lambda: child is None or child.poll() is None, model=model)
    host, _, port = listen.rpartition(":")
    server = make_server(gateway, host or "0.0.0.0", int(port))
    signalled = threading.Event()

    def stop() -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    def on_signal(*_) -> None:
        signalled.set()
        stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watcher = None
    if child is not None:
        def watch() -> None:
            child.wait()
            print(f"gateway: model server exited with status {child.returncode}", file=sys.stderr, flush=True)
            stop()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    print(f"gateway: listening on {listen}, forwarding to {upstream}", file=sys.stderr, flush=True)
    server.serve_forever(poll_interval=0.5)
    server.server_close()
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

    p = argparse.ArgumentParser(prog="python -m unipinrec.deploy.gateway",
                                description="Token gateway in front of TorchServe; runs COMMAND (after --) as the model server.")
    p.add_argument("--listen", default="0.0.0.0:8080")
    p.add_argument("--upstream", default="http://127.0.0.1:8085", help="TorchServe inference address")
    p.add_argument("--management", default="http://127.0.0.1:8081", help="TorchServe management address (token API)")
    p.add_argument("--key-file", type=Path, required=True, help="TorchServe's key_file.json (in its working directory)")
    p.add_argument("--token-file", type=Path, required=True, help="client tokens, one per line (a mounted Secret)")
    p.add_argument("--model", default="unipinrec", help="the model whose READY workers make the pod ready")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- torchserve --start --foreground ...")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return run(args.listen, args.upstream, args.management, args.key_file, args.token_file, command,
               model=args.model)


if __name__ == "__main__":
    sys.exit(main())

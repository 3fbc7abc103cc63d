"""Reliability benchmark (issue 11): can one client, or one bad request, break serving?

    .venv/bin/python bench/reliability_bench.py --quick    # a few minutes: the same phases, smaller
    .venv/bin/python bench/reliability_bench.py            # >= 10,000 hostile bodies, a 10-minute soak

A real TorchServe (token auth on, 127.0.0.1, a small random-init model; latency and failures do
not depend on what it learned) and the token gateway (`python -m unipinrec.serving.gateway`, no
child). Phases, each one row of the table:

* hostile: generated bad bodies (malformed, mistyped, out of range, NaN, deeply nested, unknown
  items, wrong Content-Type, oversize, 50k-action histories, split-flow abuse with unknown,
  foreign, reused and out-of-range handles and candidates), each sent together with 3 valid
  requests so that TorchServe batches them together. Target: 0 5xx, 0 failed valid requests.
* peak: closed loop, distinct users: the QPS the soak's 80% refers to.
* soak: 80% of peak, paced, distinct users, every 5th request a `retrieve` whose handle is never
  used; worker memory (RSS of the Python workers) sampled every second. Target: 0 errors, peak
  memory within bound + 20%, bound = memory at start + kv_cache_bytes + handle_bytes.
* kill: the worker SIGKILLed during paced load. Target: serving again within 10 s, no request
  lost beyond those in flight at the kill (counted).
* slow clients: the gateway's p99 for authenticated requests with 300 unauthenticated slow
  clients connected (half-sent heads and bodies) against its baseline. Target: < 2x.

Every server binds 127.0.0.1; every loop is bounded by a count or a deadline.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

RTS = 1_800_000_000
ITEM0 = 1000  # unipinrec.serving.synthetic.ITEM_ID_OFFSET
INT64_MAX = 2**63 - 1


# --- HTTP client ------------------------------------------------------------------------------


class Client:
    """One kept-alive connection (http.client) with the headers every request carries."""

    def __init__(self, port: int, headers: dict[str, str], timeout: float = 60.0):
        self.port, self.headers, self.timeout, self.conn = port, headers, timeout, None

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[int | str, bytes]:
        import http.client

        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", path, body=body, headers={**self.headers, "Content-Type": content_type})
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, data
            except (OSError, http.client.HTTPException) as e:
                self.conn.close()
                self.conn = None
                if attempt:
                    return f"conn:{type(e).__name__}", b""
        raise AssertionError("unreachable")


@dataclass
class Tally:
    """Statuses of one phase; `valid_failed` counts valid requests that did not get a 200."""
    statuses: Counter = field(default_factory=Counter)
    valid_failed: int = 0
    degraded: int = 0
    latencies: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status, body: bytes, valid: bool, seconds: float | None = None) -> None:
        with self.lock:
            self.statuses[status] += 1
            if valid and status != 200:
                self.valid_failed += 1
            if status == 200 and b'"degraded"' in body:
                self.degraded += 1
            if seconds is not None:
                self.latencies.append(seconds)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if isinstance(s, int) and s >= 500)

    @property
    def conn_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if isinstance(s, str))


# --- requests ---------------------------------------------------------------------------------


def valid_body(rng: np.random.Generator, user_id: int, num_items: int, L: int, **extra) -> dict:
    from unipinrec.serving.synthetic import random_history

    return {"user_id": user_id, "history": random_history(rng, int(rng.integers(1, L + 1)), num_items), "k": 10,
            "num_candidates": 50, "request_ts": RTS, **extra}


def _deep(n: int) -> bytes:
    return b'{"user_id": 1, "history": ' + b"[" * n + b"]" * n + b"}"


def hostile_body(rng: np.random.Generator, num_items: int, L: int, handles: list[tuple[int, str]]) -> tuple[str, bytes, str]:
    """(kind, body, content type) of one generated bad request."""
    good = valid_body(rng, int(rng.integers(0, 10**6)), num_items, L)
    dumps = json.dumps
    kind = str(rng.choice(["malformed", "types", "ranges", "nan", "nested", "unknown_items", "content_type",
                           "split_flow", "split_flow", "oversize", "long_history"],
                          p=[.12, .15, .17, .06, .04, .08, .08, .14, .14, .01, .01]))
    if kind == "malformed":
        raw = dumps(good).encode()
        choice = int(rng.integers(4))
        return kind, [raw[: int(rng.integers(0, len(raw)))], bytes(rng.integers(0, 256, 64, dtype=np.uint8)),
                      b"", raw + b"}"][choice], "application/json"
    if kind == "types":
        field_, value = [("user_id", "7"), ("user_id", 1.5), ("user_id", True), ("k", "10"), ("history", "x"),
                         ("history", [{"item_id": ITEM0, "action": 1}]), ("history", [{"item_id": 1.0 + ITEM0, "action": 1, "ts": 1}]),
                         ("exclude_seen", "yes"), ("stage", 3), ("zz_unknown", 1)][int(rng.integers(10))]
        return kind, dumps({**good, field_: value}).encode(), "application/json"
    if kind == "ranges":
        big = [INT64_MAX + 1, 2**64, 10**30, -1, -(2**63) - 1][int(rng.integers(5))]
        target = int(rng.integers(5))
        if target == 0:
            good["user_id"] = big
        elif target == 1:
            good["k"] = big
        elif target == 2:
            good["num_candidates"] = big
        else:
            good["history"][0]["ts" if target == 3 else "item_id"] = big
        return kind, dumps(good).encode(), "application/json"
    if kind == "nan":
        return kind, b'{"user_id": 1, "k": NaN, "history": [{"item_id": 1001, "action": 1, "ts": Infinity}]}', "application/json"
    if kind == "nested":
        return kind, _deep(int(rng.choice([1000, 20_000, 200_000]))), "application/json"
    if kind == "unknown_items":
        good["history"][-1]["item_id"] = ITEM0 + num_items + int(rng.integers(1, 10**6))
        return kind, dumps(good).encode(), "application/json"
    if kind == "content_type":
        ct = str(rng.choice(["text/plain", "application/jsonx", "application/xml", "application/x-www-form-urlencoded"]))
        return kind, dumps(good).encode(), ct
    if kind == "oversize":
        return kind, b'{"user_id": 1, "pad": "' + b"x" * (5 * 2**20) + b'"}', "application/json"
    if kind == "long_history":
        from unipinrec.serving.synthetic import random_history

        good["history"] = random_history(rng, 50_000, num_items)
        return kind, dumps(good).encode(), "application/json"
    return "split_flow", dumps(_split_flow_abuse(rng, good, handles)).encode(), "application/json"


def _split_flow_abuse(rng, good: dict, handles: list[tuple[int, str]]) -> dict:
    user, handle = handles[int(rng.integers(len(handles)))] if handles else (1, "none")
    case = int(rng.integers(7))
    if case == 0:
        return {"user_id": user, "stage": "rank", "handle": "not-a-handle"}
    if case == 1:
        return {"user_id": user + 1, "stage": "rank", "handle": handle}  # another user's handle
    if case == 2:
        return {"user_id": user, "stage": "rank", "handle": handle, "candidates": [INT64_MAX + 1]}  # finding 1
    if case == 3:
        return {"user_id": user, "stage": "rank", "handle": handle, "candidates": [-5, "x"]}
    if case == 4:
        return {"user_id": user, "stage": "rank", "handle": "h\r\nX-Injected: 1"}
    if case == 5:
        return {"user_id": user, "stage": "rank"}  # no handle
    return {**good, "stage": "retrieve", "handle": "client-chosen"}


# --- the servers ------------------------------------------------------------------------------


@dataclass
class Stack:
    info: object            # unipinrec.serving.torchserve.ServerInfo
    port: int               # TorchServe inference
    key: str                # its inference key
    gateway: subprocess.Popen | None = None
    gateway_port: int = 0
    token: str = "bench-token"
    engine: dict = field(default_factory=dict)


def start_stack(work: Path, args) -> Stack:
    from unipinrec.index import build_index_for_model
    from unipinrec.serving import torchserve as ts
    from unipinrec.serving.synthetic import make_model_dir

    make_model_dir(work / "model", num_items=args.items, max_history=args.L, d_model=args.d_model, seed=0)
    build_index_for_model(work / "model", work / "index", num_queries=50)
    engine = {"kv_cache_bytes": args.kv_cache_mb * 2**20, "handle_bytes": args.handle_mb * 2**20}
    ts.build_archive(work / "model", work / "index", work / "store", engine=engine, torch_threads=1)
    ports = (ts.free_port(), ts.free_port(), ts.free_port())
    info = ts.start(work / "store", work / "run", ports=ports, token_auth=True, timeout_s=240)
    key = json.loads((work / "run" / "key_file.json").read_text())["inference"]["key"]
    return Stack(info, ports[0], key, engine=engine)


def start_gateway(stack: Stack, work: Path) -> None:
    from unipinrec.serving.torchserve import free_port

    (work / "token").write_text(stack.token + "\n")
    stack.gateway_port = free_port()
    cmd = [sys.executable, "-m", "unipinrec.serving.gateway", f"--listen=127.0.0.1:{stack.gateway_port}",
           f"--upstream={stack.info.inference}", f"--management={stack.info.management}",
           f"--key-file={work / 'run' / 'key_file.json'}", f"--token-file={work / 'token'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    stack.gateway = subprocess.Popen(cmd, env=env, stdout=open(work / "gateway.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"gateway did not start: {(work / 'gateway.log').read_text()[-2000:]}")


def workers(stack: Stack) -> list:
    import psutil

    try:
        kids = psutil.Process(stack.info.pid).children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in kids if "model_service_worker" in " ".join(p.cmdline())]


def worker_rss_mb(stack: Stack) -> float:
    total = 0
    for p in workers(stack):
        try:
            total += p.memory_info().rss
        except Exception:  # noqa: BLE001  (a worker that just exited)
            pass
    return total / 2**20


def wait_worker_ready(stack: Stack, timeout_s: float = 120.0) -> float:
    """Seconds until the management API lists a READY worker again."""
    import urllib.request

    keys = json.loads((Path(stack.info.run_dir) / "key_file.json").read_text())
    req = urllib.request.Request(f"{stack.info.management}/models/unipinrec",
                                 headers={"Authorization": f"Bearer {keys['management']['key']}"})
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                if any(w.get("status") == "READY" for m in json.loads(r.read()) for w in m.get("workers", [])):
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no READY worker after {timeout_s:.0f} s")


def ts_client(stack: Stack) -> Client:
    return Client(stack.port, {"Authorization": f"Bearer {stack.key}"})


# --- phases -----------------------------------------------------------------------------------

PREDICT = "/predictions/unipinrec"


@dataclass
class Row:
    phase: str
    tally: Tally
    memory: tuple | None = None    # (start, peak, end, bound) MB
    recovery_s: float | None = None
    note: str = ""
    ok: bool = True


def phase_hostile(stack: Stack, args, rng) -> Row:
    """Each hostile body in a group with 3 valid requests, the 4 sent at once (one TorchServe batch)."""
    bad, good = Tally(), Tally()
    kinds: Counter = Counter()
    failing: Counter = Counter()  # hostile kinds answered 5xx, or whose batch-mates failed
    group_kind = {}
    clients = [ts_client(stack) for _ in range(4)]
    handles: list[tuple[int, str]] = []
    uid = iter(range(2_000_000, 3_000_000))

    def send(i: int, item):
        kind, body, ct = item
        t = time.perf_counter()
        status, data = clients[i].post(PREDICT, body, ct)
        (good if kind == "valid" else bad).add(status, data, kind == "valid", time.perf_counter() - t)
        if not isinstance(status, int) or status >= 500:
            failing[f"{group_kind['kind']}{'' if kind != 'valid' else ' (batch-mate)'}"] += 1
        if kind == "valid" and status == 200 and b'"handle"' in data:
            handles.append((json.loads(body)["user_id"], json.loads(data)["handle"]))

    with ThreadPoolExecutor(4) as pool:
        for n in range(args.hostile):
            kind, body, ct = hostile_body(rng, args.items, args.L, handles[-64:])
            kinds[kind] += 1
            group_kind["kind"] = kind
            valid = []
            for j in range(3):  # one of them a retrieve: real handles for the split-flow abuse
                extra = {"stage": "retrieve"} if j == 0 and n % 4 == 0 else {}
                valid.append(("valid", json.dumps(valid_body(rng, next(uid), args.items, args.L, **extra)).encode(),
                              "application/json"))
            list(pool.map(send, range(4), [(kind, body, ct), *valid]))
    row = Row("hostile", bad, note=f"{args.hostile} bad + {good.total} valid co-batched; valid failed "
                                   f"{good.valid_failed} ({dict(good.statuses)}); kinds {dict(kinds)}; "
                                   f"5xx or connection errors by hostile kind: {dict(failing) or 'none'}")
    row.tally.valid_failed = good.valid_failed
    row.tally.degraded = good.degraded
    row.ok = bad.server_errors == 0 and bad.conn_errors == 0 and good.valid_failed == 0
    return row


def _paced(stack: Stack, qps: float, seconds: float, threads: int, body_for, on_done=None) -> Tally:
    """Open loop: request i is due at start + i / qps; `threads` clients send what is due."""
    tally, lock, counter = Tally(), threading.Lock(), iter(range(10**9))
    start, n_max = time.monotonic(), int(qps * seconds)

    def loop():
        client = ts_client(stack)
        while True:
            with lock:
                i = next(counter)
            if i >= n_max:
                return
            due = start + i / qps
            time.sleep(max(0.0, due - time.monotonic()))
            body, valid = body_for(i)
            t0 = time.monotonic()
            status, data = client.post(PREDICT, body)
            t1 = time.monotonic()
            tally.add(status, data, valid, t1 - t0)
            if on_done:
                on_done(t0, t1, status)

    ts_ = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in ts_:
        t.start()
    for t in ts_:
        t.join(seconds + 120)
    return tally


def phase_peak(stack: Stack, args, rng) -> tuple[Row, float]:
    bodies = [json.dumps(valid_body(rng, 3_000_000 + i, args.items, args.L)).encode() for i in range(2000)]
    tally, stop = Tally(), time.monotonic() + args.peak_s
    counter, lock = iter(range(10**9)), threading.Lock()

    def loop():
        client = ts_client(stack)
        while time.monotonic() < stop:
            with lock:
                i = next(counter)
            t = time.perf_counter()
            status, data = client.post(PREDICT, bodies[i % len(bodies)])
            tally.add(status, data, True, time.perf_counter() - t)

    t0 = time.monotonic()
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.peak_s + 120)
    qps = tally.statuses[200] / (time.monotonic() - t0)
    return Row("peak", tally, note=f"{qps:.0f} QPS with {args.clients} closed-loop clients",
               ok=tally.valid_failed == 0), qps


def phase_soak(stack: Stack, args, rng, peak_qps: float) -> Row:
    qps = 0.8 * peak_qps
    samples, done = [], threading.Event()

    def sample():
        while not done.wait(1.0):
            samples.append(worker_rss_mb(stack))

    start_mb = worker_rss_mb(stack)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seeds = np.random.default_rng(int(rng.integers(2**31)))
    lock = threading.Lock()

    def body_for(i):
        with lock:  # distinct users; every 5th a retrieve whose handle is never used
            b = valid_body(seeds, 10_000_000 + i, args.items, args.L, **({"stage": "retrieve"} if i % 5 == 0 else {}))
        return json.dumps(b).encode(), True

    tally = _paced(stack, qps, args.soak_s, args.clients, body_for)
    done.set()
    sampler.join(5)
    end_mb = worker_rss_mb(stack)
    bound = start_mb + (stack.engine["kv_cache_bytes"] + stack.engine["handle_bytes"]) / 2**20
    peak_mb = max(samples + [start_mb, end_mb])
    ok = tally.valid_failed == 0 and peak_mb <= 1.2 * bound
    return Row("soak", tally, (start_mb, peak_mb, end_mb, bound), ok=ok,
               note=f"{qps:.0f} QPS (80% of peak) for {args.soak_s:.0f} s, {tally.total} distinct users, "
                    f"{tally.total // 5} abandoned handles")


def phase_kill(stack: Stack, args, rng, peak_qps: float) -> Row:
    """SIGKILL the worker a third into a paced load; recovery = kill to the first 200 of a request sent after it."""
    events, lock = [], threading.Lock()
    seeds = np.random.default_rng(int(rng.integers(2**31)))
    kill_at = {"t": None}

    def body_for(i):
        with lock:
            return json.dumps(valid_body(seeds, 20_000_000 + i, args.items, args.L)).encode(), True

    def on_done(t0, t1, status):
        with lock:
            events.append((t0, t1, status))

    def killer():
        time.sleep(args.kill_s / 3)
        victims = workers(stack)
        kill_at["t"] = time.monotonic()
        for p in victims:
            os.kill(p.pid, signal.SIGKILL)

    k = threading.Thread(target=killer, daemon=True)
    k.start()
    tally = _paced(stack, 0.5 * peak_qps, args.kill_s, args.clients, body_for, on_done)
    k.join(5)
    wait_worker_ready(stack)
    t_kill = kill_at["t"]
    in_flight = sum(1 for t0, t1, _ in events if t0 <= t_kill <= t1)
    failed = sum(1 for _, _, s in events if s != 200)
    after = sorted(t1 for t0, t1, s in events if t0 >= t_kill and s == 200)
    recovery = (after[0] - t_kill) if after else None
    ok = recovery is not None and recovery <= 10 and failed <= in_flight
    return Row("kill", tally, recovery_s=recovery, ok=ok,
               note=f"{in_flight} in flight at the kill, {failed} failed (lost beyond in flight: "
                    f"{max(0, failed - in_flight)})")


def _slow_sockets(port: int, n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 6 == 5:  # a big unauthenticated body, half sent
            s.sendall(b"POST /predictions/unipinrec HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 16000000\r\n\r\n" + b"x" * 65536)
        else:  # a head that never ends
            s.sendall(b"POST /predictions/unipinrec HTTP/1.1\r\nHost: x\r\nContent-Le")
        socks.append(s)
    return socks


def _closed_by_peer(s: socket.socket) -> bool:
    """True when the server closed it (after a 401, or at the head timeout); closes it here too."""
    s.settimeout(0.5)
    try:
        while chunk := s.recv(1 << 16):
            del chunk
        return True
    except OSError:
        return False
    finally:
        s.close()


def phase_slow_clients(stack: Stack, args, rng, work: Path) -> Row:
    import psutil

    start_gateway(stack, work)
    gw = psutil.Process(stack.gateway.pid)
    client = Client(stack.gateway_port, {"Authorization": f"Bearer {stack.token}"})
    bodies = [json.dumps(valid_body(rng, 30_000_000 + i, args.items, args.L)).encode() for i in range(args.slow_n)]

    def p99(tally: Tally) -> float:
        for b in bodies:
            t = time.perf_counter()
            status, data = client.post(PREDICT, b)
            tally.add(status, data, True, time.perf_counter() - t)
        return float(np.percentile(tally.latencies[-len(bodies):], 99))

    base = Tally()
    p99(base)  # warm-up
    base_p99 = p99(base)
    mem0, threads0 = gw.memory_info().rss / 2**20, gw.num_threads()
    socks = _slow_sockets(stack.gateway_port, 300)
    time.sleep(1.0)  # measure while they are connected, not while they connect (about 80 ms once)
    loaded = Tally()
    loaded_p99 = p99(loaded)
    mem1, threads1 = gw.memory_info().rss / 2**20, gw.num_threads()
    time.sleep(11)  # past the gateway's head timeout (10 s)
    closed = sum(_closed_by_peer(s) for s in socks)
    ok = loaded.valid_failed == 0 and loaded_p99 < 2 * base_p99
    return Row("slow clients", loaded, (mem0, mem1, gw.memory_info().rss / 2**20, None), ok=ok,
               note=f"gateway p99 {base_p99 * 1e3:.1f} ms alone, {loaded_p99 * 1e3:.1f} ms with 300 slow clients "
                    f"(x{loaded_p99 / base_p99:.2f}); threads {threads0} -> {threads1}; "
                    f"{closed}/300 slow connections answered or closed by the gateway after 11 s")


# --- the table --------------------------------------------------------------------------------


def render(rows: list[Row]) -> str:
    head = ["phase", "requests", "by status", "5xx", "conn err", "valid failed", "memory MB start/peak/end (bound)",
            "recovery s", "degraded", "target"]
    lines = []
    for r in rows:
        t = r.tally
        statuses = ", ".join(f"{k}:{v}" for k, v in sorted(t.statuses.items(), key=lambda kv: str(kv[0])))
        mem = ""
        if r.memory:
            start, peak, end, bound = r.memory
            mem = f"{start:.0f}/{peak:.0f}/{end:.0f}" + (f" ({bound:.0f}, +20%: {1.2 * bound:.0f})" if bound else "")
        rec = "" if r.recovery_s is None else f"{r.recovery_s:.1f}"
        lines.append([r.phase, str(t.total), statuses, str(t.server_errors), str(t.conn_errors), str(t.valid_failed),
                      mem, rec, str(t.degraded), "met" if r.ok else "NOT met"])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(x, widths)) for x in lines]
    out += ["", *(f"{r.phase}: {r.note}" for r in rows if r.note)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the same phases, small: a few minutes")
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--L", type=int, default=64, help="max_history of the model")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--kv-cache-mb", type=int, default=32)
    p.add_argument("--handle-mb", type=int, default=32)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--hostile", type=int, default=10_000, help="hostile bodies (each with 3 valid companions)")
    p.add_argument("--soak-s", type=float, default=600.0)
    p.add_argument("--peak-s", type=float, default=20.0)
    p.add_argument("--kill-s", type=float, default=30.0)
    p.add_argument("--slow-n", type=int, default=300, help="authenticated requests measured per gateway run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.hostile, args.soak_s, args.peak_s, args.kill_s, args.slow_n = 400, 20.0, 5.0, 12.0, 200
    rng = np.random.default_rng(args.seed)
    from unipinrec.serving import torchserve as ts

    with tempfile.TemporaryDirectory(prefix="unipinrec-reliability-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        stack = start_stack(work, args)
        rows = []
        try:
            print(f"TorchServe up in {time.monotonic() - t0:.0f} s (token auth on); running phases ...", flush=True)
            rows.append(phase_hostile(stack, args, rng))
            peak_row, peak_qps = phase_peak(stack, args, rng)
            rows += [peak_row, phase_soak(stack, args, rng, peak_qps), phase_kill(stack, args, rng, peak_qps),
                     phase_slow_clients(stack, args, rng, work)]
        finally:
            if stack.gateway is not None:
                stack.gateway.terminate()
                stack.gateway.wait(30)
            ts.stop(work / "run")
    print(f"reliability_bench{' --quick' if args.quick else ''}: model items={args.items} L={args.L} "
          f"d={args.d_model}; kv_cache {args.kv_cache_mb} MB, handles {args.handle_mb} MB; {args.clients} clients\n")
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps([{"phase": r.phase, "statuses": {str(k): v for k, v in r.tally.statuses.items()},
                                          "valid_failed": r.tally.valid_failed, "memory_mb": r.memory,
                                          "recovery_s": r.recovery_s, "degraded": r.tally.degraded, "ok": r.ok,
                                          "note": r.note} for r in rows], indent=2))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

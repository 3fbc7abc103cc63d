"""Serving benchmark: cross-stage KV sharing against re-encoding and against two models.

    # CPU, real TorchServe over HTTP, concurrent clients (headline: L=2048, C=256, d=256, 4 layers)
    .venv/bin/python bench/serving_bench.py http --quick
    # the same archives on KServe's model server too, rounds interleaved in one run
    .venv/bin/python bench/serving_bench.py http --quick --runtime torchserve kserve
    .venv/bin/python bench/serving_bench.py http                 # the grid L x C
    # in-process engine (the GPU when there is one; exact torch top-K instead of faiss)
    python bench/serving_bench.py inprocess --device cuda
    # the item index: ANN recall@100 against exact on a 1M-item synthetic catalog
    .venv/bin/python bench/serving_bench.py ann --items 1000000

Modes: (a) unified, one encode, ranking on the same KV cache; (b) unified, the history encoded
again for ranking; (c) two models (retrieval-only + ranking-only), each encoding the history.
Weights are random (latency does not depend on what they learned). FLOPs per request come
from torch.utils.flop_counter on the in-process engine (faiss work is not counted; it is tiny
next to the transformer here). (d) measures the cross-request KV cache: the same user again
(hit) and with 8 actions appended (extend) against a cold encode (miss). With `--runtime`, each
runtime also reports its p50 overhead over the in-process engine: (a) with one client, the same
bodies, HTTP against `Engine.handle`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

MODES = {"a": "unified, KV shared", "b": "unified, re-encode", "c": "two models"}
ARCHIVES = {"a": "unipinrec", "b": "unipinrec_recompute", "c": "unipinrec_baseline", "d": "unipinrec_kv",
            "f": "floor"}
# (f) TorchServe's own floor: the same bodies, clients and settings, a handler that answers a fixed
# response without the engine (TorchServe still decodes the JSON body); what any mode pays on top
FLOOR = {"f": "floor: no engine"}
FLOOR_HANDLER = '''"""The floor of the HTTP bench: TorchServe's own path, a fixed answer, no engine."""
ANSWER = {"items": [{"item_id": i, "score": 0.0} for i in range(20)], "timings_ms": {"total": 0.0}}


def handle(data, ctx):
    return None if data is None else [ANSWER for _ in data]
'''
HEADLINE = (2048, 256)
RTS = 1_800_000_000
TARGET_QPS_RATIO, TARGET_P50_RATIO, TARGET_EFFICIENCY = 1.64, 0.75, 0.90


# --- models and requests --------------------------------------------------------------------------


def make_models(work: Path, L: int, args) -> dict:
    from unipinrec.serving.synthetic import make_model_dir

    shape = dict(num_items=args.items, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, max_history=L)
    paths = {"unified": work / "unified", "retrieval": work / "retrieval", "ranking": work / "ranking"}
    make_model_dir(paths["unified"], kind="unified", seed=0, **shape)
    make_model_dir(paths["retrieval"], kind="retrieval_only", seed=1, **shape)
    make_model_dir(paths["ranking"], kind="ranking_only", seed=2, **shape)
    return paths


def make_bodies(n: int, L: int, C: int, num_items: int, seed: int, first_user: int = 0) -> list[dict]:
    from unipinrec.serving.synthetic import random_history

    rng = np.random.default_rng(seed)
    return [{"user_id": first_user + i, "history": random_history(rng, L, num_items), "k": 20, "num_candidates": C,
             "request_ts": RTS} for i in range(n)]


def payload(body: dict, args) -> bytes:
    """The JSON a client sends: the history as a list of actions, or columnar (`--history-form`)."""
    return json.dumps(columnar(body) if args.history_form == "columnar" else body).encode()


def _register_cpu_sdpa_flops() -> None:
    """torch's flop counter knows the CUDA attention kernels but not the CPU flash kernel that
    scaled_dot_product_attention uses here; count it like the others (full N x M: with an
    explicit mask the kernel does compute every block)."""
    import torch
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in fc.flop_registry and op.default not in fc.flop_registry:
        def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

        fc.register_flop_formula([op])(cpu_sdpa)


def flops_per_request(engine, body: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_flops()
    engine.handle(body)  # warm
    with FlopCounterMode(display=False) as counter:
        engine.handle(body)
    return float(counter.get_total_flops())


def engines(paths: dict, index_dirs: dict | None, device: str = "cpu", torch_index: bool = False,
            graph_warmup: tuple = (), **config) -> dict:
    """The three modes in-process (kv cache off: every request is a new user anyway); on CUDA
    the graphs of `graph_warmup` (batch, history, candidates) are captured at load."""
    from unipinrec.checkpoint import load_model
    from unipinrec.serving.engine import Engine, EngineConfig, settle_heap

    cfg = dict(kv_cache_bytes=0, device=device, **({"graph_warmup": graph_warmup} if graph_warmup else {}), **config)
    uni, ret, rnk = (load_model(paths[k], device=device) for k in ("unified", "retrieval", "ranking"))

    def index_for(loaded, name):
        if torch_index:
            import torch

            from unipinrec.index import TorchIndex

            return TorchIndex.for_model(loaded, loaded.vocab.item_ids, device)
        from unipinrec.index import ItemIndex

        return ItemIndex.load(index_dirs[name], expect_model_version=loaded.version)

    out = {
        "a": Engine(uni, index_for(uni, "unified"), config=EngineConfig(share_kv=True, **cfg)),
        "b": Engine(uni, index_for(uni, "unified"), config=EngineConfig(share_kv=False, **cfg)),
        "c": Engine(ret, index_for(ret, "retrieval"), ranking=rnk, config=EngineConfig(**cfg)),
    }
    settle_heap()  # as the servers do once loaded (serving/handler.py, KServe's load)
    return out


def summarize(lat_ms: list[float], n: int, wall_s: float) -> dict:
    q = np.percentile(lat_ms, [50, 95, 99])
    return {"p50_ms": float(q[0]), "p95_ms": float(q[1]), "p99_ms": float(q[2]), "qps": n / wall_s, "n": n}


def add_ratios(rows: list[dict], cell=lambda r: (r.get("runtime"), r["L"], r["C"]), base=lambda r: "c") -> None:
    """Each row's QPS, p50 and FLOPs against its cell's base mode (the two-model (c))."""
    by = {(*cell(r), r["mode"]): r for r in rows}
    for r in rows:
        c = by.get((*cell(r), base(r)))
        if c is None:
            continue
        r["qps_vs_c"] = r["qps"] / c["qps"]
        if "sustained_qps" in r and "sustained_qps" in c:
            r["sustained_vs_c"] = r["sustained_qps"] / c["sustained_qps"]
        r["p50_vs_c"] = r["p50_ms"] / c["p50_ms"]
        r["flop_ratio_c_over"] = c["gflops"] / r["gflops"] if r.get("gflops") else None


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    head = f"{'L':>5} {'C':>4} {'mode':<22} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'QPS':>7} {'GFLOP':>7} " \
           f"{'QPS/(c)':>8} {'p50/(c)':>8} {'FLOP (c)/x':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['L']:>5} {r['C']:>4} {r['mode'] + ' ' + {**MODES, **FLOOR}.get(r['mode'], ''):<22} {r['p50_ms']:>8.1f} "
              f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['qps']:>7.2f} {r.get('gflops', float('nan')):>7.2f} "
              f"{r.get('qps_vs_c', float('nan')):>8.3f} {r.get('p50_vs_c', float('nan')):>8.3f} "
              f"{r.get('flop_ratio_c_over') or float('nan'):>10.3f}")


def headline_verdict(rows: list[dict]) -> dict | None:
    a = next((r for r in rows if (r["L"], r["C"]) == HEADLINE and r["mode"] == "a"), None)
    if a is None or "qps_vs_c" not in a:
        return None
    eff = a["qps_vs_c"] / a["flop_ratio_c_over"]
    verdict = {"qps_ratio": a["qps_vs_c"], "p50_ratio": a["p50_vs_c"], "flop_ratio": a["flop_ratio_c_over"],
               "efficiency": eff, "qps_target_met": a["qps_vs_c"] >= TARGET_QPS_RATIO,
               "p50_target_met": a["p50_vs_c"] <= TARGET_P50_RATIO, "efficiency_aim_met": eff >= TARGET_EFFICIENCY}
    print(f"\nheadline L={HEADLINE[0]} C={HEADLINE[1]}: QPS(a)/QPS(c) = {a['qps_vs_c']:.3f} (target >= "
          f"{TARGET_QPS_RATIO}: {'met' if verdict['qps_target_met'] else 'NOT met'}), p50(a)/p50(c) = "
          f"{a['p50_vs_c']:.3f} (target <= {TARGET_P50_RATIO}: {'met' if verdict['p50_target_met'] else 'NOT met'}), "
          f"FLOP ratio (c)/(a) = {a['flop_ratio_c_over']:.3f}, measured/FLOP = {eff:.1%} (aim >= 90%)")
    return verdict


# --- HTTP against TorchServe ------------------------------------------------------------------------


def run_clients(url: str, payloads: list[bytes], clients: int, procs: int = 1) -> tuple[list[float], float]:
    """Latencies (ms) and wall time of `payloads` sent by `clients` concurrent clients, as threads
    of `procs` processes (one process's GIL caps what its threads can send: about 2,000 requests/s
    of these bodies, under what a GPU server answers)."""
    if procs <= 1:
        return _client_threads(url, payloads, clients)
    import multiprocessing

    import requests  # noqa: F401  (imported before the fork: the clients' processes start with it)

    global _SHARED
    _SHARED = (url, payloads, procs, max(1, clients // procs))  # the forked processes inherit it: nothing to send
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        pool.map(abs, range(procs))  # every process started before the clock
        t0 = time.perf_counter()
        outs = pool.map(_client_share, range(procs))
        wall = time.perf_counter() - t0
    return [ms for lat in outs for ms in lat], wall


_SHARED: tuple = ()


def _client_share(i: int) -> list[float]:
    url, payloads, procs, threads = _SHARED
    return _client_threads(url, payloads[i::procs], threads)[0]


def _client_threads(url: str, payloads: list[bytes], clients: int) -> tuple[list[float], float]:
    import requests

    lock = threading.Lock()
    todo = list(range(len(payloads)))
    lat = [0.0] * len(payloads)
    errors: list[str] = []

    def worker():
        with requests.Session() as s:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop(0)
                t = time.perf_counter()
                r = s.post(url, data=payloads[i], headers={"Content-Type": "application/json"}, timeout=600)
                lat[i] = (time.perf_counter() - t) * 1000
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return lat, wall


def start_servers(store: Path, work: Path, args) -> dict:
    """runtime -> (url of a model name, stop function), every server on free loopback ports."""
    from unipinrec.serving import torchserve as ts

    servers = {}
    if "torchserve" in args.runtime:
        ports = (ts.free_port(), ts.free_port(), ts.free_port())
        info = ts.start(store, work / "run", ports=ports, token_auth=False, timeout_s=600)
        servers["torchserve"] = (lambda name, i=info: f"{i.inference}/predictions/{name}", lambda: ts.stop(work / "run"))
    if "kserve" in args.runtime:
        from unipinrec.serving import kserve_server as ks

        # the archives' settings: minWorkers engines x torch_threads, batchSize, maxBatchDelay
        engines_only = [f"{n}={n}.mar" for m, n in ARCHIVES.items() if m not in FLOOR]  # (f) is TorchServe's
        info = ks.start(store, work / "run-kserve", models=engines_only, port=ts.free_port(), token_auth=False,
                        timeout_s=600)
        servers["kserve"] = (lambda name, i=info: f"{i.inference}/v1/models/{name}:predict",
                             lambda: ks.stop(work / "run-kserve"))
    return servers


def gpu_engine(args, Cs) -> dict:
    """On a GPU, the archives' engines capture a graph per batch bucket up to batchSize at load
    (every C of the run), so no timed request pays a capture."""
    if not (args.device or "cpu").startswith("cuda"):
        return {}
    from unipinrec.serving.graphs import bucket

    batches = sorted({bucket(b) for b in range(1, args.batch_size + 1)})
    return {"graph_warmup": [[b, 0, C] for b in batches for C in Cs]}


def build_archives(paths: dict, index_dirs: dict, store: Path, args, gpu: dict) -> None:
    """The four archives; `gpu`: engine settings added on a GPU (`gpu_engine`)."""
    from unipinrec.serving import torchserve as ts

    common = dict(batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay, workers=args.workers,
                  torch_threads=args.threads)
    ts.build_archive(paths["unified"], index_dirs["unified"], store, engine={**gpu, "kv_cache_bytes": 0}, **common)
    ts.build_archive(paths["unified"], index_dirs["unified"], store, name=ARCHIVES["b"],
                     engine={**gpu, "kv_cache_bytes": 0, "share_kv": False}, **common)
    ts.build_archive(paths["retrieval"], index_dirs["retrieval"], store, name=ARCHIVES["c"],
                     ranking_dir=paths["ranking"], engine={**gpu, "kv_cache_bytes": 0}, **common)
    ts.build_archive(paths["unified"], index_dirs["unified"], store, name=ARCHIVES["d"],  # one worker: one cache
                     engine={**gpu, "kv_cache_bytes": 1024 * 2**20}, **{**common, "workers": 1})
    if with_floor(args):
        build_floor_archive(store, workers=args.workers, batch_size=args.batch_size,
                            max_batch_delay=args.max_batch_delay)


def with_floor(args) -> bool:
    """Whether the run has TorchServe's floor model (f) beside the engines."""
    return args.floor and "torchserve" in args.runtime


def build_floor_archive(store: Path, *, workers: int, batch_size: int, max_batch_delay: int,
                        name: str = ARCHIVES["f"]) -> None:
    """(f): FLOOR_HANDLER in an archive with the engines' batchSize, maxBatchDelay and workers."""
    import subprocess

    import yaml
    from unipinrec.serving.torchserve import _bin

    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "floor_handler.py").write_text(FLOOR_HANDLER)
        (Path(tmp) / "model-config.yaml").write_text(yaml.safe_dump(
            {"minWorkers": workers, "maxWorkers": workers, "batchSize": batch_size, "maxBatchDelay": max_batch_delay,
             "responseTimeout": 300}))
        res = subprocess.run([_bin("torch-model-archiver"), "--model-name", name, "--version", "1",
                              "--handler", str(Path(tmp) / "floor_handler.py"), "--config-file",
                              str(Path(tmp) / "model-config.yaml"), "--export-path", str(store), "--force"],
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"torch-model-archiver failed: {res.stderr.strip() or res.stdout.strip()}")


def timed_rounds(servers: dict, L: int, C: int, args) -> tuple[dict, dict]:
    """Latencies and wall time per (runtime, mode); rounds interleave runtimes and modes, so a
    noisy neighbour hits all of them."""
    keys = [(rt, m) for rt in servers for m in MODES] + [("torchserve", "f")] * with_floor(args)
    lat, wall = {k: [] for k in keys}, {k: 0.0 for k in keys}
    for rt, m in keys:  # warm-up
        warm = make_bodies(args.clients, L, C, args.items, seed=11, first_user=10**6)
        run_clients(servers[rt][0](ARCHIVES[m]), [payload(b, args) for b in warm], args.clients, args.client_procs)
    per_round = max(1, args.requests // args.rounds)
    for rnd in range(args.rounds):
        order = keys if rnd % 2 == 0 else keys[::-1]
        for rt, m in order:
            bodies = make_bodies(per_round, L, C, args.items, seed=1000 * rnd + ord(m), first_user=rnd * 10**5)
            got, w = run_clients(servers[rt][0](ARCHIVES[m]), [payload(b, args) for b in bodies], args.clients,
                                 args.client_procs)
            lat[(rt, m)] += got
            wall[(rt, m)] += w
    return lat, wall


def p50_overhead(servers: dict, engine, L: int, C: int, args) -> dict:
    """(a) one request at a time: p50 over HTTP per runtime against the in-process engine, each
    body sent to all of them in turn (a noisy neighbour hits every path alike)."""
    import requests
    import torch

    bodies = make_bodies(args.overhead_requests, L, C, args.items, seed=5, first_user=7 * 10**6)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)  # as each server worker runs it
    # per target: HTTP latency; per runtime also "RT engine", the engine's own time in the server's worker
    targets = {rt: url(ARCHIVES["a"]) for rt, (url, _) in servers.items()}
    if with_floor(args):  # the same bodies through TorchServe's floor (f)
        targets["torchserve floor"] = servers["torchserve"][0](ARCHIVES["f"])
    lat = {"inprocess": [], **{k: [] for k in targets}, **{f"{rt} engine": [] for rt in servers}}
    with requests.Session() as s:
        for i, b in enumerate([bodies[0]] + bodies):  # the first one warms every path
            parsed = json.loads(payload(b, args))
            t = time.perf_counter()
            engine.handle(parsed)
            ms = {"inprocess": (time.perf_counter() - t) * 1000}
            for key, url in targets.items():
                t = time.perf_counter()
                r = s.post(url, data=payload(b, args), headers={"Content-Type": "application/json"}, timeout=600)
                ms[key] = (time.perf_counter() - t) * 1000
                assert r.status_code == 200, r.text[:200]
                if key in servers:
                    ms[f"{key} engine"] = r.json()["timings_ms"]["total"]
            if i:
                for k, v in ms.items():
                    lat[k].append(v)
    torch.set_num_threads(threads)
    out = {"L": L, "C": C, "n": len(bodies), "inprocess_p50_ms": statistics.median(lat["inprocess"])}
    for rt in servers:
        out[f"{rt}_p50_ms"] = statistics.median(lat[rt])
        out[f"{rt}_engine_p50_ms"] = statistics.median(lat[f"{rt} engine"])
        # per body, HTTP minus in-process: less noisy than the difference of the medians
        out[f"{rt}_overhead_ms"] = statistics.median(h - e for h, e in zip(lat[rt], lat["inprocess"]))
    if "torchserve floor" in lat:
        out["torchserve_floor_p50_ms"] = statistics.median(lat["torchserve floor"])
    return out


def http_bench(args) -> dict:
    from unipinrec.index import build_index_for_model

    Ls = [HEADLINE[0]] if args.quick else args.L
    Cs = [HEADLINE[1]] if args.quick else args.C
    rows, kv_rows, overhead = [], [], []
    work_root = Path(args.work or tempfile.mkdtemp(prefix="serving-bench-"))
    for L in Ls:
        work = work_root / f"L{L}"
        paths = make_models(work, L, args)
        index_dirs = {"unified": work / "unified-index", "retrieval": work / "retrieval-index"}
        for name in index_dirs:
            build_index_for_model(paths[name], index_dirs[name], num_queries=200)
        store = work / "store"
        gpu = gpu_engine(args, Cs)
        build_archives(paths, index_dirs, store, args, gpu)
        on_cpu = engines(paths, index_dirs)  # FLOPs are counted on CPU (a replayed CUDA graph counts none)
        in_proc = engines(paths, index_dirs, device=args.device, torch_index=True, **gpu) if gpu else on_cpu
        servers = {}
        try:
            servers = start_servers(store, work, args)
            for C in Cs:
                flops = {m: flops_per_request(on_cpu[m], make_bodies(1, L, C, args.items, seed=7)[0]) for m in MODES}
                lat, wall = timed_rounds(servers, L, C, args)
                for (rt, m), got in lat.items():
                    row = {"runtime": rt, "L": L, "C": C, "mode": m, **summarize(got, len(got), wall[(rt, m)]),
                           "gflops": flops.get(m, 0.0) / 1e9}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                for rt, (url, _) in servers.items():
                    kv_rows.append({"runtime": rt, **kv_cache_bench(url(ARCHIVES["d"]), L, C, args)})
                if args.overhead_requests:
                    overhead.append(p50_overhead(servers, in_proc["a"], L, C, args))
                    print(json.dumps(overhead[-1]), flush=True)
        finally:
            for _, stop in servers.values():
                stop()
    add_ratios(rows)
    verdicts = {}
    for rt in args.runtime:
        print_table([r for r in rows if r["runtime"] == rt],
                    f"{rt} over HTTP, {args.clients} clients, {args.workers} workers x {args.threads or 'default'} "
                    f"torch threads, batch "
                    f"{args.batch_size}, d={args.d_model}, {args.layers} layers, {args.items:,} items, {os.cpu_count()} CPUs")
        print(f"{rt}:", end="")
        verdicts[rt] = headline_verdict([r for r in rows if r["runtime"] == rt])
    compare_runtimes(verdicts)
    print("\n(d) cross-request KV cache over HTTP, p50 ms by lookup result:")
    for r in kv_rows:
        print(f"  {r['runtime']:<10} L={r['L']:>5} C={r['C']:>4}: miss {r['miss_p50_ms']:.1f}  hit {r['hit_p50_ms']:.1f}  "
              f"extend(+8) {r['extend_p50_ms']:.1f}  -> hit {r['miss_p50_ms'] / r['hit_p50_ms']:.2f}x, extend "
              f"{r['miss_p50_ms'] / r['extend_p50_ms']:.2f}x faster than miss")
    for o in overhead:
        print(f"\n(a) one client, L={o['L']} C={o['C']}, {o['n']} bodies: in-process engine p50 "
              f"{o['inprocess_p50_ms']:.1f} ms; " + "; ".join(f"{rt} p50 {o[f'{rt}_p50_ms']:.1f} ms (its engine "
                                                          f"{o[f'{rt}_engine_p50_ms']:.1f}; median "
                                                          f"overhead per body {o[f'{rt}_overhead_ms']:+.1f} ms)"
                                                          for rt in args.runtime))
        if "torchserve_floor_p50_ms" in o:
            print(f"   torchserve's floor (f), the same bodies with no engine: p50 {o['torchserve_floor_p50_ms']:.1f} ms")
    return {"rows": rows, "kv_cache": kv_rows, "headline": verdicts, "overhead": overhead}


def compare_runtimes(verdicts: dict) -> None:
    t, k = verdicts.get("torchserve"), verdicts.get("kserve")
    if t and k:
        rel = k["qps_ratio"] / t["qps_ratio"]
        print(f"\nKServe vs TorchServe, same run: QPS(a)/QPS(c) {k['qps_ratio']:.3f} vs {t['qps_ratio']:.3f} "
              f"= {rel:.3f}x (target within 10%: {'met' if abs(rel - 1) <= 0.10 else 'NOT met'})")
        verdicts["kserve_vs_torchserve"] = rel


def kv_cache_bench(url: str, L: int, C: int, args) -> dict:
    """Per user: L-8 actions (miss), the same again (hit), then 8 appended (extend)."""
    import requests

    by = {"miss": [], "hit": [], "extend": []}
    bodies = make_bodies(args.kv_users, L, C, args.items, seed=77, first_user=5 * 10**6)
    with requests.Session() as s:
        for b in bodies:
            first = {**b, "history": b["history"][:-8]}
            for body in (first, first, b):
                t = time.perf_counter()
                r = s.post(url, data=payload(body, args), headers={"Content-Type": "application/json"}, timeout=600)
                ms = (time.perf_counter() - t) * 1000
                by[r.json()["kv_cache"]].append(ms)
    return {"L": L, "C": C, **{f"{k}_p50_ms": statistics.median(v) if v else float("nan") for k, v in by.items()}}


# --- in-process (GPU) ---------------------------------------------------------------------------------

LIMITS = {"la": "limit: (a) blocks", "lb": "limit: (b) blocks", "lc": "limit: (c) blocks",
          "th": "limit: (a) hit", "ta": "limit: (a) + top-K", "tb": "limit: (b) + top-K", "tc": "limit: (c) + top-K"}


def columnar(body: dict) -> dict:
    """The same request with its history in the columnar form (parsed as arrays)."""
    h = body["history"]
    return {**body, "history": {k: [a[k] for a in h] for k in ("item_id", "action", "ts", "surface") if k in h[0]}}


def _timed(fn, repeats: int, cuda: bool) -> list[float]:
    """Milliseconds of each of `repeats` calls (CUDA events around each on a GPU)."""
    import torch

    out = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1000)
    return out


def events_ms(fn, n=50):
    """Median milliseconds of `n` calls of fn (CUDA events), after 3 warm-up calls."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return float(np.median(_timed(fn, n, cuda=True)))


def _drain(batches) -> None:
    """Consume a stream of answers as a server would (each sent, then dropped: holding them all
    made the garbage collector walk them, on the host's clock), checking each."""
    for out in batches:
        assert all(isinstance(o, dict) for o in out), out


def _stream_qps(fn, requests: int, cuda: bool, rounds: int = 3) -> float:
    """Requests per second of fn (a stream of batches, back to back, one wait at the end), median
    of `rounds`: a serving loop's steady-state throughput."""
    import torch

    qps = []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        qps.append(requests / (time.perf_counter() - t))
    return float(np.median(qps))


def limit_fns(eng: dict, L: int, C: int, B: int, items: int, device: str) -> dict:
    """The model's own blocks on pre-made device tensors, per mode: what the engine could reach."""
    import torch

    from unipinrec.sequences import Actions, History
    from unipinrec.serving.synthetic import random_history

    rng = np.random.default_rng(5)
    hs = [History.from_actions(random_history(rng, L, items)) for _ in range(B)]
    h = Actions.from_histories(hs, [RTS] * B, vocab=eng["a"].vocab, device=device)
    cand = torch.randint(1, items + 1, (B, C), device=device)
    uni, ret, rnk = eng["a"].ret.model, eng["c"].ret.model, eng["c"].rnk.model
    fns = {"la": lambda: uni.rank(cand, uni.encode_history(h)[1]),
           "lb": lambda: (uni.encode_history(h), uni.rank(cand, uni.encode_history(h)[1])),
           "lc": lambda: (ret.encode_history(h), rnk.rank(cand, rnk.encode_history(h)[1]))}
    if not hasattr(eng["a"].retriever.index, "vectors"):  # a faiss index: no device top-K to add
        return fns
    ua, uc = (eng[m].retriever.index.vectors for m in ("a", "c"))
    top = lambda kv, vec: (kv.user_vectors.to(vec.dtype) @ vec.T).topk(C, dim=1)  # noqa: E731

    def with_top_k(model, vec, ranker, rank_kv=None):  # returns the top-K too: torch.compile drops unused work
        kv = model.encode_history(h)[1]
        return top(kv, vec), ranker.rank(cand, kv if rank_kv is None else rank_kv())

    kv0 = uni.encode_history(h)[1]  # a cross-request cache hit's KV, encoded before
    # the same plus retrieval (exact top-K over the catalog), as the engine's fused graph does;
    # th: a cache hit's work (top-K + ranking on the cached KV), the hit's bound against ta's
    return {**fns, "th": lambda: (top(kv0, ua), uni.rank(cand, kv0)), "ta": lambda: with_top_k(uni, ua, uni),
            "tb": lambda: with_top_k(uni, ua, uni, lambda: uni.encode_history(h)[1]),
            "tc": lambda: with_top_k(ret, uc, rnk, lambda: rnk.encode_history(h)[1])}


def limit_rows(eng: dict, L: int, C: int, B: int, args, device: str) -> list[dict]:
    """One row per limit mode: the blocks under one CUDA graph (eager on CPU), replays timed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from unipinrec.serving.graphs import _Graph

    cuda = device.startswith("cuda")
    _register_cpu_sdpa_flops()
    rows = []
    with torch.inference_mode():
        for m, fn in limit_fns(eng, L, C, B, args.items, device).items():
            if m == "th":  # the hit's bound: in the KV cache cell (kv_bound)
                continue
            with FlopCounterMode(display=False) as counter:
                fn()
            if cuda and getattr(args, "compile", False):  # the limit compiled too, as the engine's graphs
                fn = torch.compile(fn, dynamic=False)
            run = _Graph(fn).replay if cuda else fn
            for _ in range(3):
                run()
            lat = _timed(run, args.repeats, cuda)
            sustained = _stream_qps(lambda: [run() for _ in range(args.stream_batches)], B * args.stream_batches, cuda)
            rows.append({"L": L, "C": C, "mode": m, "batch": B, "layers": args.layers, "sustained_qps": sustained,
                         "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                         "p99_ms": float(np.percentile(lat, 99)), "qps": B * 1000 / float(np.median(lat)),
                         "gflops": counter.get_total_flops() / 1e9 / B, "n": len(lat)})
    return rows


def engine_rows(eng: dict, L: int, C: int, B: int, args, device: str, gflops: dict) -> list[dict]:
    from unipinrec.serving.engine import settle_heap
    from unipinrec.serving.request import parse_request

    cuda = device.startswith("cuda")
    # the bodies go once parsed, and only the last answer is held: a server keeps neither, and the
    # collector would walk them (engine.settle_heap)
    reqs = [parse_request(columnar(b) if args.history_form == "columnar" else b, eng["a"].limits)
            for b in make_bodies(B, L, C, args.items, seed=3)]
    # a server's heap holds its loaded state, settled, and the requests in flight; this process
    # holds the bench's too (limit graphs, earlier cells: ~100,000 objects), which the collector's
    # full collections would walk every few streamed batches (45 ms each on the GPU machine)
    settle_heap()
    rows = []
    for m in MODES:
        first = _timed(lambda: eng[m].handle_batch(reqs), 1, cuda)[0]  # graphs were captured at load
        for _ in range(3):
            eng[m].handle_batch(reqs)
        out = [None]
        lat = _timed(lambda: out.__setitem__(-1, eng[m].handle_batch(reqs)), args.repeats, cuda)
        time.sleep(1.0)  # a warm engine after a second idle: what the first request meets besides the idle
        after_idle = _timed(lambda: eng[m].handle_batch(reqs), 1, cuda)[0]
        assert all(isinstance(o, dict) for o in out[-1]), out[-1]
        sustained = _stream_qps(lambda: _drain(eng[m].handle_stream([reqs] * args.stream_batches)),
                                B * args.stream_batches, cuda)
        rows.append({"L": L, "C": C, "mode": m, "batch": B, "layers": args.layers, "sustained_qps": sustained,
                     "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                     "p99_ms": float(np.percentile(lat, 99)), "qps": B * 1000 / float(np.median(lat)),
                     "first_ms": first, "after_idle_ms": after_idle, "gflops": gflops["l" + m], "n": len(lat),
                     "timings_ms": out[-1][0]["timings_ms"]})
    return rows


def kv_engine(path: Path, device: str, graph_warmup: tuple, kv_cache_bytes: int = 8 * 2**30, **config):
    """The unified model of `path` with the exact torch index and a cross-request cache of
    `kv_cache_bytes` (0: off), its graphs of `graph_warmup` captured."""
    from unipinrec.checkpoint import load_model
    from unipinrec.index import TorchIndex
    from unipinrec.serving.engine import Engine, EngineConfig, settle_heap

    uni = load_model(path, device=device)
    index = TorchIndex.for_model(uni, uni.vocab.item_ids, device)
    eng = Engine(uni, index, config=EngineConfig(kv_cache_bytes=kv_cache_bytes, device=device,
                                                 graph_warmup=graph_warmup, **config))
    settle_heap()  # as the servers do once loaded
    return eng


def timed_batch(eng, reqs: list, cuda: bool) -> tuple[float, str]:
    """One `handle_batch` of reqs -> (its ms, the first answer's kv_cache status)."""
    out = []
    ms = _timed(lambda: out.append(eng.handle_batch(reqs)), 1, cuda)[0]
    return ms, out[0][0]["kv_cache"]


def kv_rows(paths: dict, L: int, C: int, B: int, args, device: str) -> dict:
    """(d) on the device: per batch of B users, L-8 actions (miss), the same again (hit), 8 appended (extend)."""
    from unipinrec.serving.engine import settle_heap
    from unipinrec.serving.request import parse_request

    eng = kv_engine(paths["unified"], device, ((B, L - 8, C), (B, L, C)), compile=args.compile)
    cuda = device.startswith("cuda")
    by = {"miss": [], "hit": [], "extend": []}
    for rnd in range(args.kv_rounds):
        bodies = make_bodies(B, L, C, args.items, seed=77 + rnd, first_user=5 * 10**6 + rnd * B)
        first = [parse_request(columnar({**b, "history": b["history"][:-8]}), eng.limits) for b in bodies]
        full = [parse_request(columnar(b), eng.limits) for b in bodies]
        del bodies  # a server keeps no bodies: the collector would walk them
        settle_heap()  # nor the bench's own objects (engine_rows)
        for reqs in (first, first, full):
            ms, status = timed_batch(eng, reqs, cuda)
            by[status].append(ms)
    bound = kv_bound(eng, L, C, B, args, device)
    return {"L": L, "C": C, "batch": B, **bound, **{f"{k}_p50_ms": statistics.median(v) if v else float("nan")
                                                    for k, v in by.items()}}


def kv_bound(eng, L: int, C: int, B: int, args, device: str) -> dict:
    """The device's own bound on a hit's speed-up: the limit graphs of a miss (encode + top-K +
    rank) and of a hit (top-K + rank on a cached KV) for this engine's model, replays timed."""
    import torch

    from unipinrec.serving.graphs import _Graph

    if not device.startswith("cuda"):
        return {}
    with torch.inference_mode():
        fns = limit_fns({"a": eng, "c": eng}, L, C, B, args.items, device)
        return {name: events_ms(_Graph(fns[key]).replay, args.repeats)
                for name, key in (("limit_miss_ms", "ta"), ("limit_hit_ms", "th"))}


def add_limit_ratios(rows: list[dict]) -> None:
    """GPU cells: engine modes against (c), limit modes against the limit's own (lc)."""
    add_ratios(rows, cell=lambda r: (r["L"], r["C"], r["batch"]),
               base=lambda r: {"l": "lc", "t": "tc"}.get(r["mode"][0], "c") if len(r["mode"]) == 2 else "c")


def print_gpu_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    head = f"{'cell':<18} {'mode':<22} {'p50 ms':>8} {'p95 ms':>8} {'first':>7} {'QPS':>9} {'GFLOP/req':>9} " \
           f"{'QPS/(c)':>8} {'FLOP (c)/x':>10} {'stream QPS':>10} {'stream/(c)':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cell = f"{r['layers']}l L{r['L']} C{r['C']} b{r['batch']}"
        name = r["mode"] + " " + {**MODES, **LIMITS}.get(r["mode"], "")
        print(f"{cell:<18} {name:<22} {r['p50_ms']:>8.3f} {r['p95_ms']:>8.3f} {r.get('first_ms', float('nan')):>7.2f} "
              f"{r['qps']:>9.1f} {r['gflops']:>9.2f} {r.get('qps_vs_c', float('nan')):>8.3f} "
              f"{r.get('flop_ratio_c_over') or float('nan'):>10.3f} {r.get('sustained_qps', float('nan')):>10.1f} "
              f"{r.get('sustained_vs_c', float('nan')):>10.3f}")


def inprocess_cell(args, layers: int, L: int, Cs, batches, device: str, work: Path) -> tuple[list, list]:
    import torch

    shape_args = argparse.Namespace(**{**vars(args), "layers": layers})
    paths = make_models(work / f"l{layers}-L{L}", L, shape_args)
    warm = tuple((B, L, C) for B in batches for C in Cs)
    eng = engines(paths, None, device=device, torch_index=True, graph_warmup=warm, compile=args.compile,
                  **({} if args.pipeline_rows is None else {"pipeline_rows": args.pipeline_rows}))
    rows, kv = [], []
    for C in Cs:
        for B in batches:
            lim = limit_rows(eng, L, C, B, shape_args, device)
            rows += engine_rows(eng, L, C, B, shape_args, device, {r["mode"]: r["gflops"] for r in lim}) + lim
            print(json.dumps(rows[-4]), flush=True)
    if args.kv_batches:
        for B in args.kv_batches:
            kv.append(kv_rows(paths, L, Cs[0], B, shape_args, device))
            print(json.dumps(kv[-1]), flush=True)
    del eng
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows, kv


def inprocess_bench(args) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    Ls = [HEADLINE[0]] if args.quick else args.L
    Cs = [HEADLINE[1]] if args.quick else args.C
    work_root = Path(args.work or tempfile.mkdtemp(prefix="serving-bench-"))
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    rows, kv = [], []
    for L in Ls:
        r, k = inprocess_cell(args, args.layers, L, Cs, args.batch, device, work_root)
        rows, kv = rows + r, kv + k
    if args.paper:  # the shape of the paper's Table 2
        args.kv_batches, saved = [], args.kv_batches
        r, _ = inprocess_cell(args, 12, 992, [656], [8], device, work_root)
        rows, args.kv_batches = rows + r, saved
    add_limit_ratios(rows)
    print_gpu_table(rows, f"in-process engine on {name} ({device}), latency = the whole batch, d={args.d_model}, "
                          f"{args.items:,} items, torch exact top-K, history {args.history_form}; limit rows: the "
                          f"model's blocks alone on pre-made tensors{' under one CUDA graph' if device != 'cpu' else ''}")
    verdicts = {}
    for r in rows:
        if r["mode"] == "a":
            lim = next(x for x in rows if x["mode"] == "la" and (x["L"], x["C"], x["batch"], x["layers"]) ==
                       (r["L"], r["C"], r["batch"], r["layers"]))
            v = {"p50_ms": r["p50_ms"], "first_ms": r["first_ms"], "after_idle_ms": r["after_idle_ms"],
                 "qps_ratio": r["qps_vs_c"],
                 "limit_ratio": lim["qps_vs_c"], "of_limit": r["qps_vs_c"] / lim["qps_vs_c"],
                 "stream_ratio": r["sustained_vs_c"], "stream_limit_ratio": lim["sustained_vs_c"],
                 "stream_of_limit": r["sustained_vs_c"] / lim["sustained_vs_c"]}
            lt = next((x for x in rows if x["mode"] == "ta" and (x["L"], x["C"], x["batch"], x["layers"]) ==
                       (r["L"], r["C"], r["batch"], r["layers"])), None)
            if lt is not None:
                v.update(topk_limit_ratio=lt["qps_vs_c"], of_topk_limit=r["qps_vs_c"] / lt["qps_vs_c"],
                         stream_topk_limit_ratio=lt["sustained_vs_c"],
                         stream_of_topk_limit=r["sustained_vs_c"] / lt["sustained_vs_c"])
            verdicts[f"{r['layers']}l-L{r['L']}-C{r['C']}-b{r['batch']}"] = v
            print(f"{r['layers']}l L={r['L']} C={r['C']} batch {r['batch']}: (a) p50 {r['p50_ms']:.3f} ms (first "
                  f"{r['first_ms']:.2f}, after 1 s idle {r['after_idle_ms']:.2f}), QPS (a)/(c) {r['qps_vs_c']:.3f} vs limit {lim['qps_vs_c']:.3f} "
                  f"({v['of_limit']:.1%} of it); streamed batches: (a)/(c) {v['stream_ratio']:.3f} vs limit "
                  f"{v['stream_limit_ratio']:.3f} ({v['stream_of_limit']:.1%} of it)"
                  + (f"; against the limit with top-K: {v['topk_limit_ratio']:.3f} ({v['of_topk_limit']:.1%}), streamed "
                     f"{v['stream_topk_limit_ratio']:.3f} ({v['stream_of_topk_limit']:.1%})" if lt is not None else ""))
    for k in kv:
        print(f"(d) KV cache L={k['L']} C={k['C']} batch {k['batch']}: miss {k['miss_p50_ms']:.3f} hit "
              f"{k['hit_p50_ms']:.3f} extend(+8) {k['extend_p50_ms']:.3f} ms -> hit "
              f"{k['miss_p50_ms'] / k['hit_p50_ms']:.2f}x, extend {k['miss_p50_ms'] / k['extend_p50_ms']:.2f}x faster"
              + (f"; the device's bound: limit miss {k['limit_miss_ms']:.3f} ms, hit {k['limit_hit_ms']:.3f} -> "
                 f"{k['limit_miss_ms'] / k['limit_hit_ms']:.2f}x" if "limit_hit_ms" in k else ""))
    return {"device": name, "rows": rows, "kv_cache": kv, "headline": verdicts}


# --- ANN index ----------------------------------------------------------------------------------------


def ann_bench(args) -> dict:
    import faiss

    from unipinrec.index import build_index, synthetic_queries

    rng = np.random.default_rng(0)
    n, d = args.items_ann, args.dim
    t = time.perf_counter()
    centers = rng.standard_normal((args.clusters, d)).astype(np.float32)
    v = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 200_000):  # a clustered catalog: items gather around topics
        m = min(200_000, n - s)
        v[s:s + m] = centers[rng.integers(0, args.clusters, m)] + args.spread * rng.standard_normal((m, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    print(f"catalog {n:,} x {d} in {time.perf_counter() - t:.1f} s; faiss threads {faiss.omp_get_max_threads()}", flush=True)
    queries = synthetic_queries(v, args.queries, seed=1)
    index, report = build_index(v, np.arange(n), "bench", None, kind=args.kind, k=100, target_recall=args.target,
                                queries=queries, progress=True)
    single = synthetic_queries(v, 200, seed=2)
    t = time.perf_counter()
    for q in single:
        index.search(q[None], 100)
    one_ms = (time.perf_counter() - t) * 1000 / len(single)
    out = {"items": n, "dim": d, **{k: getattr(report, k) for k in ("kind", "factory", "params", "recall_at_k",
                                                                    "query_ms_per_query", "exact_query_ms_per_query",
                                                                    "build_s", "tuning")},
           "single_query_ms": one_ms}
    if args.device:
        out["gpu"] = ann_gpu_rows(index, v, queries[len(queries) // 2:], single, args.device)
    print(json.dumps(out, indent=2))
    print(f"\nANN {report.factory} on {n:,} x {d}: recall@100 = {report.recall_at_k:.4f} vs exact "
          f"(target >= 0.95: {'met' if report.recall_at_k >= 0.95 else 'NOT met'}) on {len(queries) - len(queries) // 2} "
          f"held-out queries; {report.query_ms_per_query:.3f} ms/query batched, {one_ms:.3f} ms one at a time; exact "
          f"{report.exact_query_ms_per_query:.3f} ms/query batched; build {report.build_s:.0f} s")
    for r in out.get("gpu", []):
        print(f"  {r['index']:<34} recall@100 {r['recall_at_100']:.4f}  batch of {r['batch']}: "
              f"{r['batch_ms']:.3f} ms ({r['batch_ms'] / r['batch']:.4f} ms/query)  one at a time {r['single_ms']:.3f} ms")
    return out


def ann_gpu_rows(index, vectors: np.ndarray, held_out: np.ndarray, single: np.ndarray, device: str,
                 batch: int = 64) -> list[dict]:
    """The same queries through the host index, its faiss-gpu copy (`ItemIndex.on_gpu`) and the
    exact torch top-K on the GPU (`TorchIndex`, what the engine uses up to torch_index_max_items):
    recall@100 against the exact answer, a batch's time and one query's (medians)."""
    import torch

    from unipinrec.index import TorchIndex, recall_at_k

    cuda = device.startswith("cuda")
    exact = TorchIndex(torch.from_numpy(vectors).to(device), np.arange(len(vectors)), "bench")
    truth = exact.search(held_out, 100)[1]
    rows = []
    gpu = index.on_gpu(device) if cuda else index
    for name, ix in (("faiss, host", index), ("faiss-gpu (ItemIndex.on_gpu)", gpu),
                     (f"torch exact top-K, {device} (fp32)", exact)):
        if name.startswith("faiss-gpu") and ix is index:
            continue  # no GPU here, or no faiss GPU support (on_gpu warned)
        got = np.concatenate([ix.search(held_out[s:s + batch], 100)[1] for s in range(0, len(held_out), batch)])
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        timed = lambda qs: statistics.median(_timed(lambda: (ix.search(qs, 100), sync()), 30, cuda=False))  # noqa: E731
        rows.append({"index": name, "recall_at_100": recall_at_k(got, truth), "batch": batch,
                     "batch_ms": timed(held_out[:batch]), "single_ms": timed(single[:1])})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("http", "inprocess"):
        s = sub.add_parser(name)
        s.add_argument("--quick", action="store_true", help="only the headline L=2048, C=256")
        s.add_argument("--L", type=int, nargs="+", default=[256, 1024, 2048, 4096])
        s.add_argument("--C", type=int, nargs="+", default=[128, 256, 512])
        s.add_argument("--d-model", type=int, default=256)
        s.add_argument("--layers", type=int, default=4)
        s.add_argument("--heads", type=int, default=4)
        s.add_argument("--items", type=int, default=20_000, help="catalog size (exact index)")
        s.add_argument("--work", help="folder for models and archives (default: a temp folder)")
        s.add_argument("--out", help="write the results as JSON here")
    h = sub.choices["http"]
    h.add_argument("--requests", type=int, default=24, help="timed requests per mode and (L, C)")
    h.add_argument("--rounds", type=int, default=2, help="interleaved rounds the requests are split into")
    h.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    h.add_argument("--client-procs", type=int, default=1, help="processes the clients are threads of")
    h.add_argument("--workers", type=int, default=2, help="TorchServe workers per model (a, b, c)")
    h.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker (0: torch's default)")
    h.add_argument("--batch-size", type=int, default=4, help="TorchServe batchSize")
    h.add_argument("--max-batch-delay", type=int, default=5, help="TorchServe maxBatchDelay (ms)")
    h.add_argument("--kv-users", type=int, default=5, help="users in the cross-request KV cache run (d)")
    h.add_argument("--runtime", nargs="+", choices=["torchserve", "kserve"], default=["torchserve"],
                   help="serving runtimes, each on the same archives (kserve: KServe's model server, v1 route)")
    h.add_argument("--history-form", choices=["list", "columnar"], default="list",
                   help="the requests' history: a list of actions, or columnar arrays")
    h.add_argument("--device", help="the in-process engine's device (cuda on the GPU machine, where TorchServe "
                                    "gives each worker the GPU; default cpu); on cuda the archives capture graphs")
    h.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="TorchServe's floor (f): the same bodies through a fixed-answer handler, measured beside")
    h.add_argument("--overhead-requests", type=int, default=12,
                   help="one-client requests of (a) per runtime for the p50 overhead over in-process (0: skip)")
    g = sub.choices["inprocess"]
    g.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    g.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    g.add_argument("--repeats", type=int, default=50)
    g.add_argument("--compile", action="store_true", help="EngineConfig.compile (and the limit rows compiled)")
    g.add_argument("--stream-batches", type=int, default=20,
                   help="batches per stream for the sustained QPS (Engine.handle_stream, back to back)")
    g.add_argument("--history-form", choices=["columnar", "list"], default="columnar")
    g.add_argument("--paper", action="store_true", help="add the paper-like cell: 12 layers, L=992, C=656, batch 8")
    g.add_argument("--kv-batches", type=int, nargs="*", default=[1, 8], help="batch sizes of the KV cache cell (d)")
    g.add_argument("--kv-rounds", type=int, default=5)
    g.add_argument("--pipeline-rows", type=int, help="EngineConfig.pipeline_rows (default: the engine's; 0: off)")
    a = sub.add_parser("ann")
    a.add_argument("--items-ann", "--items", dest="items_ann", type=int, default=1_000_000)
    a.add_argument("--dim", type=int, default=64)
    a.add_argument("--clusters", type=int, default=2000)
    a.add_argument("--spread", type=float, default=0.5)
    a.add_argument("--kind", default="ivfpq")
    a.add_argument("--target", type=float, default=0.97)
    a.add_argument("--queries", type=int, default=1000)
    a.add_argument("--device", help="also the exact torch top-K on this device (cuda: and the faiss-gpu copy)")
    a.add_argument("--out")
    args = p.parse_args()
    result = {"http": http_bench, "inprocess": inprocess_bench, "ann": ann_bench}[args.cmd](args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), **result}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

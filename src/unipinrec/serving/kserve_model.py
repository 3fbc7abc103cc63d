"""KServe runtime: a `kserve.Model` over the same serving engine as the TorchServe handler.

A thin adapter, like serving/handler.py: the engine (engine.py) imports neither KServe nor
TorchServe. One archive (`unipinrec package`'s .mar, unpacked or not) serves on both runtimes.

Routes (KServe's model server, one port):

    POST /v1/models/NAME:predict     the TorchServe request body (docs/serving.md), or
                                     {"instances": [request, ...]} -> {"predictions": [...]}
    POST /v2/models/NAME/infer       Open Inference Protocol v2, the tensors below
    GET  /v2/models/NAME/ready, /v1/models/NAME   readiness: engine built, engine thread not stuck
    GET  /v2/health/live, /          liveness (the server answers)
    GET  /metrics                    Prometheus: KServe's request latencies and the TorchServe
                                     handler's UniPinRec* stage, KV-cache and error metrics

v2 input tensors (B users per request; histories concatenated in user order, N actions):

    user_id          INT64 [B]      required
    history_length   INT64 [B]      actions per user; with the three below, or none of them to
    history_item_id  INT64 [N]      read every history from the online store
    history_action   INT64 [N]
    history_ts       INT64 [N]
    history_surface  INT64 [N]      optional (default 0)
    k, num_candidates, request_ts  INT64 [1] or [B]; exclude_seen BOOL [1] or [B]   optional

v2 output tensors, K = the largest k asked: item_id INT64 [B, K] (-1 pads rows with fewer
items), score, retrieval_score and one task_<name> per ranking task FP32 [B, K] (0 pads),
num_items INT64 [B]; the response's model_version is the model's.

Errors are the TorchServe handler's: a 4xx with {"error": {"status", "field", "message"}}
naming the field (v2: the tensor and element, `history_item_id[7]`). Concurrent requests are
batched into one `Engine.handle_batch` call (up to the archive's batchSize, waiting at most
maxBatchDelay ms, as TorchServe does); each request keeps its own answer or error. In a cluster
KServe's batcher (`predictor.batcher`) may merge v1 requests into one `instances` list: each
instance then gets its own answer or error object, so one bad request never fails another.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import math
import re
import shutil
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .engine import settle_heap
from .gateway import Limits as ConnectionLimits, WatchedFile, _head_timed_protocol, head_bytes, parse_tokens
from .handler_support import SERVING_JSON, build_engine
from .request import ServingError, _field_name, decode_json, parse_request

log = logging.getLogger(__name__)
MODEL_NAME = "unipinrec"
MAX_INSTANCES = 256
MAX_BODY = 16 * 2**20  # any route (v1 bodies are also held to the engine's max_body_bytes)
HISTORY_TENSORS = ("history_item_id", "history_action", "history_ts", "history_surface")
TOKEN_HEADER = "x-unipinrec-token"
OPEN_PATHS = re.compile(r"^/($|metrics$|v2/health/(live|ready)$|v2/models/[^/]+/ready$|v1/models/[^/:]+$)")


def _import_kserve():
    """kserve.model_server parses sys.argv when imported: keep our command line away from it."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve
        from kserve import model_server
    finally:
        sys.argv = argv
    return kserve, model_server


kserve, _model_server = _import_kserve()
from kserve.protocol.dataplane import DataPlane  # noqa: E402
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402


# --- the archive ----------------------------------------------------------------------------------


def resolve_archive(path: str | Path, work_dir: str | Path, name: str = MODEL_NAME) -> Path:
    """The unpacked archive folder (serving.json, model/, index/) for `path`, which is that folder,
    a .mar, or KServe's storageUri layout (model-store/NAME.mar, with its .sha256 when present)."""
    path = Path(path)
    if (path / SERVING_JSON).is_file():
        return path
    if path.is_dir():
        mar = path / "model-store" / f"{name}.mar"
        if not mar.is_file():
            mars = sorted(path.glob("*.mar")) or sorted(path.glob("model-store/*.mar"))
            if len(mars) != 1:
                raise FileNotFoundError(f"{path}: no {SERVING_JSON}, no model-store/{name}.mar and not exactly one "
                                        f".mar (found {len(mars)}); give the archive with `unipinrec package`'s layout")
            mar = mars[0]
        path = mar
    if not path.is_file() or path.suffix != ".mar":
        raise FileNotFoundError(f"{path} is not a model archive (.mar) or an unpacked archive folder")
    _check_sha256(path)
    dest = Path(work_dir) / f"{name}-unpacked"  # one folder per served model name
    if dest.exists():
        shutil.rmtree(dest)
    with zipfile.ZipFile(path) as z:  # extractall drops absolute paths and '..' parts
        z.extractall(dest)
    if not (dest / SERVING_JSON).is_file():
        raise FileNotFoundError(f"{path} holds no {SERVING_JSON}: was it built by `unipinrec package`?")
    return dest


def _check_sha256(mar: Path) -> None:
    side = mar.with_name(mar.name + ".sha256")
    if side.is_file():
        from .registry import sha256_of

        want = side.read_text().split()[0]
        if sha256_of(mar) != want:
            raise ValueError(f"{mar}: SHA-256 differs from {side.name}; refusing a damaged archive")


def _model_config(folder: Path) -> dict:
    import yaml

    p = folder / "model-config.yaml"
    return (yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}


# --- metrics --------------------------------------------------------------------------------------


class _Metrics:
    """The TorchServe handler's metrics (serving/metrics.yaml) on KServe's /metrics, labelled by
    model; prometheus_client adds `_total` to counter names. One set per process."""

    _made: "_Metrics | None" = None

    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.stage = Histogram("UniPinRecStageLatencySeconds", "engine stage latency", ["model", "Stage"])
        self.lookups = Counter("UniPinRecKVCacheLookups", "cross-request KV cache lookups", ["model", "Result"])
        self.errors = Counter("UniPinRecErrors", "requests answered with an error", ["Status"])
        self.cold = Counter("UniPinRecColdStarts", "requests without history", ["model"])
        self.batch = Counter("UniPinRecBatchRequests", "requests handed to the engine", ["model"])

    @classmethod
    def get(cls) -> "_Metrics":
        if cls._made is None:
            cls._made = cls()
        return cls._made

    def record(self, model: str, engine, last: dict, results: list) -> None:
        ok = [r for r in results if isinstance(r, dict)]
        for stage, ms in (ok[0].get("timings_ms", {}) if ok else {}).items():
            self.stage.labels(model, stage).observe(ms / 1000.0)
        cold = sum(1 for r in ok if r.get("cold_start"))
        if cold:
            self.cold.labels(model).inc(cold)
        self.batch.labels(model).inc(len(results))
        stats = engine.user_cache.stats.as_dict()
        for result, total in stats.items():
            if total > last.get(result, 0):
                self.lookups.labels(model, result).inc(total - last.get(result, 0))
        last.update(stats)


# --- batching -------------------------------------------------------------------------------------


class _Batcher:
    """Concurrent requests -> `handle_batch` calls, one engine per worker, each engine on its own
    thread (as a TorchServe worker owns its engine). A batch forms while every engine is busy:
    up to `max_batch_size` requests, waiting at most `max_delay_ms` for company."""

    def __init__(self, engines: list, max_batch_size: int, max_delay_ms: float, stuck_s: float, model: str):
        self.engines, self.max_batch_size, self.max_delay = engines, max(1, max_batch_size), max_delay_ms / 1000
        self.stuck_s, self.model = stuck_s, model
        self.last_stats = [{} for _ in engines]
        self.pools = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"unipinrec-engine-{i}")
                      for i in range(len(engines))]
        self.queue: asyncio.Queue | None = None
        self.free: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.busy_since: dict[int, float] = {}

    async def submit(self, requests: Sequence) -> list:
        if self.task is None or self.task.done():
            self.queue, self.free = asyncio.Queue(), asyncio.Queue()
            for i in range(len(self.engines)):
                self.free.put_nowait(i)
            self.task = asyncio.get_running_loop().create_task(self._run())
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((list(requests), fut))
        return await fut

    def healthy(self) -> bool:
        now = time.monotonic()
        stuck = any(now - t > self.stuck_s for t in list(self.busy_since.values()))
        return not stuck and (self.task is None or not self.task.done())

    async def _gather(self) -> list:
        items = [await self.queue.get()]
        n = len(items[0][0])
        deadline = time.monotonic() + self.max_delay
        while n < self.max_batch_size:
            if self.queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            else:
                items.append(self.queue.get_nowait())
            n += len(items[-1][0])
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            worker = await self.free.get()  # requests queue up (and batch) while every engine is busy
            items = await self._gather()
            loop.create_task(self._serve(worker, items))

    async def _serve(self, worker: int, items: list) -> None:
        reqs = [r for batch, _ in items for r in batch]
        self.busy_since[worker] = time.monotonic()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.pools[worker], self.engines[worker].handle_batch, reqs)
        except Exception:  # a bug, not bad input: 500 for this batch, keep serving
            log.exception("unipinrec engine failed on a batch of %d", len(reqs))
            results = [ServingError(500, "server", "internal error while serving this request")] * len(reqs)
        finally:
            self.busy_since.pop(worker, None)
            self.free.put_nowait(worker)
        _Metrics.get().record(self.model, self.engines[worker], self.last_stats[worker], results)
        at = 0
        for batch, fut in items:
            if not fut.done():
                fut.set_result(results[at:at + len(batch)])
            at += len(batch)


# --- v2 tensors -----------------------------------------------------------------------------------


def _flat(values: Any, name: str, depth: int = 0) -> list:
    if depth > 8:
        raise ServingError(422, name, "nested too deeply")
    out = []
    for v in values:
        out += _flat(v, name, depth + 1) if isinstance(v, list) else [v]
    return out


def _tensor(req: InferRequest, name: str, *, size: int | None = None, one_or: int | None = None):
    """The flat data of input `name` (raw JSON values, so pydantic's strict rules apply), or None."""
    inp = req.get_input_by_name(name)
    if inp is None:
        return None
    want = "BOOL" if name == "exclude_seen" else "INT"
    if not (inp.datatype.startswith(want) or (want == "INT" and inp.datatype.startswith("UINT"))):
        raise ServingError(422, name, f"datatype must be {'BOOL' if want == 'BOOL' else 'INT64'}, got {inp.datatype}")
    shape = inp.shape
    try:
        data = _flat(inp.data, name) if isinstance(inp.data, list) else inp.as_numpy().ravel().tolist()
    except ServingError:
        raise
    except Exception as e:  # noqa: BLE001  (binary data that does not fit its shape or type)
        raise ServingError(422, name, f"cannot read the tensor: {e}") from None
    if not all(isinstance(s, int) and s >= 0 for s in shape) or math.prod(shape) != len(data):
        raise ServingError(422, name, f"shape {shape} does not match its {len(data)} values")
    if size is not None and len(data) != size and not (one_or is not None and len(data) == 1):
        raise ServingError(422, name, f"expected {size} values{' (or 1)' if one_or is not None else ''}, got {len(data)}")
    return data


def v2_requests(req: InferRequest) -> list[dict]:
    """One TorchServe-style request dict per user of a v2 request (validated later, per dict)."""
    names: set[str] = set()
    for inp in req.inputs:  # one pass: a body may name many thousands of inputs
        if inp.name in names:
            raise ServingError(422, inp.name, "input tensor given more than once")
        names.add(inp.name)
    unknown = sorted(names - {"user_id", "history_length", *HISTORY_TENSORS, "k", "num_candidates", "request_ts",
                              "exclude_seen"})
    if unknown:
        raise ServingError(422, unknown[0], "unknown input tensor")
    users = _tensor(req, "user_id")
    if users is None:
        raise ServingError(422, "user_id", "required input tensor is missing")
    B = len(users)
    if not 0 < B <= MAX_INSTANCES:
        raise ServingError(422 if B == 0 else 413, "user_id", f"{B} users: send 1 to {MAX_INSTANCES}")
    rows: list[dict] = [{"user_id": u} for u in users]
    for name in ("k", "num_candidates", "request_ts", "exclude_seen"):
        vals = _tensor(req, name, size=B, one_or=1)
        if vals is not None:
            for j, row in enumerate(rows):
                row[name] = vals[0] if len(vals) == 1 else vals[j]
    given = [n for n in ("history_length", *HISTORY_TENSORS[:3]) if n in names]
    if not given:
        return rows
    missing = [n for n in ("history_length", *HISTORY_TENSORS[:3]) if n not in names]
    if missing:
        raise ServingError(422, missing[0], f"required with {given[0]} (or leave out every history tensor)")
    lengths = _tensor(req, "history_length", size=B)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
        raise ServingError(422, "history_length", "lengths must be non-negative integers")
    N = sum(lengths)
    cols = {n: _tensor(req, n, size=N) for n in HISTORY_TENSORS}
    at = 0
    keys = [c for c in HISTORY_TENSORS if cols[c] is not None]
    for row, n in zip(rows, lengths):  # columnar: cut to L and checked as arrays, no object per action
        row["history"] = {c[len("history_"):]: cols[c][at:at + n] for c in keys}
        row["_offset"] = at
        at += n
    return rows


_HISTORY_FIELD = re.compile(r"^history(?:\[(\d+)\]\.(\w+)|\.(\w+)\[(\d+)\])$")  # history[3].ts, history.ts[3]


def v2_field(field: str, row: int, offset: int) -> str:
    """An error field of row `row`'s request dict -> the v2 tensor element it came from."""
    m = _HISTORY_FIELD.match(field)
    if m:
        name, i = (m.group(2), m.group(1)) if m.group(1) is not None else (m.group(3), m.group(4))
        return f"history_{name}[{offset + int(i)}]"
    if field in ("history", "body"):
        return f"history_length[{row}]" if field == "history" else "inputs"
    return f"{field.split('.', 1)[0]}[{row}]"


def v2_response(model_name: str, version: str, task_names: list[str], answers: list[dict], req_id: str):
    B = len(answers)
    K = max([1] + [len(a["items"]) for a in answers])
    ids = np.full((B, K), -1, dtype=np.int64)
    cols = {n: np.zeros((B, K), dtype=np.float32) for n in ("score", "retrieval_score", *[f"task_{t}" for t in task_names])}
    for j, a in enumerate(answers):
        for i, item in enumerate(a["items"]):
            ids[j, i] = item["item_id"]
            cols["score"][j, i], cols["retrieval_score"][j, i] = item["score"], item["retrieval_score"]
            for t in task_names:
                cols[f"task_{t}"][j, i] = item["tasks"][t]
    counts = np.array([len(a["items"]) for a in answers], dtype=np.int64)
    outs = [InferOutput("item_id", [B, K], "INT64", ids)]
    outs += [InferOutput(n, [B, K], "FP32", v) for n, v in cols.items()]
    outs.append(InferOutput("num_items", [B], "INT64", counts))
    return InferResponse(response_id=req_id, model_name=model_name, infer_outputs=outs, model_version=version)


# --- the model ------------------------------------------------------------------------------------


class UniPinRecModel(kserve.Model):
    """`load()` builds the engine from an archive; `predict()` serves v1 (raw TorchServe body)
    and v2 (tensors) requests through the batcher."""

    def __init__(self, name: str, archive: str | Path, *, work_dir: str | Path, batch_size: int | None = None,
                 max_batch_delay_ms: float | None = None, workers: int | None = None):
        super().__init__(name)
        self.archive, self.work_dir = Path(archive), Path(work_dir)
        self.batch_size, self.max_batch_delay_ms, self.workers = batch_size, max_batch_delay_ms, workers
        self.engine = None
        self.batcher: _Batcher | None = None

    def load(self) -> bool:
        t = time.perf_counter()
        folder = resolve_archive(self.archive, self.work_dir, self.name)
        mcfg = _model_config(folder)
        # the archive's TorchServe settings, so one archive behaves alike on both runtimes:
        # minWorkers engines (each its own thread and caches), batchSize, maxBatchDelay
        workers = self.workers or int(mcfg.get("minWorkers", 1))
        engines = [build_engine(folder, mcfg) for _ in range(max(1, workers))]
        first = int(engines[0].vocab.item_ids[0])
        for e in engines:  # readiness means the engine answers: one request through every stage first
            e.handle({"user_id": 0, "history": [{"item_id": first, "action": 0, "ts": 0}], "k": 1,
                      "num_candidates": 1, "request_ts": 1})
        settle_heap()  # every engine loaded and warm: out of the garbage collector's full walks, once
        self.engine = engines[0]
        size = self.batch_size or int(mcfg.get("batchSize", 1))
        delay = self.max_batch_delay_ms if self.max_batch_delay_ms is not None else float(mcfg.get("maxBatchDelay", 0))
        self.batcher = _Batcher(engines, size, delay, stuck_s=float(mcfg.get("responseTimeout", 300)), model=self.name)
        self.ready = True
        log.info("unipinrec engine %s ready in %.1f s (%d workers, batch %d, delay %g ms)", self.engine.model_version,
                 time.perf_counter() - t, len(engines), size, delay)
        return self.ready

    async def healthy(self) -> bool:
        return bool(self.ready and self.engine is not None and self.batcher.healthy())

    async def predict(self, payload, headers: dict | None = None, response_headers: dict | None = None):
        if isinstance(payload, InferRequest):
            return await self._predict_v2(payload)
        return await self._predict_v1(payload, {k.lower(): v for k, v in (headers or {}).items()})

    # Decoding and validation run in a thread, not on the event loop: a 16 MiB body takes
    # seconds, and the loop also answers every other client and the health probes.
    async def _predict_v1(self, body, headers: dict):
        ct = headers.get("content-type")
        if ct is not None and str(ct).split(";")[0].strip().lower() != "application/json":
            raise ServingError(415, "Content-Type", f"must be application/json, got {ct!r}")
        data = await asyncio.to_thread(decode_json, body, self.engine.limits)
        if isinstance(data, dict) and "instances" in data and "user_id" not in data:
            return {"predictions": await self._instances(data["instances"])}
        (out,) = await self.batcher.submit([await asyncio.to_thread(parse_request, data, self.engine.limits)])
        if isinstance(out, ServingError):
            raise out
        return out

    def _parse_instances(self, instances) -> tuple[list, list, list]:
        if not isinstance(instances, list):
            raise ServingError(422, "instances", "expected a list of requests")
        if len(instances) > MAX_INSTANCES:
            raise ServingError(413, "instances", f"{len(instances)} instances is over the limit of {MAX_INSTANCES}")
        results: list = [None] * len(instances)
        valid, where = [], []
        for i, inst in enumerate(instances):
            try:
                valid.append(parse_request(inst, self.engine.limits))
                where.append(i)
            except ServingError as e:
                results[i] = e
        return results, valid, where

    async def _instances(self, instances) -> list[dict]:
        results, valid, where = await asyncio.to_thread(self._parse_instances, instances)
        if valid:
            for i, res in zip(where, await self.batcher.submit(valid)):
                results[i] = res
        for r in results:
            if isinstance(r, ServingError):
                _Metrics.get().errors.labels(str(r.status)).inc()
        return [r.to_dict() if isinstance(r, ServingError) else r for r in results]

    def _parse_v2(self, req: InferRequest) -> tuple[list, list[int]]:
        rows = v2_requests(req)
        offsets = [row.pop("_offset", 0) for row in rows]
        parsed = []
        for j, row in enumerate(rows):
            try:
                parsed.append(parse_request(row, self.engine.limits))
            except ServingError as e:
                raise ServingError(e.status, v2_field(e.field, j, offsets[j]), e.message) from None
        return parsed, offsets

    async def _predict_v2(self, req: InferRequest):
        parsed, offsets = await asyncio.to_thread(self._parse_v2, req)
        answers = await self.batcher.submit(parsed)
        for j, a in enumerate(answers):
            if isinstance(a, ServingError):
                raise ServingError(a.status, v2_field(a.field, j, offsets[j]), a.message)
        return v2_response(self.name, self.engine.model_version, self.engine.task_names, answers, req.id or "")

    def get_input_types(self) -> list[dict]:
        return [{"name": "user_id", "datatype": "INT64", "shape": [-1]},
                {"name": "history_length", "datatype": "INT64", "shape": [-1]},
                *[{"name": n, "datatype": "INT64", "shape": [-1]} for n in HISTORY_TENSORS],
                *[{"name": n, "datatype": "INT64", "shape": [-1]} for n in ("k", "num_candidates", "request_ts")],
                {"name": "exclude_seen", "datatype": "BOOL", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        tasks = self.engine.task_names if self.engine is not None else []
        return [{"name": "item_id", "datatype": "INT64", "shape": [-1, -1]},
                *[{"name": n, "datatype": "FP32", "shape": [-1, -1]}
                  for n in ("score", "retrieval_score", *[f"task_{t}" for t in tasks])],
                {"name": "num_items", "datatype": "INT64", "shape": [-1]}]


class _RawV1DataPlane(DataPlane):
    """KServe decodes v1 bodies with orjson (its own 400s, no NaN, no big integers): hand them to
    the model raw, so both runtimes decode and reject a body the same way."""

    def decode(self, body, headers, protocol_version: str = "v1", model_name: str | None = None):
        if protocol_version.lower() == "v1" and isinstance(body, (bytes, bytearray)):
            return bytes(body), {}
        return super().decode(body, headers, protocol_version, model_name)


# --- the server -----------------------------------------------------------------------------------


def _token_check(token_file: Path | None):
    """None (no auth) or a function headers -> bool; tokens re-read when the file changes."""
    if token_file is None:
        return None
    tokens = WatchedFile(token_file, parse_tokens)

    def ok(headers) -> bool:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get(TOKEN_HEADER, "").strip()
        known = tokens.get() or []
        return bool(given) and any(hmac.compare_digest(given.encode(), t) for t in known)

    return ok


def install(app, token_file: Path | None) -> None:
    """Our error bodies for ServingError; token auth on everything but health and metrics;
    KServe's model repository (load/unload) closed: management never faces clients."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def serving_error(request, exc: ServingError):
        _Metrics.get().errors.labels(str(exc.status)).inc()
        return JSONResponse(exc.to_dict(), status_code=exc.status)

    async def envelope_error(request, exc: RequestValidationError):
        # a v2 body that is not an inference request; FastAPI's own answer echoes the input,
        # and fails to render (a 500) when that input holds NaN or Infinity
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        status = 400 if err.get("type") == "json_invalid" else 422
        loc = () if status == 400 else tuple(p for p in err.get("loc", ()) if p not in ("body", "InferenceRequest"))
        field = _field_name(loc)  # ("inputs", 0, "shape") -> "inputs[0].shape"
        return await serving_error(request, ServingError(status, field, str(err.get("msg", "invalid request"))))

    async def http_error(request, exc: StarletteHTTPException):
        # the framework's own refusals (an unreadable body, an unknown route) in our envelope too
        field = _framework_field(exc.status_code, other="path")
        return await serving_error(request, ServingError(exc.status_code, field, str(exc.detail)))

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(RequestValidationError, envelope_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    check = _token_check(token_file)

    @app.middleware("http")
    async def guard(request, call_next):
        refused = _refusal(request, check)
        if refused is not None:  # not counted as a model error
            return JSONResponse(refused.to_dict(), status_code=refused.status)
        return await call_next(request)


def _refusal(request, check) -> ServingError | None:
    """What the server refuses from a request's head alone, before any body is read."""
    path, headers = request.url.path, request.headers
    if path.startswith("/v2/repository") or path.startswith("/docs") or path.startswith("/openapi"):
        return ServingError(404, "path", "no such route")
    if check is not None and not OPEN_PATHS.match(path) and not check(headers):
        return ServingError(401, "Authorization", "missing or invalid inference token")
    max_head = ConnectionLimits.max_head
    if head_bytes(request.scope) > max_head:  # h11 bounds only a head that arrives in pieces
        return ServingError(431, "headers", f"request head over {max_head} bytes")
    if "transfer-encoding" in headers:  # a chunked body would be read whole before any size check
        return ServingError(411, "Transfer-Encoding", "send the body with a Content-Length")
    if "inference-header-content-length" in headers:
        return ServingError(415, "Inference-Header-Content-Length",
                            "the binary tensor extension is not served: send JSON tensors")
    size = headers.get("content-length", "0")
    if not size.isdigit() or int(size) > MAX_BODY:
        return ServingError(413, "body", f"Content-Length {size[:20]!r} is not a size up to {MAX_BODY} bytes")
    return None


def _framework_field(status: int, other: str) -> str:
    """The field a framework's own refusal names: the body, the path, or `other`."""
    return "body" if status in (400, 422) else "path" if status in (404, 405, 501) else other


def envelope_kserve_errors(app) -> None:
    """KServe's own refusals (`{"error": text}`: a v2 body that is a JSON string, a model
    version route) in our envelope, naming `body` or `path` by status. Called once KServe's
    REST server has added its handlers."""
    from fastapi.responses import JSONResponse

    def wrap(handler):
        async def ours(request, exc):
            resp = await handler(request, exc)
            try:
                text = str(json.loads(resp.body)["error"])
            except (ValueError, KeyError, TypeError):
                return resp
            field = _framework_field(resp.status_code, other="server")
            return JSONResponse(ServingError(resp.status_code, field, text).to_dict(), status_code=resp.status_code)
        return ours

    for cls, handler in list(app.exception_handlers.items()):
        if getattr(handler, "__module__", "").startswith("kserve"):
            app.add_exception_handler(cls, wrap(handler))


def _bound_connections(config) -> None:
    """The gateway's limits on uvicorn (KServe-native has no gateway in front): a deadline on
    request heads (KServe's uvicorn waits forever for an unfinished head, before any token
    check: 20,000 of them ran the server out of file descriptors) and one on bodies (a client
    sending a byte now and then held its connection and KServe's read of the body), at most
    4,096 connections, heads within 16 KiB."""
    limits = ConnectionLimits()
    # from an answer, the next head may come as late as KServe keeps connections alive (65 s:
    # longer than the proxies' and load balancers' idle timeouts in front of it)
    config.http = _head_timed_protocol(limits.head_timeout_s, max(limits.head_timeout_s, config.timeout_keep_alive),
                                       body_timeout_s=limits.body_timeout_s)
    config.limit_concurrency = limits.max_connections
    config.backlog = limits.backlog
    config.h11_max_incomplete_event_size = limits.max_head


class _ModelServer(kserve.ModelServer):
    """KServe's ModelServer binding `host` (KServe's own binds 0.0.0.0), REST only."""

    def __init__(self, host: str, **kwargs):
        super().__init__(enable_grpc=False, workers=1, **kwargs)
        self.host = host
        self.dataplane = _RawV1DataPlane(model_registry=self.registered_models)

    def start(self, models: list) -> None:
        from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
        from kserve.protocol.rest.server import RESTServer

        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                       self.http_port, grace_period=self.grace_period,
                                       timeout_keep_alive=self.timeout_keep_alive, event_loop=self.event_loop)
        self._rest_server.config.host = self.host
        _bound_connections(self._rest_server.config)
        create = self._rest_server.create_application

        def create_then_envelope() -> None:  # KServe adds its error handlers as it starts
            create()
            envelope_kserve_errors(_model_server.app)

        self._rest_server.create_application = create_then_envelope
        self.servers.append(self._rest_server.start())
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


def serve(models: dict[str, Path], *, host: str = "127.0.0.1", port: int = 8080, work_dir: str | Path,
          token_file: Path | None = None, batch_size: int | None = None,
          max_batch_delay_ms: float | None = None, workers: int | None = None) -> None:
    """Load every archive (NAME -> path) and serve them until SIGTERM/SIGINT."""
    loaded = []
    for name, path in models.items():
        m = UniPinRecModel(name, path, work_dir=work_dir, batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms,
                           workers=workers)
        m.load()
        loaded.append(m)
    install(_model_server.app, token_file)
    _ModelServer(host, http_port=port, enable_latency_logging=False).start(loaded)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve unipinrec archives on KServe's model server.")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="archive (.mar, unpacked folder, or storageUri folder such as /mnt/models); repeatable")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--work-dir", required=True, help="writable folder the archives are unpacked into")
    p.add_argument("--token-file", type=Path, help="inference tokens, one per line (no file: no token auth)")
    p.add_argument("--batch-size", type=int, help="default: the archive's batchSize")
    p.add_argument("--max-batch-delay", type=float, help="ms; default: the archive's maxBatchDelay")
    p.add_argument("--workers", type=int, help="engines per model (default: the archive's minWorkers; more than "
                   "one breaks the split retrieve/rank flow, whose handles live in one engine)")
    args = p.parse_args(argv)
    models = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            p.error(f"--model: expected NAME=PATH, got {spec!r}")
        models[name] = Path(path)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    if args.token_file is not None and not args.token_file.is_file():
        p.error(f"--token-file: {args.token_file} is not a file")
    serve(models, host=args.host, port=args.http_port, work_dir=args.work_dir, token_file=args.token_file,
          batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the TorchServe handler (serving/handler.py) needs, kept in the library so it is tested
without TorchServe: build the engine from an extracted archive, check content types, emit
metrics. TorchServe itself is imported only lazily (metric dimensions), never at import time.

Archive layout (written by `unipinrec.serving.torchserve.build_archive`):

    serving.json   {"engine": {EngineConfig fields}, "ranking": bool, "store": null | {...},
                    "torch_threads": null | int}
    model/         the (retrieval or unified) model folder
    ranking/       the ranking-only model folder (two-model baseline only)
    index/         the item index built for model/
"""
from __future__ import annotations

import importlib
import json
from email.message import Message
from pathlib import Path

from .engine import Engine, EngineConfig
from .request import ServingError
from .store import InMemoryStore

SERVING_JSON = "serving.json"


def engine_config(spec: dict, overrides: dict | None = None) -> EngineConfig:
    from ..config import from_dict

    return from_dict(EngineConfig, {**spec.get("engine", {}), **(overrides or {})}, "engine")


def make_store(spec: dict | None, base: Path):
    """None; {"kind": "examples", "path": EX (relative to the archive), "split": "test"};
    or {"factory": "module:function", "kwargs": {...}} for an external store (e.g. Feast)."""
    if not spec:
        return None
    if spec.get("kind") == "examples":
        return InMemoryStore.from_examples(base / spec["path"], spec.get("split", "test"))
    if "factory" in spec:
        module, _, name = spec["factory"].partition(":")
        return getattr(importlib.import_module(module), name)(**spec.get("kwargs", {}))
    raise ValueError(f"store: unknown spec {spec!r} (kind 'examples' or a 'factory')")


def build_engine(model_dir: Path, model_yaml_config: dict) -> Engine:
    spec = json.loads((model_dir / SERVING_JSON).read_text())
    handler_cfg = (model_yaml_config or {}).get("handler") or {}
    config = engine_config(spec, handler_cfg.get("engine"))
    threads = handler_cfg.get("torch_threads", spec.get("torch_threads"))
    if threads:  # process-wide, so set here at the edge rather than in the engine
        import torch

        torch.set_num_threads(int(threads))
    store = make_store(handler_cfg.get("store", spec.get("store")), model_dir)
    ranking = model_dir / "ranking" if spec.get("ranking") else None
    return Engine.from_dirs(model_dir / "model", model_dir / "index", ranking_dir=ranking, config=config, store=store)


def _header(ctx, idx: int, name: str):
    try:
        return ctx.get_request_header(idx, name)
    except Exception:  # noqa: BLE001  (contexts without request processors)
        return None


def content_type_error(ctx, idx: int, item: dict) -> ServingError | None:
    """A 415 unless the request came as application/json (TorchServe turns a form-encoded body
    into form fields and hands other types over as bytes/str under 'body')."""
    ct = None
    body_hdr = _header(ctx, idx, "body")
    if isinstance(body_hdr, dict):
        ct = body_hdr.get("content-type")
    for name in ("Content-Type", "content-type"):
        ct = ct or _header(ctx, idx, name)
    if "body" not in item and "data" not in item:
        return ServingError(415, "Content-Type", f"send the request as application/json (got {ct or 'form fields'})")
    if ct is not None and media_type(ct) != "application/json":
        return ServingError(415, "Content-Type", f"must be application/json, got {ct!r}")
    return None


def media_type(content_type) -> str:
    """'application/json' of 'Application/JSON; charset=utf-8': the type alone, lowercased, parsed
    as email headers are (a prefix match would take 'application/jsonx'); 'text/plain' when it
    is not a type/subtype."""
    msg = Message()
    msg["content-type"] = str(content_type)
    return msg.get_content_type()


def body_size_error(ctx, idx: int, limit: int) -> ServingError | None:
    """A 413 when the request's Content-Length is over `limit` (TorchServe may have decoded the
    JSON already, so the raw size is known only from the header)."""
    for name in ("Content-Length", "content-length"):
        value = _header(ctx, idx, name)
        if value is not None:
            try:
                size = int(value)
            except (TypeError, ValueError):
                return None
            if size > limit:
                return ServingError(413, "body", f"{size} bytes is over the limit of {limit}")
            return None
    return None


class _Emitter:
    """Turns per-batch results into TorchServe metrics (declared in serving/metrics.yaml)."""

    def __init__(self):
        self.last = {"hits": 0, "extends": 0, "misses": 0}

    def __call__(self, ctx, engine: Engine, results: list) -> None:
        metrics = getattr(ctx, "metrics", None)
        if metrics is None:
            return
        from ts.metrics.dimension import Dimension
        from ts.metrics.metric_type_enum import MetricTypes

        ok = [r for r in results if isinstance(r, dict)]
        if ok:
            for stage, ms in ok[0].get("timings_ms", {}).items():
                # seconds: Prometheus' default histogram buckets (5 ms .. 10 s) are in seconds
                metrics.add_time("UniPinRecStageLatencySeconds", ms / 1000.0, None, "s", [Dimension("Stage", stage)],
                                 MetricTypes.HISTOGRAM)
            cold = sum(1 for r in ok if r.get("cold_start"))
            if cold:
                metrics.add_counter("UniPinRecColdStarts", cold, None, [])
            degraded = [r["degraded"] for r in ok if r.get("degraded")]
            for reason in set(degraded):  # answered in retrieval order: ranking would miss the deadline
                metrics.add_counter("UniPinRecDegraded", degraded.count(reason), None, [Dimension("Reason", reason)])
        metrics.add_counter("UniPinRecBatchRequests", len(results), None, [])
        stats = engine.user_cache.stats.as_dict()
        for result, total in stats.items():
            delta = total - self.last[result]
            if delta:
                metrics.add_counter("UniPinRecKVCacheLookups", delta, None, [Dimension("Result", result)])
        self.last = stats
        for r in results:
            if isinstance(r, ServingError):
                metrics.add_counter("UniPinRecErrors", 1, None, [Dimension("Status", str(r.status))])


emit_metrics = _Emitter()

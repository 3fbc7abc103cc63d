"""TorchServe entry point for UniPinRec: a thin adapter over `unipinrec.serving.Engine`.

The archive (`unipinrec package`) holds model/ (and ranking/ for the two-model baseline),
index/ and serving.json; the model-config YAML's `handler:` section may override the engine
settings. Per request in a TorchServe batch: check the content type, decode and validate the
body (4xx naming the field), then hand all valid requests to the engine at once.
TorchServe calls `handle(None, ctx)` once at load time: that builds the engine, on the GPU
TorchServe assigned this worker (`gpu_id`; `number_of_gpu` in config.properties) unless the
model-config YAML names `handler.engine.device` itself.
"""
from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from pathlib import Path

from unipinrec.serving.engine import settle_heap
from unipinrec.serving.handler_support import body_size_error, build_engine, content_type_error, emit_metrics
from unipinrec.serving.request import ServingError, parse_request

log = logging.getLogger(__name__)
_engine = None


def _body(item: dict):
    """TorchServe hands a JSON body as 'body' (decoded, or bytes when it could not decode it)."""
    if "body" in item:
        return item["body"]
    return item.get("data")


def with_assigned_gpu(model_yaml_config: dict, system_properties: dict) -> dict:
    """The model config with the engine on cuda:<gpu_id> when TorchServe gave this worker a GPU
    (and the config names no device); CUDA graphs are captured on that device."""
    handler = dict(model_yaml_config.get("handler") or {})
    engine = dict(handler.get("engine") or {})
    gpu_id = system_properties.get("gpu_id")
    if gpu_id is None or "device" in engine:
        return model_yaml_config
    import torch

    if not torch.cuda.is_available():
        return model_yaml_config
    torch.cuda.set_device(int(gpu_id))
    return {**model_yaml_config, "handler": {**handler, "engine": {**engine, "device": f"cuda:{int(gpu_id)}"}}}


def handle(data, ctx):
    global _engine
    if _engine is None:
        t = time.perf_counter()
        _engine = build_engine(Path(ctx.system_properties["model_dir"]),
                               with_assigned_gpu(getattr(ctx, "model_yaml_config", None) or {}, ctx.system_properties))
        settle_heap()  # loaded: out of the garbage collector's full walks
        log.info("unipinrec engine ready in %.1f s: %s", time.perf_counter() - t, _engine.model_version)
    if data is None:
        return None

    results: list = [None] * len(data)
    valid, where = [], []
    for i, item in enumerate(data):
        try:
            err = content_type_error(ctx, i, item) or body_size_error(ctx, i, _engine.limits.max_body_bytes)
            if err is not None:
                raise err
            valid.append(parse_request(_body(item), _engine.limits))
            where.append(i)
        except ServingError as e:
            results[i] = e
    if valid:
        try:
            for i, res in zip(where, _engine.handle_batch(valid)):
                results[i] = res
        except Exception:  # a bug, not bad input: answer 500 for this batch, keep the worker alive
            log.exception("unipinrec engine failed on a batch of %d", len(valid))
            for i in where:
                results[i] = ServingError(500, "server", "internal error while serving this request")

    out = []
    for i, res in enumerate(results):
        if isinstance(res, ServingError):
            # the standard reason phrase: messages may quote client input (never into a header)
            ctx.set_response_status(res.status, HTTPStatus(res.status).phrase, i)
            out.append(json.dumps(res.to_dict()))
        else:
            out.append(json.dumps(res))
        try:
            ctx.set_response_content_type(i, "application/json")
        except Exception:  # noqa: BLE001  (older contexts without a request processor)
            pass
    emit_metrics(ctx, _engine, results)
    return out

"""Serving: request validation, the engine (encode once, retrieve, rank on the same KV cache),
caches, the online-store interface, and TorchServe packaging. See docs/serving.md.

Names are imported lazily so that `unipinrec.serving.request` stays light (pydantic only).
"""
from __future__ import annotations

_EXPORTS = {
    "Request": "request", "ServingError": "request", "parse_request": "request", "Limits": "request",
    "Engine": "engine", "EngineConfig": "engine",
    "OnlineStore": "store", "InMemoryStore": "store", "History": "store",
    "UserKVCache": "kv_cache", "HandleStore": "kv_cache",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS)

"""The one interface between the deploy logic and Kubernetes.

Everything the deploy step does to a cluster goes through `KubeApi`: read an object, apply
one with server-side apply, read a Secret value, and send an HTTP request to a Service.
`unipinrec.deploy.kube.KubernetesApi` implements it with the `kubernetes` client; tests use
an in-memory fake. Objects are plain dicts, exactly as `kubectl kustomize` renders them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Obj = dict[str, Any]


class DeployError(RuntimeError):
    """The deploy step cannot go on (bad input, missing object, API refusal)."""


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    name: str
    namespace: str | None = None

    @classmethod
    def of(cls, obj: Obj) -> "ObjectRef":
        meta = obj.get("metadata") or {}
        return cls(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{where}{self.name}"


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class KubeApi(Protocol):
    def get(self, ref: ObjectRef) -> Obj | None:
        """The live object, or None when it does not exist."""

    def apply(self, obj: Obj, *, field_manager: str) -> Obj:
        """Server-side apply (force conflicts) of one object; returns the live object."""

    def read_secret(self, namespace: str, name: str, key: str) -> str:
        """One decoded value of a Secret; raises DeployError when the Secret or key is missing."""

    def service_request(self, namespace: str, service: str, port: int, method: str, path: str,
                        body: bytes | None = None, headers: dict[str, str] | None = None,
                        timeout_s: float = 30.0) -> HttpReply:
        """An HTTP request to a Service port (in-cluster DNS, or the API server's service proxy)."""

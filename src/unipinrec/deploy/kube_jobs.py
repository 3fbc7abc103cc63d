"""`JobApi` over the `kubernetes` client: `KubernetesApi` plus delete, list and pod logs (trainjob.py)."""
from __future__ import annotations

from .api import Obj, ObjectRef
from .kube import KubernetesApi


class KubernetesJobApi(KubernetesApi):
    def delete(self, ref: ObjectRef) -> bool:
        from kubernetes.dynamic.exceptions import NotFoundError

        res = self._resource(ref.api_version, ref.kind)
        try:
            res.delete(name=ref.name, namespace=ref.namespace, propagation_policy="Foreground")
        except NotFoundError:
            return False
        return True

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[Obj]:
        res = self._resource(api_version, kind)
        return [item.to_dict() for item in res.get(namespace=namespace, label_selector=label_selector).items]

    def pod_log(self, namespace: str, name: str, *, container: str, tail_lines: int) -> str:
        try:
            return self._core.read_namespaced_pod_log(name, namespace, container=container, timestamps=True,
                                                      tail_lines=tail_lines)
        except self._api_exception as e:
            if e.status in (400, 404):  # the container has not started yet, or the pod is gone
                return ""
            raise

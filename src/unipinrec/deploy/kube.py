"""`KubeApi` over the official `kubernetes` client (imported here, lazily, never at package import).

Inside a pod (the Kubeflow deploy component) Services are reached by cluster DNS; from a
workstation through the API server's service proxy. The API server consumes the
`Authorization` header itself, so through the proxy the inference token travels in
`X-UniPinRec-Token`, which the serving gateway also accepts.
"""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Literal

from .api import DeployError, HttpReply, Obj, ObjectRef

TOKEN_HEADER = "X-UniPinRec-Token"


class KubernetesApi:
    def __init__(self, *, context: str | None = None,
                 service_access: Literal["auto", "direct", "proxy"] = "auto") -> None:
        from kubernetes import client, config, dynamic
        from kubernetes.config.config_exception import ConfigException

        in_cluster = False
        if context is None:
            try:
                config.load_incluster_config()
                in_cluster = True
            except ConfigException:
                pass
        if not in_cluster:
            try:
                config.load_kube_config(context=context)
            except (ConfigException, FileNotFoundError) as e:
                raise DeployError(f"no Kubernetes credentials: {e} (set KUBECONFIG or run inside the cluster)") from e
        self._client = client.ApiClient()
        self._dyn = dynamic.DynamicClient(self._client)
        self._core = client.CoreV1Api(self._client)
        self._api_exception = client.exceptions.ApiException
        self.service_access = ("direct" if in_cluster else "proxy") if service_access == "auto" else service_access

    def _resource(self, api_version: str, kind: str):
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        try:
            return self._dyn.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError as e:
            raise DeployError(f"the cluster does not serve {kind} ({api_version}): is its CRD installed?") from e

    def get(self, ref: ObjectRef) -> Obj | None:
        from kubernetes.dynamic.exceptions import NotFoundError

        res = self._resource(ref.api_version, ref.kind)
        try:
            return res.get(name=ref.name, namespace=ref.namespace).to_dict()
        except NotFoundError:
            return None

    def apply(self, obj: Obj, *, field_manager: str) -> Obj:
        ref = ObjectRef.of(obj)
        res = self._resource(ref.api_version, ref.kind)
        live = res.server_side_apply(body=obj, name=ref.name, namespace=ref.namespace,
                                     field_manager=field_manager, force_conflicts=True)
        return live.to_dict()

    def read_secret(self, namespace: str, name: str, key: str) -> str:
        try:
            secret = self._core.read_namespaced_secret(name, namespace)
        except self._api_exception as e:
            raise DeployError(f"cannot read Secret {namespace}/{name}: HTTP {e.status} {e.reason}") from e
        data = secret.data or {}
        if key not in data:
            raise DeployError(f"Secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(data[key]).decode()

    def service_request(self, namespace: str, service: str, port: int, method: str, path: str,
                        body: bytes | None = None, headers: dict[str, str] | None = None,
                        timeout_s: float = 30.0) -> HttpReply:
        headers = dict(headers or {})
        if self.service_access == "direct":
            url = f"http://{service}.{namespace}.svc:{port}{path}"
            req = urllib.request.Request(url, data=body, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 - cluster-internal URL
                    return HttpReply(r.status, r.read(), dict(r.headers))
            except urllib.error.HTTPError as e:
                return HttpReply(e.code, e.read(), dict(e.headers or {}))
        if "Authorization" in headers:
            headers[TOKEN_HEADER] = headers.pop("Authorization").removeprefix("Bearer ").strip()
        url = f"/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy{path}"
        payload = json.loads(body) if body else None  # the client serialises JSON bodies itself
        try:
            resp = self._client.call_api(url, method, header_params=headers, body=payload,
                                         auth_settings=["BearerToken"], _preload_content=False,
                                         _return_http_data_only=True, _request_timeout=timeout_s)
            return HttpReply(resp.status, resp.data, dict(resp.headers))
        except self._api_exception as e:
            return HttpReply(e.status or 0, (e.body or b"") if isinstance(e.body, bytes) else str(e.body).encode())

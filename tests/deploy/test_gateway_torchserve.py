"""The serving container's command, for real: the gateway supervising TorchServe 0.12 with the
cluster config.properties (token auth on), like the Deployment runs it.

Where the test runs as root and `unshare` works, it reproduces the pod's filesystem: the root
is mounted read-only (readOnlyRootFilesystem), only the emptyDir paths (working directory,
TEMP, logs) are writable, and the process runs as uid 1000 (runAsNonRoot). Elsewhere it runs
the same command without those restrictions (and says so in the test id). The archive is a
tiny echo handler: this checks the container wiring, not the model (serving's own tests do).
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import unipinrec

from unipinrec.deploy.torchserve_config import torchserve_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
HANDLER = textwrap.dedent('''
    import json
    def handle(data, ctx):
        if data is None:
            return None
        out = []
        for row in data:
            body = row.get("body") or row.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            out.append({"items": [], "model_version": "echo", "echo": body})
        return out
''')


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _can_isolate() -> bool:
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "setpriv", "chroot")):
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


# Runs as root in a private mount namespace, then execs the gateway as uid 1000 in a chroot of a
# read-only view of / where only POD/{work,tmp,logs} are writable.
ISOLATE = r'''
set -e
R="$ROOTVIEW"
mount --bind / "$R"
mount -o remount,bind,ro "$R"
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=755 tmpfs "$R/tmp"
# a checkout or venv that lives under /tmp (CI clones may) stays visible, read-only
for d in $KEEP; do mkdir -p "$R$d"; mount --rbind "$d" "$R$d"; mount -o remount,bind,ro "$R$d"; done
# the interpreter may live under a directory uid 1000 cannot enter (e.g. /root): show only its path
if [ -n "$HIDDEN" ]; then
  mount -t tmpfs -o mode=755 tmpfs "$R$HIDDEN"
  mkdir -p "$R$HIDDEN_SUB"
  mount --rbind "$HIDDEN_SUB" "$R$HIDDEN_SUB"
fi
for d in work tmp logs; do mkdir -p "$R/tmp/pod/$d"; mount --bind "$POD/$d" "$R/tmp/pod/$d"; done
for d in store etc secrets; do mkdir -p "$R/tmp/pod/$d"; mount --bind "$POD/$d" "$R/tmp/pod/$d"; mount -o remount,bind,ro "$R/tmp/pod/$d"; done
cd "$R"
# prove the view is read-only for the pod's user before starting (the host's /var/tmp is world-writable)
if chroot "$R" setpriv --reuid 1000 --regid 1000 --clear-groups sh -c 'touch /var/tmp/unipinrec-ro-probe' 2>/dev/null; then
  echo "the root view is writable" >&2; exit 97
fi
exec chroot "$R" setpriv --reuid 1000 --regid 1000 --clear-groups --inh-caps=-all \
  env -C /tmp/pod/work "$@"
'''


def _kept_under_tmp() -> dict[str, str]:
    """The checkout and the venv when they live under /tmp, which the pod's view masks."""
    dirs = {os.path.realpath(REPO), os.path.realpath(BIN.parent)}
    return {"KEEP": " ".join(sorted(d for d in dirs if d.startswith("/tmp/")))}


def _hidden_dir() -> dict[str, str]:
    """The topmost ancestor of the interpreter that uid 1000 cannot enter, and its child on the path."""
    path = Path(os.path.realpath(sys.executable))
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            child = parent / path.relative_to(parent).parts[0]
            return {"HIDDEN": str(parent), "HIDDEN_SUB": str(child)}
    return {"HIDDEN": "", "HIDDEN_SUB": ""}


@pytest.fixture(scope="module", params=["isolated" if _can_isolate() else "plain"])
def pod(request, tmp_path_factory):
    """The running container; "isolated" (read-only root, uid 1000) where the machine allows it."""
    if shutil.which("java") is None or not (BIN / "torchserve").exists():
        pytest.skip("TorchServe needs java and the torchserve package")
    isolated = request.param == "isolated"
    base = tmp_path_factory.mktemp("pod")
    os.chmod(base, 0o755)
    for d in ("work", "tmp", "logs", "store", "etc", "secrets", "build"):
        (base / d).mkdir()
    (base / "build" / "handler.py").write_text(HANDLER)
    subprocess.run([str(BIN / "torch-model-archiver"), "--model-name", "unipinrec", "--version", "1.0",
                    "--handler", str(base / "build" / "handler.py"), "--export-path", str(base / "store"), "-f"],
                   check=True, capture_output=True)
    inference, management, metrics, grpc_inf, grpc_mgmt, gateway = _free_ports(6)
    inside = Path("/tmp/pod") if isolated else base
    (base / "etc" / "config.properties").write_text(torchserve_config(
        str(inside / "store"), ports=(inference, management, metrics, grpc_inf, grpc_mgmt), metrics_host="127.0.0.1",
        metrics_config=str(REPO / "serving" / "metrics.yaml"), log_config=str(REPO / "serving" / "log4j2.xml")))
    (base / "secrets" / "token").write_text("tok-123\n")
    if isolated:
        for d in ("work", "tmp", "logs"):
            os.chown(base / d, 1000, 1000)
    env = {"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "TEMP": str(inside / "tmp"), "TMPDIR": str(inside / "tmp"),
           "HOME": str(inside / "tmp"), "LOG_LOCATION": str(inside / "logs"), "METRICS_LOCATION": str(inside / "logs"),
           "PYTHONDONTWRITEBYTECODE": "1", "UNIPINREC_LOG_MAX_SIZE": "16 KB",  # rotation within a test
           "PYTHONPATH": str(Path(unipinrec.__file__).resolve().parents[1])}  # the package under test
    cmd = [str(BIN / "python"), "-m", "unipinrec.serving.gateway", f"--listen=127.0.0.1:{gateway}",
           f"--upstream=http://127.0.0.1:{inference}", f"--management=http://127.0.0.1:{management}",
           f"--key-file={inside}/work/key_file.json", f"--token-file={inside}/secrets/token", "--",
           "torchserve", "--start", "--foreground", "--ncs", f"--ts-config={inside}/etc/config.properties"]
    if isolated:
        rootview = tmp_path_factory.mktemp("rootview")
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", ISOLATE, "isolate",
                "env", *[f"{k}={v}" for k, v in env.items()], *cmd]
        proc = subprocess.Popen(argv, env={**env, "ROOTVIEW": str(rootview), "POD": str(base), **_hidden_dir(), **_kept_under_tmp()},
                                stdout=open(base / "out.log", "wb"), stderr=subprocess.STDOUT)
    else:
        proc = subprocess.Popen(cmd, env=env, cwd=base / "work", stdout=open(base / "out.log", "wb"),
                                stderr=subprocess.STDOUT)
    info = {"proc": proc, "base": base, "gateway": gateway, "inference": inference, "metrics": metrics,
            "grpc": (grpc_inf, grpc_mgmt), "isolated": isolated}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if _call(gateway, "GET", "/ping")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"gateway/TorchServe did not become healthy:\n{(base / 'out.log').read_text()[-4000:]}")
    yield info
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        _kill_leftovers(base)


def _kill_leftovers(base: Path) -> None:
    for p in psutil.process_iter(["cmdline"]):
        if str(base) in " ".join(p.info["cmdline"] or []) or "/tmp/pod/" in " ".join(p.info["cmdline"] or []):
            p.kill()


def _call(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                 headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def test_token_auth_is_on_in_torchserve_itself(pod):
    status, body = _call(pod["inference"], "POST", "/predictions/unipinrec", {"user_id": 1})
    assert status == 400 and b"Token Authorization failed" in body  # TorchServe 0.12 answers 400
    # ... with its own error type: what the gateway's key refresh keys on (never the text)
    assert json.loads(body)["type"] == "InvalidKeyException" and set(json.loads(body)) == {"code", "type", "message"}
    assert _call(pod["inference"], "GET", "/ping")[0] == 400  # even /ping needs the key
    keys = json.loads((pod["base"] / "work" / "key_file.json").read_text())
    assert set(keys) == {"management", "inference", "API"}
    # TorchServe always starts gRPC servers (after HTTP): they must sit on the configured loopback ports
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listening = {c.laddr.port: c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
        if all(p in listening for p in pod["grpc"]):
            break
        time.sleep(0.5)
    for p in pod["grpc"]:
        addr = ipaddress.ip_address(listening[p])  # Java may report the IPv4-mapped form ::ffff:127.0.0.1
        assert (getattr(addr, "ipv4_mapped", None) or addr).is_loopback, listening[p]


def test_gateway_serves_probes_and_authenticated_predictions(pod):
    port = pod["gateway"]
    status, body = _call(port, "GET", "/ping")  # the fixture waited for this: a worker is READY
    assert status == 200 and json.loads(body) == {"status": "Healthy", "ready_workers": 1}
    assert _call(port, "GET", "/livez")[0] == 200
    assert _call(port, "POST", "/predictions/unipinrec", {"user_id": 1})[0] == 401
    status, body = _call(port, "POST", "/predictions/unipinrec", {"user_id": 7, "k": 2},
                         {"Authorization": "Bearer tok-123"})
    assert status == 200 and json.loads(body)["echo"] == {"user_id": 7, "k": 2}


def test_metrics_need_no_token(pod):
    status, body = _call(pod["metrics"], "GET", "/metrics")
    assert status == 200 and b"# TYPE" in body


def test_torchserve_wrote_only_into_the_emptydirs(pod):
    base = pod["base"]
    assert (base / "work" / "key_file.json").exists()  # the working directory
    assert any((base / "tmp").iterdir())  # unpacked archive, sockets
    assert any((base / "logs").glob("*.log"))
    if pod["isolated"]:
        # the process ran as uid 1000 with a read-only root: the files it made are uid 1000's
        assert (base / "work" / "key_file.json").stat().st_uid == 1000


def test_every_log_file_is_rotated_and_each_line_written_once(pod):
    """serving/log4j2.xml through the cluster config (vmargs): logs roll at UNIPINREC_LOG_MAX_SIZE
    into at most 5 gzipped files each; TorchServe's built-in config wrote DEBUG lines twice and
    rotated nothing it copied to the console."""
    conn = http.client.HTTPConnection("127.0.0.1", pod["gateway"], timeout=30)
    for i in range(400):  # ~120 bytes of access log each
        conn.request("POST", "/predictions/unipinrec", body=json.dumps({"user_id": i}).encode(),
                     headers={"Content-Type": "application/json", "Authorization": "Bearer tok-123"})
        assert conn.getresponse().read()
    conn.close()
    logs = pod["base"] / "logs"
    assert list(logs.glob("access_log.*.log.gz")), sorted(p.name for p in logs.iterdir())
    for name in ("access_log", "model_log", "ts_log", "model_metrics", "ts_metrics"):
        assert len(list(logs.glob(f"{name}.*.log.gz"))) <= 5
    for path in logs.glob("*.log"):
        assert path.stat().st_size < 16 * 1024 + 4096, path  # one roll size (+ the line that crossed it)
    lines = (logs / "ts_log.log").read_text().splitlines()
    assert lines and not [line for line in lines if "[DEBUG]" in line]
    assert len(set(lines)) > 0.9 * len(lines)  # not every line twice
    assert "-Dlog4j.configurationFile=" in (pod["base"] / "etc" / "config.properties").read_text()


def test_sigterm_stops_gateway_and_torchserve(pod):
    proc = pod["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    time.sleep(1)
    left = [p for p in psutil.process_iter(["cmdline"])
            if str(pod["base"]) in " ".join(p.info["cmdline"] or [])
            or (pod["isolated"] and "/tmp/pod/" in " ".join(p.info["cmdline"] or []))]
    assert left == [], [p.info["cmdline"] for p in left]

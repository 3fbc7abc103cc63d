"""The images, without a Docker engine: every COPY source exists and survives .dockerignore,
entrypoints and commands resolve to things the image installs, users are non-root, bases are
pinned, and the images install exactly the pins of pyproject.toml + constraints.txt."""
from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "images"
IMAGES = {"pipeline": DOCKER / "Dockerfile.pipeline", "serving": DOCKER / "Dockerfile.serving",
          "kserve": DOCKER / "Dockerfile.kserve"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerignore_excludes(rel: str) -> bool:
    """Docker's rules: later patterns win, `!` re-includes, a path is excluded with its parents."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.lstrip().startswith("#")]
    parts = rel.strip("/").split("/")
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        for i in range(1, len(parts) + 1):
            if re.fullmatch(regex, "/".join(parts[:i])):
                excluded = not neg
                break
    return excluded


def _json_or_shell(args: str) -> list[str]:
    return yaml.safe_load(args) if args.startswith("[") else shlex.split(args)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_every_copy_source_exists_and_is_in_the_build_context(image):
    copies = [_json_or_shell(a) for i, a in instructions(IMAGES[image]) if i == "COPY"]
    assert copies
    for args in copies:
        assert not any(a.startswith("--from") for a in args)
        for src in args[:-1]:
            path = REPO / src
            assert path.exists(), f"{image}: COPY {src} does not exist"
            assert not dockerignore_excludes(src), f"{image}: COPY {src} is excluded by .dockerignore"
            if path.is_dir():  # and the files the image needs inside it are not filtered out
                for f in path.rglob("*"):
                    if f.is_file() and f.suffix in (".py", ".yaml", ".json", ".properties", ".xml") and "__pycache__" not in f.parts:
                        assert not dockerignore_excludes(str(f.relative_to(REPO))), f"{image}: {f} excluded"


def test_dockerignore_keeps_secrets_data_and_local_state_out():
    for path in (".venv/bin/python", ".git/config", "runs/model/model.safetensors", "data/ml-1m/ratings.dat",
                 "x/unipinrec.mar", "feature_repo/data/registry.db", "work/key_file.json", "events.parquet",
                 "tests/test_format.py"):
        assert dockerignore_excludes(path), path
    for path in ("src/unipinrec/data/synthetic.py", "serving/handler.py", "pyproject.toml", "README.md"):
        assert not dockerignore_excludes(path), path


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_base_is_pinned_and_the_user_is_numeric_non_root(image):
    ins = instructions(IMAGES[image])
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in ins if i == "ARG" and "=" in a}
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    assert ("FROM", "${BASE_IMAGE}") in ins
    users = [a for i, a in ins if i == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users  # numeric: kubelet can verify runAsNonRoot


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_images_install_the_project_pins(image):
    text = IMAGES[image].read_text()
    runs = " ".join(a for i, a in instructions(IMAGES[image]) if i == "RUN")
    pips = [p.strip() for p in re.findall(r"pip install ([^&;]+)", runs)]
    assert pips == ['--index-url "${TORCH_INDEX_URL}" "$(grep -E \'^torch==\' constraints.txt)"',
                    "-c constraints.txt '.[platform]'"], pips
    assert not re.search(r"==\d", text), "versions come from constraints.txt, never from the Dockerfile"
    copied = {s for i, a in instructions(IMAGES[image]) if i == "COPY" for s in _json_or_shell(a)[:-1]}
    assert {"pyproject.toml", "constraints.txt", "README.md", "src/"} <= copied


def test_constraints_pin_every_exact_requirement_of_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["platform"]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, ver = line.split("==")
            pins[name.lower().replace("_", "-")] = ver.strip()
    for req in reqs:
        if "==" in req:
            name, ver = req.split("==")
            name = re.sub(r"\[.*\]", "", name).lower().replace("_", "-")
            assert pins.get(name) == ver, f"{req}: constraints.txt has {pins.get(name)}"
    torch = next(r for r in (REPO / "constraints.txt").read_text().splitlines() if r.startswith("torch=="))
    assert torch == next(r for r in project["dependencies"] if r.startswith("torch=="))


def _module_file(module: str) -> Path:
    base = REPO / "src" / Path(*module.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__main__.py"


def test_serving_entrypoint_resolves():
    ins = instructions(IMAGES["serving"])
    assert _json_or_shell(dict(ins)["ENTRYPOINT"]) == ["tini", "--"]
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert re.search(r"apt-get install [^&]*\btini\b", runs) and "openjdk-17-jre-headless" in runs
    cmd = _json_or_shell(dict(ins)["CMD"])
    assert cmd[:3] == ["python", "-m", "unipinrec.serving.gateway"] and _module_file(cmd[2]).is_file()
    assert "__main__" in _module_file(cmd[2]).read_text()
    # the gateway's HTTP server comes with the platform extra the image installs
    platform = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["platform"]
    assert any(r.startswith("uvicorn==") for r in platform) and "uvicorn" in runs
    ts = cmd[cmd.index("--") + 1:]
    assert ts[0] == "torchserve" and "torchserve==0.12.0" in (REPO / "pyproject.toml").read_text()
    assert "--disable-token-auth" not in cmd


def test_kserve_image_runs_the_kserve_model_server_without_java():
    ins = instructions(IMAGES["kserve"])
    assert _json_or_shell(dict(ins)["ENTRYPOINT"]) == ["tini", "--"]
    cmd = _json_or_shell(dict(ins)["CMD"])
    assert cmd[:3] == ["python", "-m", "unipinrec.serving.kserve_model"] and _module_file(cmd[2]).is_file()
    assert "__main__" in _module_file(cmd[2]).read_text()
    assert "--token-file=/var/run/secrets/unipinrec/token" in cmd  # token auth on, as in manifests/kserve/native
    assert "openjdk" not in " ".join(a for i, a in ins if i == "RUN")
    assert "kserve==" in (REPO / "pyproject.toml").read_text()  # in the platform extra the image installs


def test_pipeline_image_runs_the_cli():
    ins = instructions(IMAGES["pipeline"])
    assert _json_or_shell(dict(ins)["CMD"])[0] == "unipinrec"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["unipinrec"] == "unipinrec.cli:main"
    assert "install -y --no-install-recommends kubectl" in " ".join(a for i, a in ins if i == "RUN")  # the deploy step renders overlays


def _image_paths(image: str) -> dict[str, Path]:
    """Absolute in-image path -> repository path, from WORKDIR + COPY."""
    out, workdir = {}, "/"
    for i, a in instructions(IMAGES[image]):
        if i == "WORKDIR":
            workdir = a
        if i == "COPY":
            *srcs, dest = _json_or_shell(a)
            for s in srcs:
                target = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
                out[target.rstrip("/") + ("/" if s.endswith("/") else "")] = REPO / s
    return out


def _in_image(image: str, path: str) -> Path | None:
    for dest, src in _image_paths(image).items():
        if dest.endswith("/") and path.startswith(dest):
            return src / path[len(dest):]
        if path == dest:
            return src
    return None


def test_manifest_commands_resolve_inside_their_images():
    base = {d["kind"] + "/" + d["metadata"]["name"]: d for f in (REPO / "manifests" / "base").glob("*.yaml")
            if f.name != "kustomization.yaml" for d in yaml.safe_load_all(f.read_text()) if d}
    pod = base["Deployment/unipinrec-serving"]["spec"]["template"]["spec"]
    fetch = pod["initContainers"][0]["command"]
    assert fetch[:2] == ["python", "-m"] and _module_file(fetch[2]).is_file()
    main = pod["containers"][0]
    assert main["command"][:2] == ["tini", "--"] and _module_file(main["command"][4]).is_file()
    config_mount = next(m["mountPath"] for m in main["volumeMounts"] if m["name"] == "config")
    assert f"--ts-config={config_mount}/config.properties" in main["args"]
    # metrics_config of the generated config.properties is a file the serving image holds
    props = dict(line.split("=", 1) for line in (REPO / "manifests/base/config.properties").read_text().splitlines()
                 if "=" in line and not line.startswith("#"))
    src = _in_image("serving", props["metrics_config"])
    assert src is not None and src.is_file(), props["metrics_config"]
    # the image prepares the mount points the pod's emptyDirs use
    runs = " ".join(a for i, a in instructions(IMAGES["serving"]) if i == "RUN")
    for m in main["volumeMounts"]:
        if m["mountPath"].startswith("/home/model-server/"):
            assert m["mountPath"] in runs, m["mountPath"]
    # the feature server's repo and config live where the pipeline image copies them
    feast = yaml.safe_load_all((REPO / "manifests/feast/feature-server.yaml").read_text())
    dep = next(d for d in feast if d["kind"] == "Deployment")
    cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[0] == "feast" and _in_image("pipeline", cmd[cmd.index("-f") + 1]).is_file()
    assert _in_image("pipeline", cmd[cmd.index("-c") + 1] + "/").is_dir()
    # the retraining CronJob's command is a registered CLI command, and its options are that command's
    cron = next(yaml.safe_load_all((REPO / "manifests/retraining/cronjob.yaml").read_text()))
    c = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    from typer.main import get_command

    from unipinrec.cli import app
    command = get_command(app)
    for word in c["command"][1:]:
        assert word in command.commands, c["command"]
        command = command.commands[word]
    options = {o for p in command.params for o in p.opts}
    assert {a.split("=", 1)[0] for a in c["args"]} <= options, c["args"]

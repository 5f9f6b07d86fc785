"""Real Label Studio for end-to-end tests: a cached virtualenv, a managed server process, API helpers.

Only the standard library and `requests` are used here, so the file also runs as a script:

    python tests/e2e/harness.py ensure-label-studio     # create/verify the cached Label Studio venv

Label Studio lives in its OWN virtualenv outside the repository (its pins clash with ours), under
`${YOLO_BACKEND_TEST_CACHE:-~/.cache/yolo-backend-tests}/label-studio-<version>`.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

try:
    import requests
except ImportError:  # `ensure-label-studio` needs only the standard library; everything else needs requests
    requests = None

LABEL_STUDIO_SPEC = os.environ.get("YOLO_BACKEND_TEST_LS_SPEC", "label-studio==1.23.*")
LABEL_STUDIO_DIRNAME = "label-studio-1.23"
MARKER_NAME = ".install-complete"


def cache_dir() -> Path:
    root = os.environ.get("YOLO_BACKEND_TEST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "yolo-backend-tests")
    return Path(root)


def base_python() -> str:
    """A plain CPython 3.10+ to build the Label Studio venv from (never our project venv itself)."""
    explicit = os.environ.get("LABEL_STUDIO_PYTHON")
    if explicit:
        return explicit
    versioned = os.path.join(sys.base_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    for candidate in (versioned, os.path.join(sys.base_prefix, "bin", "python3")):
        if os.path.exists(candidate):
            return candidate
    return sys.executable


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float = 1800.0):
    """Exclusive lock so parallel test sessions/CI steps do not install into the same venv at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process holds {path} for more than {timeout:.0f} s; "
                                       "remove it if no install is running") from None
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(argv: list[str], verbose: bool) -> str:
    """Run a setup command; on failure raise with its output, so a broken install says why."""
    result = subprocess.run(argv, text=True, stdout=None if verbose else subprocess.PIPE,
                            stderr=None if verbose else subprocess.STDOUT)
    if result.returncode != 0:
        output = "\n".join((result.stdout or "").splitlines()[-40:])
        raise RuntimeError(f"{' '.join(argv)} failed with exit code {result.returncode}\n{output}")
    return result.stdout or ""


def ensure_label_studio(verbose: bool = True) -> Path:
    """Return the venv's `label-studio` executable, creating the venv first if needed.

    The marker file is written only after a successful install and import check, so an interrupted or
    broken install is thrown away and rebuilt on the next call.
    """
    venv = cache_dir() / LABEL_STUDIO_DIRNAME
    marker = venv / MARKER_NAME
    exe = venv / "bin" / "label-studio"
    with _file_lock(cache_dir() / f"{LABEL_STUDIO_DIRNAME}.lock"):
        if marker.exists() and marker.read_text().strip() == LABEL_STUDIO_SPEC and exe.exists():
            return exe
        if venv.exists():
            print(f"[harness] removing incomplete Label Studio venv {venv}", file=sys.stderr)
            shutil.rmtree(venv)
        python = base_python()
        print(f"[harness] creating Label Studio venv {venv} from {python} ({LABEL_STUDIO_SPEC}); "
              "this takes a few minutes", file=sys.stderr)
        _run([python, "-m", "venv", str(venv)], verbose)
        vpy = str(venv / "bin" / "python")
        _run([vpy, "-m", "pip", "install", "-q", LABEL_STUDIO_SPEC], verbose)
        # Import check without starting a server (`label-studio --version` would start one).
        version = _run([vpy, "-c", "import label_studio; print(label_studio.__version__)"], False).strip()
        if not exe.exists():
            raise RuntimeError(f"pip installed label-studio {version} but {exe} is missing")
        marker.write_text(LABEL_STUDIO_SPEC + "\n")
        print(f"[harness] Label Studio {version} ready in {venv}", file=sys.stderr)
        return exe


# --------------------------------------------------------------------------------------------------------
# Processes we start (and only those): own process group, log file, stop by PID
# --------------------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path | str, lines: int = 60) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


RUNNING: list["ManagedProcess"] = []  # every process the harness started, for log tails on test failure


class ManagedProcess:
    """A child process in its own session (process group) with its output in a log file.

    `stop()` signals only that process group, which we created, so nothing else on the machine is touched.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: str | None = None):
        self.name = name
        self.argv = argv
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        RUNNING.append(self)
        atexit.register(self.stop)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return f"----- {self.name} log {self.log_path} (last {lines} lines) -----\n{tail(self.log_path, lines)}"

    def wait_http(self, url: str, timeout: float, ok=lambda r: r.status_code == 200, abort=None,
                  abort_error: type[Exception] = RuntimeError) -> None:
        """Poll `url` until `ok(response)`; fail with the log tail if the process dies, `abort()` says so, or
        time runs out."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if abort is not None and abort():
                raise abort_error(f"{self.name} gave up starting\n" + self.log_tail())
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} while starting\n"
                                   + self.log_tail())
            try:
                response = requests.get(url, timeout=5)
                if ok(response):
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready at {url} after {timeout:.0f} s ({last})\n" + self.log_tail())

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM our process group, SIGKILL after `grace` seconds; then kill what is left of the group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # our own group: start_new_session made pgid == pid
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Children the leader left behind in its group are still ours to clean up.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()
        if self in RUNNING:
            RUNNING.remove(self)


def child_env(extra: dict[str, str], drop_venv: bool = False) -> dict[str, str]:
    """Our environment plus `extra`; without our virtualenv's variables when the child has its own venv."""
    env = dict(os.environ)
    if drop_venv:
        for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "DJANGO_SETTINGS_MODULE"):
            env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --------------------------------------------------------------------------------------------------------
# Label Studio server
# --------------------------------------------------------------------------------------------------------

class PortTaken(RuntimeError):
    pass


LABEL_STUDIO_START_TIMEOUT = float(os.environ.get("YOLO_BACKEND_TEST_LS_TIMEOUT", "300"))


class LabelStudio:
    """One Label Studio instance on 127.0.0.1 with its own data folder and first user.

    legacy_tokens=True : the organisation accepts legacy tokens; `api` authenticates with `Token <legacy>`.
    legacy_tokens=False: Label Studio 1.23's default (JWT only); `api` authenticates with a personal access
                         token created through the API (session login, then POST /api/token/).
    """

    username = "e2e@example.com"
    password = "e2e-password-123"

    def __init__(self, workdir: Path, legacy_tokens: bool, port: int | None = None):
        self.workdir = Path(workdir)
        self.legacy_tokens = legacy_tokens
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Known legacy token of the first user (also present when legacy tokens are refused, to prove that).
        self.legacy_token = "e2e" + secrets.token_hex(16)
        self.files_root = self.workdir / "local-files"
        self.process: ManagedProcess | None = None
        self.personal_access_token: str | None = None
        self.api: LabelStudioAPI | None = None

    @property
    def api_key(self) -> str:
        """What a backend's LABEL_STUDIO_API_KEY should be in this mode."""
        return self.legacy_token if self.legacy_tokens else self.personal_access_token

    def start(self, timeout: float = LABEL_STUDIO_START_TIMEOUT, attempts: int = 3) -> "LabelStudio":
        exe = ensure_label_studio(verbose=False)
        for attempt in range(1, attempts + 1):
            try:
                self._start_process(exe, timeout)
                break
            except PortTaken:
                # Someone took our free port before Label Studio bound it (it would silently move to port+1).
                self.process.stop()
                if attempt == attempts:
                    raise
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
        if self.legacy_tokens:
            self.api = LabelStudioAPI(self.url, legacy_token=self.legacy_token)
        else:
            self.personal_access_token = create_personal_access_token(self.url, self.username, self.password)
            self.api = LabelStudioAPI(self.url, personal_access_token=self.personal_access_token)
        self.api.get("/api/current-user/whoami")  # proves the credentials work
        return self

    def _start_process(self, exe: Path, timeout: float) -> None:
        home = self.workdir / "home"
        data = self.workdir / "data"
        for folder in (home, data, self.files_root):
            folder.mkdir(parents=True, exist_ok=True)
        env = child_env({
            "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": home, "XDG_CONFIG_HOME": home / ".config", "XDG_DATA_HOME": home / ".local/share",
            "XDG_CACHE_HOME": home / ".cache",
            "LABEL_STUDIO_BASE_DATA_DIR": data,
            # No phoning home from tests (and no waiting on a closed network).
            "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
            "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
            # Our ML backend and image server live on 127.0.0.1: allow Label Studio to call them.
            "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": self.files_root,
            "LABEL_STUDIO_USERNAME": self.username, "LABEL_STUDIO_PASSWORD": self.password,
            "LABEL_STUDIO_USER_TOKEN": self.legacy_token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true" if self.legacy_tokens else "false",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "PYTHONUNBUFFERED": "1",
        }, drop_venv=True)
        argv = [str(exe), "start", "--no-browser", "--data-dir", str(data),
                "--internal-host", "127.0.0.1", "--port", str(self.port), "--host", self.url]
        self.process = ManagedProcess("label-studio", argv, env, self.workdir / "label-studio.log",
                                      cwd=str(self.workdir))

        def port_taken() -> bool:
            return f"Port {self.port} is in use" in tail(self.process.log_path, 200)

        self.process.wait_http(f"{self.url}/health", timeout, abort=port_taken, abort_error=PortTaken)

    def log_tail(self, lines: int = 80) -> str:
        return self.process.log_tail(lines) if self.process else "<label studio not started>"

    def stop(self) -> None:
        if self.process:
            self.process.stop()


def create_personal_access_token(url: str, username: str, password: str) -> str:
    """Log in like the browser does (session + CSRF), then create a personal access token (JWT refresh token)."""
    session = requests.Session()
    login_url = f"{url}/user/login/"
    session.get(login_url, timeout=30).raise_for_status()
    csrf = session.cookies.get("csrftoken")
    if not csrf:
        raise RuntimeError(f"no csrftoken cookie from {login_url}")
    response = session.post(login_url, timeout=30, allow_redirects=False, headers={"Referer": login_url},
                            data={"email": username, "password": password, "csrfmiddlewaretoken": csrf})
    if response.status_code not in (301, 302) or "sessionid" not in session.cookies:
        raise RuntimeError(f"login as {username} failed: HTTP {response.status_code} {response.text[:300]}")
    headers = {"X-CSRFToken": session.cookies.get("csrftoken", csrf), "Referer": url + "/"}
    existing = session.get(f"{url}/api/token/", timeout=30, headers=headers)
    existing.raise_for_status()
    for token in existing.json():  # only one valid PAT per user: revoke an old one first
        session.post(f"{url}/api/token/blacklist/", json={"refresh": token["token"]}, timeout=30, headers=headers)
    created = session.post(f"{url}/api/token/", timeout=30, headers=headers)
    if created.status_code not in (200, 201):
        raise RuntimeError(f"POST /api/token/ failed: HTTP {created.status_code} {created.text[:300]}")
    return created.json()["token"]


class LabelStudioAPIError(RuntimeError):
    pass


class LabelStudioAPI:
    """A tiny Label Studio HTTP API client: legacy `Token` auth, or PAT -> access token (`Bearer`), refreshed on 401."""

    def __init__(self, url: str, legacy_token: str | None = None, personal_access_token: str | None = None,
                 timeout: float = 120.0):
        if not (legacy_token or personal_access_token):
            raise ValueError("give legacy_token or personal_access_token")
        self.url = url.rstrip("/")
        self.legacy_token = legacy_token
        self.personal_access_token = personal_access_token
        self.timeout = timeout
        self.session = requests.Session()
        self._access: str | None = None

    def refresh_access_token(self) -> str:
        response = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": self.personal_access_token},
                                 timeout=30)
        if response.status_code != 200:
            raise LabelStudioAPIError(f"token refresh failed: HTTP {response.status_code} {response.text[:300]}")
        self._access = response.json()["access"]
        return self._access

    def _auth(self) -> dict[str, str]:
        if self.legacy_token:
            return {"Authorization": f"Token {self.legacy_token}"}
        return {"Authorization": f"Bearer {self._access or self.refresh_access_token()}"}

    def request(self, method: str, path: str, expect: tuple[int, ...] = (200, 201, 204), **kwargs):
        url = path if path.startswith("http") else f"{self.url}{path}"
        kwargs.setdefault("timeout", self.timeout)
        response = self.session.request(method, url, headers=self._auth(), **kwargs)
        if response.status_code == 401 and self.personal_access_token:
            self.refresh_access_token()
            response = self.session.request(method, url, headers=self._auth(), **kwargs)
        if expect and response.status_code not in expect:
            raise LabelStudioAPIError(f"{method} {path} -> HTTP {response.status_code}: {response.text[:1000]}")
        return response

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, json=None, **kwargs):
        response = self.request("POST", path, json=json, **kwargs)
        return response.json() if response.content else None

    def patch(self, path: str, json=None, **kwargs):
        return self.request("PATCH", path, json=json, **kwargs).json()

    # -- projects and tasks ----------------------------------------------------------------------------
    def create_project(self, title: str, label_config: str, **fields) -> dict:
        return self.post("/api/projects", json={"title": title, "label_config": label_config, **fields})

    def project(self, project_id: int) -> dict:
        return self.get(f"/api/projects/{project_id}")

    def update_project(self, project_id: int, **fields) -> dict:
        """e.g. update_project(pid, model_version="v2") or start_training_on_annotation_update=True."""
        return self.patch(f"/api/projects/{project_id}", json=fields)

    def create_annotation(self, task_id: int, result: list[dict], **fields) -> dict:
        """Submit an annotation as an annotator would (an empty `result` is a negative image)."""
        return self.post(f"/api/tasks/{task_id}/annotations", json={"result": result, **fields})

    def import_files(self, project_id: int, paths: list[Path]) -> dict:
        """Upload image files; each becomes a task with data {"image": "/data/upload/<project>/<uuid>-<name>"}."""
        handles = [open(p, "rb") for p in paths]
        try:
            files = [(f"file{i}", (Path(p).name, h, "image/jpeg" if str(p).lower().endswith((".jpg", ".jpeg"))
                                    else "image/png")) for i, (p, h) in enumerate(zip(paths, handles))]
            return self.request("POST", f"/api/projects/{project_id}/import", files=files).json()
        finally:
            for h in handles:
                h.close()

    def import_tasks(self, project_id: int, tasks: list[dict]) -> dict:
        return self.post(f"/api/projects/{project_id}/import", json=tasks)

    def tasks(self, project_id: int, query: dict | None = None, fields: str = "all") -> list[dict]:
        """All tasks of a project, through the Data Manager list (optionally filtered/ordered by `query`)."""
        params = {"project": project_id, "page_size": 1000, "fields": fields}
        if query is not None:
            params["query"] = json.dumps(query)
        body = self.get("/api/tasks", params=params)
        return body["tasks"] if isinstance(body, dict) else body

    def task(self, task_id: int) -> dict:
        return self.get(f"/api/tasks/{task_id}")

    def predictions(self, task_id: int) -> list[dict]:
        return self.get("/api/predictions", params={"task": task_id})

    # -- ML backends -----------------------------------------------------------------------------------
    def connect_ml_backend(self, project_id: int, url: str, title: str, **fields) -> dict:
        return self.post("/api/ml", json={"url": url, "project": project_id, "title": title, **fields})

    def ml_backends(self, project_id: int) -> list[dict]:
        return self.get("/api/ml", params={"project": project_id})

    def retrieve_predictions(self, project_id: int, task_ids: list[int]) -> dict:
        """The Data Manager action behind "Retrieve Predictions" for the selected tasks."""
        return self.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project_id},
                         json={"selectedItems": {"all": False, "included": list(task_ids)}})


# --------------------------------------------------------------------------------------------------------
# A static file server on loopback (images imported by URL)
# --------------------------------------------------------------------------------------------------------

class StaticFileServer:
    """Serve a folder over HTTP on 127.0.0.1 from a thread; `url_for(name)` gives a file's URL."""

    def __init__(self, root: Path):
        self.root = Path(root)
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="static-files", daemon=True)

    def __enter__(self) -> "StaticFileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def url_for(self, name: str) -> str:
        return f"{self.url}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep pytest output readable
        pass


# --------------------------------------------------------------------------------------------------------
# A stub ML backend (Flask, in a thread) to validate the harness independently of our server
# --------------------------------------------------------------------------------------------------------

class StubBackend:
    """Answers /health, /setup, /predict, /webhook per the Label Studio contract with fixed boxes.

    Every task gets one `fire` box at (10, 20, 30, 40) % with score 0.5 + task_id / 1000, so ordering is testable.
    """

    model_version = "stub-v1"

    def __init__(self, from_name: str = "label", to_name: str = "image", label: str = "fire"):
        from flask import Flask, jsonify, request
        from werkzeug.serving import make_server

        self.requests: list[tuple[str, dict]] = []
        app = Flask("stub-backend")

        @app.get("/health")
        @app.get("/")
        def health():
            return jsonify(status="UP", model_class="Stub")

        @app.post("/setup")
        def setup():
            self.requests.append(("setup", request.get_json(silent=True) or {}))
            return jsonify(model_version=self.model_version)

        @app.post("/webhook")
        def webhook():
            self.requests.append(("webhook", request.get_json(silent=True) or {}))
            return jsonify({})

        @app.post("/predict")
        def predict():
            body = request.get_json(force=True)
            self.requests.append(("predict", body))
            results = []
            for task in body["tasks"]:
                score = 0.5 + task["id"] / 1000.0
                results.append({"result": [{
                    "id": f"stub{task['id']}", "from_name": from_name, "to_name": to_name,
                    "type": "rectanglelabels", "original_width": 100, "original_height": 50, "image_rotation": 0,
                    "value": {"x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0,
                              "rectanglelabels": [label]}, "score": score}],
                    "score": score, "model_version": self.model_version})
            return jsonify(results=results)

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="stub-backend", daemon=True)

    def __enter__(self) -> "StubBackend":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()


# --------------------------------------------------------------------------------------------------------
# Our ML backend server as a process
# --------------------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]


def start_backend(workdir: Path, env: dict[str, str], port: int | None = None, timeout: float = 180.0,
                  argv: list[str] | None = None, name: str = "ml-backend") -> tuple[ManagedProcess, str]:
    """Start our server (`python _wsgi.py --host 127.0.0.1 --port P` by default) and wait for /health."""
    port = port or free_port()
    argv = argv or [sys.executable, str(REPO_ROOT / "_wsgi.py"), "--host", "127.0.0.1", "--port", str(port)]
    argv = [a.replace("{port}", str(port)) for a in argv]
    process = ManagedProcess(name, argv, child_env(env), Path(workdir) / f"{name}.log", cwd=str(REPO_ROOT))
    url = f"http://127.0.0.1:{port}"
    process.wait_http(f"{url}/health", timeout)
    return process, url


def start_worker(workdir: Path, env: dict[str, str], name: str = "rq-worker") -> ManagedProcess:
    """A real RQ worker (`python -m yolo_backend worker`) with the backend's settings ``env``."""
    return ManagedProcess(name, [sys.executable, "-m", "yolo_backend", "worker"], child_env(env),
                          Path(workdir) / f"{name}.log", cwd=str(REPO_ROOT))


def connect_and_predict(api, project_id: int, url: str, title: str, task_ids: list[int]) -> str:
    """Connect the backend at ``url`` with training on annotation updates, Retrieve Predictions for ``task_ids``,
    and wait until the project's model_version is the backend's first version; returns that version."""
    api.connect_ml_backend(project_id, url, title)
    api.update_project(project_id, start_training_on_annotation_update=True)
    api.retrieve_predictions(project_id, task_ids)
    first = requests.get(f"{url}/versions", params={"project": project_id}, timeout=10).json()["model_version"]
    wait_until(lambda: api.project(project_id)["model_version"] == first, 60,
               message=f"project model_version == the backend's first version ({first})")
    return first


def wait_for_version(worker: ManagedProcess, registry, wanted, timeout: float, message: str):
    """The first version in ``registry`` (a ``yolo_backend.registry.Registry``) whose meta ``wanted(meta)`` accepts,
    polled every 2 s while the ``worker`` lives (its log tail when it died)."""
    def found():
        assert worker.alive(), f"{worker.name} died\n{worker.log_tail(80)}"
        return next((v for v in registry.versions() if wanted(v.meta())), None)

    return wait_until(found, timeout, interval=2, message=message)


def wait_for_idle_queue(url: str, project_id: int, timeout: float = 600) -> None:
    """Until the backend at ``url`` has no training job running or waiting for the project (a coalesced follow-up
    job finishes, so nothing is left training when the worker stops)."""
    def idle() -> bool:
        status = requests.get(f"{url}/is_training", params={"project": project_id}, timeout=10).json()
        return not (status.get("is_training") or status.get("waiting_job"))

    wait_until(idle, timeout, interval=2, message="the queue to drain")


def wait_until(predicate, timeout: float, interval: float = 0.5, message: str = "condition"):
    """Poll `predicate()` until it returns something truthy; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} not met after {timeout:.0f} s")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------------
# Fire/smoke projects and images
# --------------------------------------------------------------------------------------------------------

FIRE_SMOKE_LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="fire" background="red"/>
    <Label value="smoke" background="gray"/>
  </RectangleLabels>
</View>"""


def uploaded_file_name(image_ref: str) -> str:
    """'/data/upload/3/1a2b3c4d-fire.jpg' -> 'fire.jpg' (Label Studio prefixes uploads with 8 hex chars + '-')."""
    base = image_ref.rsplit("/", 1)[-1]
    prefix, _, rest = base.partition("-")
    return rest if rest and len(prefix) == 8 else base


UPLOAD_BATCH = 50  # Django's DATA_UPLOAD_MAX_NUMBER_FILES is 100


def import_images(api: LabelStudioAPI, project_id: int, upload: list[Path], server: StaticFileServer | None = None,
                  url_names: list[str] = ()) -> dict[int, Path]:
    """Upload `upload` files and import `url_names` (files under `server.root`) by URL; {task_id: local file}."""
    upload = list(upload)
    for start in range(0, len(upload), UPLOAD_BATCH):  # Label Studio refuses more files in one request
        api.import_files(project_id, upload[start:start + UPLOAD_BATCH])
    if url_names:
        api.import_tasks(project_id, [{"image": server.url_for(name)} for name in url_names])
    by_name = {Path(p).name: Path(p) for p in upload}
    mapping: dict[int, Path] = {}
    for task in api.tasks(project_id):
        ref = task["data"]["image"]
        if server is not None and ref.startswith(server.url + "/"):
            mapping[task["id"]] = server.root / ref[len(server.url) + 1:]
        else:
            mapping[task["id"]] = by_name[uploaded_file_name(ref)]
    expected = len(upload) + len(url_names)
    if len(mapping) != expected:
        raise AssertionError(f"project {project_id} has {len(mapping)} tasks, expected {expected}")
    return mapping


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ensure-label-studio"]:
        print(ensure_label_studio())
        return 0
    print("usage: python tests/e2e/harness.py ensure-label-studio", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

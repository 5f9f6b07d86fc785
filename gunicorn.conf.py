"""gunicorn settings for the ML backend (`gunicorn -c gunicorn.conf.py _wsgi:app`).

Each worker process loads its own copy of the model on its first prediction, so few processes with several
threads fit best: the model is shared by the threads of a process and swapped atomically on a new version.
Every value can be changed through the environment variable named beside it.
"""

import os

from yolo_backend.settings import Settings as _Settings, process_default  # standard library only: no torch here

# HOST and PORT are settings (their defaults live in yolo_backend/settings.py); GUNICORN_BIND wins.
_host, _port = os.environ.get("HOST", _Settings.host), os.environ.get("PORT", _Settings.port)
bind = process_default("GUNICORN_BIND") or f"{_host}:{_port}"
workers = int(process_default("GUNICORN_WORKERS"))
threads = int(process_default("GUNICORN_THREADS"))
# gthread, except that a thread gets a request only once it has arrived whole: slow clients cannot hold the threads
# (yolo_backend/server/request_buffering.py). Each request must arrive within REQUEST_READ_TIMEOUT_S (30 s; 408
# after it), its head within 64 KiB (431), its body within MAX_REQUEST_MB (413). `-k gthread` gives plain gthread.
worker_class = "yolo_backend.server.request_buffering.BufferingThreadWorker"
# Open connections per worker process, slow ones included; more wait in the listen backlog.
worker_connections = int(process_default("GUNICORN_WORKER_CONNECTIONS"))
# Label Studio waits up to its ML timeout for /predict; a CPU batch of large images can take a while.
timeout = int(process_default("GUNICORN_TIMEOUT"))
graceful_timeout = int(process_default("GUNICORN_GRACEFUL_TIMEOUT"))
keepalive = 5
# GUNICORN_ACCESS_LOG="" turns the access log off.
accesslog = process_default("GUNICORN_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# gunicorn >= 25.1 opens a control socket at one fixed path per user ($HOME/.gunicorn/gunicorn.ctl), which
# several servers on one machine (or a read-only home in a container) would fight over: off unless a path is given.
_control_socket = process_default("GUNICORN_CONTROL_SOCKET")
if _control_socket:
    control_socket = _control_socket
else:
    control_socket_disable = True
# No preload: the app must be created in each worker, after the fork (no model and no CUDA in the master);
# --preload with a CUDA device is refused in on_starting (yolo_backend.serve.preload_refusal).
preload_app = False

# Say so when the port is open to the network without Basic Auth, and refuse a broken model before the port is
# bound: every checkpoint that would serve is load-checked once in a child process (the master itself stays free of
# torch; yolo_backend.serve.check_model). `serve` has checked already and says so (MODEL_CHECKED_ENV).
# A MODEL_PATH that does not exist (yet) is waited for, not refused: under a supervisor (docker compose's
# `restart: unless-stopped`, systemd) an exit would restart the server in a loop, and the usual fix is to copy the
# file in (`docker compose cp best.pt server:/data/weights/best.pt`), which then takes effect without a restart.
MODEL_PATH_POLL_S = 2.0
MODEL_PATH_REMIND_S = 600.0


def on_starting(server):
    import sys

    from yolo_backend.server.request_buffering import ReadLimits
    from yolo_backend.settings import Settings, exposure_warning

    try:
        ReadLimits.from_env()  # a bad REQUEST_READ_TIMEOUT_S stops here, not in every worker
    except ValueError as exc:  # SettingsError is one
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    settings = Settings.from_env()
    from yolo_backend.serve import preload_refusal

    refusal = preload_refusal(server.cfg.preload_app, settings.device)  # --preload, GUNICORN_CMD_ARGS win over the file
    if refusal:
        sys.stderr.write(f"error: {refusal}\n")
        sys.exit(2)
    for address in server.cfg.bind:
        warning = exposure_warning(address.rsplit(":", 1)[0] if ":" in address else address, settings)
        if warning and not address.startswith("unix:"):
            server.log.warning(warning)
    from yolo_backend.serve import MODEL_CHECKED_ENV

    if os.environ.get(MODEL_CHECKED_ENV) == "1":
        return
    _wait_for_model_path(server, settings.model_path)
    _check_model(server)


def _check_model(server) -> None:
    """The start-up model check (yolo_backend.serve.check_model); a broken model: one line, exit 2."""
    import sys

    from yolo_backend.serve import ModelCheckFailed, check_model

    try:
        check_model(dict(os.environ), say=server.log.info)
    except ModelCheckFailed as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)


def _wait_for_model_path(server, path) -> None:
    """Until MODEL_PATH is a file whose size has stopped changing (a copy in progress is not loaded half-written).
    One ERROR saying what to do, repeated every MODEL_PATH_REMIND_S; SIGTERM or Ctrl-C meanwhile stops at once (the
    master has no signal handlers yet, and as a container's PID 1 it would ignore a default SIGTERM)."""
    import signal
    import sys
    import time

    if not path or os.path.isfile(path):
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        said, size = None, None
        while True:
            if os.path.isfile(path):
                if os.path.getsize(path) == size:
                    break
                size = os.path.getsize(path)
            elif said is None or time.monotonic() - said >= MODEL_PATH_REMIND_S:
                said = time.monotonic()
                server.log.error(_missing_model_path(path))
            time.sleep(MODEL_PATH_POLL_S)
    except KeyboardInterrupt:
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    server.log.info("MODEL_PATH=%s is there now (%d bytes)", path, size)


def _missing_model_path(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    make = "" if os.path.isdir(folder) else f"`docker compose exec server mkdir -p {folder}`, then "
    return (f"MODEL_PATH={path} does not exist; waiting for it (checked every {MODEL_PATH_POLL_S:g} s; the server "
            f"starts once it is there, no restart needed). Copy the checkpoint there (docker compose: {make}"
            f"`docker compose cp best.pt server:{path}`), or unset MODEL_PATH to start from an untrained model")

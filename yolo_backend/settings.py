"""Every setting of the backend, typed, in one place.

Each setting is read from the environment variable of the same name in upper case
(``model_score_threshold`` <- ``MODEL_SCORE_THRESHOLD``). ``Settings.from_env()`` reads them;
``Settings.table()`` renders the documentation table used in README.md.

Import cost matters: this module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from .image_header import DEFAULT_MAX_IMAGE_PIXELS  # standard library only, like this module
from .yolov7.inference_backends import DEFAULT_CACHE_DIR as DEFAULT_ONNX_CACHE_DIR  # standard library only


def setting(default: Any, doc: str) -> Any:
    """A dataclass field carrying its documentation."""
    return field(default=default, metadata={"doc": doc})


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message says which and why."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(name: str, raw: str, type_name: str) -> Any:
    env = name.upper()
    text = raw.strip()
    try:
        if type_name in ("bool",):
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected true/false")
        if type_name in ("int",):
            return int(text)
        if type_name in ("float",):
            return float(text)
        if type_name.startswith("Optional[int]"):
            return int(text) if text else None
        if type_name.startswith("Optional[float]"):
            return float(text) if text else None
        if type_name.startswith("Optional[str]"):
            return text or None
        return text
    except ValueError as exc:
        raise SettingsError(f"{env}={raw!r} is not a valid {type_name}: {exc}") from None


@dataclass(frozen=True)
class Settings:
    # --- model -------------------------------------------------------------------------------
    model_path: Optional[str] = setting(
        None, "A checkpoint to serve (official YOLOv7 `.pt` or one of ours) until a version is published in "
        "MODEL_DIR (published versions trained from it take over).")
    model_dir: str = setting(
        "./data/models", "Folder of published model versions (the registry) and training state.")
    model_version: Optional[str] = setting(
        None, "Pin one published version by name instead of following the newest.")
    device: str = setting(
        "auto", "`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.")
    half: bool = setting(False, "Run inference in fp16 on CUDA (ignored on CPU).")
    torch_threads: int = setting(
        0, "CPU threads for inference; 0 picks the number of physical cores available to the process.")
    img_size: Optional[int] = setting(
        None, "Inference size: the long side of the letterboxed image (multiple of 32). Unset: the size the "
        "checkpoint was trained at when it records one (ours do, e.g. 320 from TRAIN_IMG_SIZE); for one that records "
        "none (official YOLOv7 `best.pt`), the size the project's first training measured as the better one on the "
        "annotated images (`MODEL_DIR/serving-sizes.json`), and until then 640 as a guess (the log, `info` and the "
        "dashboard say so). When set it wins for every checkpoint: set it to the size your `best.pt` was trained at.")
    inference_backend: str = setting(
        "auto", "`auto` (ONNX Runtime on the CPU when it imports, torch on CUDA), `torch` or `onnxruntime`.")
    onnx_cache_dir: str = setting(
        DEFAULT_ONNX_CACHE_DIR, "Where ONNX exports of checkpoints are kept (keyed by file hash) for ONNX Runtime; "
        "in the user's cache folder, shared by every command.")
    # --- predictions -------------------------------------------------------------------------
    model_score_threshold: float = setting(
        0.25, "Boxes at or above this confidence are shown to the annotator (a control's `model_score_threshold` "
        "wins).")
    iou_threshold: float = setting(0.45, "IoU threshold of the class-aware non-maximum suppression.")
    max_detections: int = setting(300, "Most boxes kept per image.")
    score_floor: float = setting(
        0.05, "Detections above this confidence (shown or not) feed the task's uncertainty score.")
    task_score: str = setting(
        "uncertainty",
        "Task score strategy (low = most informative, label first): `uncertainty` (the most uncertain box), "
        "`uncertainty_per_second` (the same per second of expected annotation work), "
        "`entropy_sum`, `entropy_mean`, `margin_sum`, `margin_mean` (over all boxes), `objectness`, "
        "`max_confidence`, `mean_confidence`, `count`. docs/active-learning.md compares them.")
    predict_batch_size: int = setting(8, "Images per forward pass when predicting a request's tasks.")
    predict_deadline_s: float = setting(
        60.0, "A /predict answers within about this many seconds: Label Studio sends every selected task in one "
        "request and stores nothing when the answer takes more than its 100 s; tasks not reached by then get no "
        "prediction in that answer (Label Studio asks for them again).")
    video_frame_step: int = setting(
        5, "Video tasks: the detector sees every Nth decoded frame; boxes between are interpolated by Label Studio's "
        "editor (consecutive frames of a clip differ little). Every frame is still decoded (codecs must).")
    video_max_mb: int = setting(
        2048, "Video files larger than this (MiB) get no prediction; downloads stop there (0: no bound).")
    video_timeout: float = setting(
        120.0, "Seconds one video download may take in all (a deadline for the whole download, not per read).")
    video_max_seconds: float = setting(
        1800.0, "Videos longer than this (seconds, from the header and while decoding) get no prediction (0: no "
        "bound).")
    video_max_frames: int = setting(
        54000, "Videos with more decoded frames than this get no prediction (0: no bound).")
    video_max_pixels: int = setting(
        2560 * 1440, "Videos whose frames have more pixels than this get no prediction (0: no bound); the default "
        "takes 1440p and refuses 4K (scale it down first).")
    # training from video annotations (jobs/video_dataset.py)
    video_train_frames_per_clip: int = setting(
        30, "Training from video: the most frames taken from one annotated clip, spread evenly over its frames with "
        "boxes and its frames without (a clip is many near-duplicate images: more frames of one clip teach little).")
    video_train_max_frames: int = setting(
        3000, "Training from video: the most frames from all the project's clips together; with many clips each "
        "gives fewer (each frame is kept in memory at TRAIN_IMG_SIZE during training).")
    video_train_min_gap_s: float = setting(
        0.5, "Training from video: frames taken from one clip are at least this many seconds apart; negative frames "
        "(no box shown) at least this far from any box, as track ends are rough.")
    video_train_negative_share: float = setting(
        0.25, "Training from video: at most this share of a clip's frames are negatives (frames where the "
        "annotator's tracks show no box); a clip with no box at all gives only negatives.")
    from_name: Optional[str] = setting(
        None, "Name of the one RectangleLabels control to predict for (unset: every one without `model_skip`, "
        "when they are on one image).")
    label_map: Optional[str] = setting(
        None, "Map checkpoint classes to config labels: `fire=Fire,smoke=Smoke` or a JSON object (a label's "
        "`predicted_values` wins).")
    # --- Label Studio ------------------------------------------------------------------------
    label_studio_url: Optional[str] = setting(
        None, "Label Studio base URL, used to fetch images and annotations (e.g. http://localhost:8080).")
    label_studio_api_key: Optional[str] = setting(
        None, "Label Studio API key: a legacy token or a personal access token (JWT refresh token).")
    backend_url: Optional[str] = setting(
        None, "The URL Label Studio was given for this backend (Settings -> Model). The backend acts with its key "
        "only on projects that have it connected: with this set, a project whose ML backends include this URL; "
        "unset, one whose ML backend URL answers /health with this deployment's id (MODEL_DIR/instance-id). Set it "
        "when the backend cannot reach itself at that URL.")
    image_cache_dir: str = setting("./data/image-cache", "Where downloaded task images are kept.")
    image_cache_mb: int = setting(2048, "Size bound of the image cache in MiB; oldest files go first.")
    image_timeout: float = setting(
        10.0, "Seconds one image download may take in all (a deadline for the whole download, not per read).")
    max_image_pixels: int = setting(
        DEFAULT_MAX_IMAGE_PIXELS, "Images with more pixels are refused before decoding (a small file can hold a huge "
        "image); "
        "120 MP keeps every phone and drone photo. Applies to predictions, training and conversion. 0: no cap.")
    # --- HTTP --------------------------------------------------------------------------------
    host: str = setting(
        "0.0.0.0", "Address the server listens on (`serve`, `python _wsgi.py`, gunicorn.conf.py; a `--host` argument "
        "wins). Beyond loopback, set BASIC_AUTH_USER and BASIC_AUTH_PASS.")
    port: int = setting(9090, "Port the server listens on (a `--port` argument wins).")
    basic_auth_user: Optional[str] = setting(None, "Require HTTP Basic Auth with this user (with BASIC_AUTH_PASS).")
    basic_auth_pass: Optional[str] = setting(None, "Password for BASIC_AUTH_USER.")
    max_request_mb: float = setting(
        100.0, "Largest request body in MiB (413 above it). Label Studio sends every selected task in one /predict "
        "(~2-5 KB each): 100 MiB holds about 20 000 tasks.")
    request_read_timeout_s: float = setting(
        30.0, "Seconds a client may take to send one whole request (head and body), from its connection (or a "
        "kept-alive connection's next byte); then 408 and closed. The server's event loop reads requests whole before "
        "a thread takes them, so slow clients hold no thread (see \"Slow clients\").")
    max_concurrent_predicts: int = setting(
        6, "Most /predict requests worked on at once per server process; more answer 503 at once, so threads stay "
        "free for /health and /setup (Label Studio gives them 1 and 3 s). Keep it below GUNICORN_THREADS.")
    log_level: str = setting("INFO", "Logging level: DEBUG, INFO, WARNING, ERROR.")
    # --- queue -------------------------------------------------------------------------------
    redis_url: Optional[str] = setting(None, "Redis URL for training jobs (overrides REDIS_HOST/REDIS_PORT).")
    redis_host: str = setting("localhost", "Redis host (classic setting).")
    redis_port: int = setting(6379, "Redis port (classic setting).")
    rq_queue_name: str = setting("default", "RQ queue that training jobs go to.")
    # --- training (active-learning loop) -------------------------------------------------------
    training_actions: str = setting(
        "START_TRAINING", "Webhook actions that start training, comma-separated (e.g. add ANNOTATION_CREATED,"
        "ANNOTATION_UPDATED for a Label Studio without START_TRAINING; 1.23 sends START_TRAINING first on submit, so "
        "listing both would only coalesce). Empty: training off.")
    max_queued_projects: int = setting(
        20, "Most projects with a training job waiting at once; a trigger beyond that is refused (429) and logged, "
        "so made-up project ids cannot fill the queue. Also the most projects whose requests are kept in "
        "MODEL_DIR/pending while Redis is away (503 beyond).")
    train_epochs: int = setting(30, "Most epochs per training job (the time budget usually ends it first).")
    train_time_budget_s: float = setting(
        300.0, "Seconds one training job may train (evaluation and saving included); bounds a job on CPU.")
    train_img_size: int = setting(320, "Training image size (multiple of 32); 320 keeps CPU training quick.")
    train_batch_size: int = setting(8, "Training batch size.")
    train_nominal_batch: int = setting(
        0, "Images per optimizer step (gradients accumulated over batches up to this many); 0 steps after every "
        "batch. A job on a few hundred images and a CPU budget fits a few hundred batches: accumulating to the "
        "reference's 64 would leave a few dozen steps, too few to learn from the new labels.")
    train_lr: float = setting(
        0.005, "Learning rate of a training job (peak, after warm-up; cosine down to 1 % of it). Half the "
        "reference's 0.01, which is meant for steps of 64 images: with a step after every batch of 8 it made the "
        "validation mAP swing from epoch to epoch.")
    train_warmup_epochs: float = setting(
        1.0, "Epochs of learning-rate warm-up per job. Jobs start from a trained model, so one epoch is enough; "
        "the reference's 3 were most of a CPU job.")
    min_annotations_first_training: int = setting(
        10, "Annotated images (an annotated clip counts as one) a project needs before its first training: a "
        "request before that ends at once, recorded as \"waiting\" (the dashboard says how many more). One image "
        "trained for the whole time budget and published unchecked; with 10, about 8 train and 2 validate (still too "
        "few to compare with the start model: the version is marked \"not compared\"; about 30 give the 4+ "
        "validation images a comparison needs). "
        "0: train from the first annotation.")
    keep_versions: int = setting(5, "Published versions kept per project; older ones are deleted (0 keeps all).")
    force_publish: bool = setting(
        False, "Publish every trained model, even when it is worse on the validation split than the current one.")
    publish_tolerance_se: float = setting(
        1.0, "A trained model is published unless its validation fitness is below the current model's by more than "
        "this many standard errors of the difference (a paired bootstrap over the job's validation images): on a "
        "few dozen images, differences of that size are noise, and refusing them loses the job's new labels. 0: "
        "publish only when not worse.")
    # --- pool scoring (every task scored by the serving version, stored in Label Studio) ---------------------
    pool_scoring: bool = setting(
        True, "After every published version the worker scores every task of the project with it and stores one "
        "prediction per task (regions, task score, cluster), in chunk jobs on the training queue; also on demand "
        "(`score-pool`, POST /score_pool). Off: only one prediction, enough to switch the project's model_version.")
    pool_clusters: int = setting(
        0, "Image clusters per version for Label Studio's uncertainty sampling (k-means on the detector's neck "
        "embedding); 0: about sqrt(tasks / 2), 2 to 100; 1: one cluster (plain lowest-score-first order).")
    pool_chunk_size: int = setting(
        200, "Tasks per pool-scoring chunk job: several workers share a large pool chunk by chunk.")
    pool_video_chunk_size: int = setting(
        10, "Clips per pool-scoring chunk job in a video project (a 60 s clip at VIDEO_FRAME_STEP 5 is 300 detector "
        "passes: a chunk must end within its 30-minute job timeout); also the most clips the version's clusters "
        "are fitted on, times 3.")
    keep_old_predictions: bool = setting(
        False, "Keep the predictions of this backend's older versions. Off, they are deleted once a task's new one is "
        "stored, so a task keeps one prediction of ours (Label Studio counts an annotator's solved clusters over "
        "all of a task's predictions, so old clusters would mix in). Predictions the backend did not make (another "
        "model's, imported ones) are never deleted.")
    uncertainty_sampling: bool = setting(
        False, "Set the project's sampling to Label Studio's \"Uncertainty sampling\" when it connects and on every "
        "new version (the next task: least-labelled cluster first, then lowest score). Off: the project's own "
        "sampling is left alone.")

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides: Any) -> "Settings":
        """Settings from the environment (or ``env``), then ``overrides`` by field name."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.name.upper()
            if key in env:
                values[f.name] = _convert(f.name, env[key], str(f.type))
        for name, value in overrides.items():
            if name not in {f.name for f in dataclasses.fields(cls)}:
                raise SettingsError(f"unknown setting {name!r}")
            if isinstance(value, str):
                f = next(f for f in dataclasses.fields(cls) if f.name == name)
                value = _convert(name, value, str(f.type))
            values[name] = value
        for f in dataclasses.fields(cls):  # "~/models" means the user's home in every setting that is a path
            value = values.get(f.name, f.default)
            if f.name in PATH_SETTINGS and isinstance(value, str):
                values[f.name] = os.path.expanduser(value)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("img_size", "train_img_size"):
            value = getattr(self, name)
            if value is None and name == "img_size":  # unset: the checkpoint's training size, else 640
                continue
            if value <= 0 or value % 32:
                raise SettingsError(f"{name.upper()}={value} must be a positive multiple of 32 (e.g. 320, 640)")
        for name in ("predict_batch_size", "train_batch_size", "max_detections", "image_timeout",
                     "train_time_budget_s", "train_epochs", "train_lr", "max_request_mb", "max_concurrent_predicts",
                     "max_queued_projects", "predict_deadline_s", "video_frame_step", "video_timeout",
                     "pool_chunk_size", "pool_video_chunk_size", "request_read_timeout_s", "port"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name.upper()}={getattr(self, name)} must be greater than 0")
        for name in ("image_cache_mb", "keep_versions", "torch_threads", "max_image_pixels", "train_nominal_batch",
                     "min_annotations_first_training",
                     "train_warmup_epochs", "pool_clusters", "publish_tolerance_se", "video_max_mb",
                     "video_max_seconds", "video_max_frames", "video_max_pixels"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name.upper()}={getattr(self, name)} must not be negative")
        for name in ("model_score_threshold", "iou_threshold", "score_floor"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SettingsError(f"{name.upper()}={value} must be between 0 and 1")
        if self.task_score not in TASK_SCORE_STRATEGIES:
            raise SettingsError(
                f"TASK_SCORE={self.task_score!r} is unknown; use one of {', '.join(TASK_SCORE_STRATEGIES)}")
        if self.inference_backend not in INFERENCE_BACKENDS:
            raise SettingsError(f"INFERENCE_BACKEND={self.inference_backend!r} is unknown; use one of "
                                f"{', '.join(INFERENCE_BACKENDS)}")
        if self.backend_url and not self.backend_url.strip().lower().startswith(("http://", "https://")):
            raise SettingsError(f"BACKEND_URL={self.backend_url!r} must be the http(s) URL Label Studio was given "
                                "for this backend, e.g. http://127.0.0.1:9090")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        self._validate_video_training()

    def _validate_video_training(self) -> None:
        for name in ("video_train_frames_per_clip", "video_train_max_frames"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name.upper()}={getattr(self, name)} must be greater than 0")
        if not self.video_train_min_gap_s >= 0:
            raise SettingsError(f"VIDEO_TRAIN_MIN_GAP_S={self.video_train_min_gap_s} must not be negative")
        if not 0.0 <= self.video_train_negative_share <= 1.0:
            raise SettingsError(f"VIDEO_TRAIN_NEGATIVE_SHARE={self.video_train_negative_share} must be between 0 and 1")

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or f"redis://{self.redis_host}:{self.redis_port}/0"

    @classmethod
    def table(cls) -> str:
        """The README's settings tables: what a user sets to connect and train, then tuning, then the server
        process's own variables (read by gunicorn.conf.py and Label Studio's Local Storage)."""
        def rows(fields: Iterable[dataclasses.Field[Any]]) -> list[str]:
            out = ["| variable | default | meaning |", "|---|---|---|"]
            for f in fields:
                default = "" if f.default is None else f"`{f.default}`"
                out.append(f"| `{f.name.upper()}` | {default} | {f.metadata['doc']} |")
            return out

        fields = dataclasses.fields(cls)
        mine = [f for f in fields if f.name in YOU_SET]
        process = ["| variable | default | meaning |", "|---|---|---|"] + [
            f"| `{name}` | {f'`{default}`' if default else ''} | {doc} |" for name, default, doc in PROCESS_VARIABLES]
        return "\n".join(["**You set these** (to connect to Label Studio, serve your checkpoint and train):", "",
                          *rows(sorted(mine, key=lambda f: YOU_SET.index(f.name))), "",
                          "**Tuning** (the defaults are measured choices; see each line):", "",
                          *rows([f for f in fields if f.name not in YOU_SET]), "",
                          "**The server process** (read by `gunicorn.conf.py` and for Local Storage, not by the "
                          "settings class):", "", *process])


# Query parameters that carry a secret in a Redis URL (redis-py reads ``?password=``).
_SECRET_PARAMETERS = ("password", "pass", "pwd", "auth", "token")


def mask_password(url: str) -> str:
    """A URL with every password replaced by ``***``: in the user info (``redis://:secret@host:6379/0``) and in
    the query (``redis://host:6379/0?password=secret``); for logs, answers and error messages. Text that is not a
    URL is masked after a ``:`` and before an ``@`` as a URL's user info would be."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:  # not parseable as a URL: mask what looks like user info and secret parameters
        masked = re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)
        return re.sub(r"(?i)([?&](?:%s)=)[^&#]*" % "|".join(_SECRET_PARAMETERS), r"\1***", masked)
    if parts.password:
        user = parts.username or ""
        netloc = f"{user}:***@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMETERS for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMETERS else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def is_loopback_host(host: str) -> bool:
    """True for a host name or address that only this machine can reach (localhost, 127.0.0.0/8, ::1)."""
    import ipaddress

    host = (host or "").strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, settings: "Settings") -> Optional[str]:
    """A warning to log when the server listens beyond this machine without Basic Auth, else None."""
    if is_loopback_host(host) or settings.basic_auth_user:
        return None
    return (f"listening on {host} without authentication: anyone who can reach this port can get predictions, "
            "start training and read versions. Set BASIC_AUTH_USER and BASIC_AUTH_PASS (and the same user and "
            "password in Label Studio's model connection), or bind to 127.0.0.1 behind a proxy")


PATH_SETTINGS = ("model_path", "model_dir", "image_cache_dir", "onnx_cache_dir")
# The settings a user sets to connect and train, in the order README lists them; the rest are tuning.
YOU_SET = ("label_studio_url", "label_studio_api_key", "model_path", "img_size", "backend_url", "basic_auth_user",
           "basic_auth_pass", "host", "port", "model_dir", "redis_url", "device")
# Variables of the server process itself: (name, default, meaning). gunicorn.conf.py reads its defaults from here.
PROCESS_VARIABLES = (
    ("GUNICORN_WORKERS", "1", "Server processes; each loads its own model (few processes with several threads fit "
                              "best)."),
    ("GUNICORN_THREADS", "8", "Threads per server process (keep above MAX_CONCURRENT_PREDICTS)."),
    ("GUNICORN_WORKER_CONNECTIONS", "1000", "Open connections per server process, slow ones included; more wait "
                                            "in the listen backlog."),
    ("GUNICORN_TIMEOUT", "300", "Seconds a worker process may be silent before gunicorn restarts it."),
    ("GUNICORN_GRACEFUL_TIMEOUT", "30", "Seconds a stopping server gives running requests."),
    ("GUNICORN_ACCESS_LOG", "-", "Access log target (`-`: stderr; empty: off)."),
    ("GUNICORN_BIND", "", "Full bind address (wins over HOST and PORT), e.g. `unix:/run/ml.sock`."),
    ("GUNICORN_CONTROL_SOCKET", "", "gunicorn's control socket path (off unless set)."),
    ("LOCAL_FILES_DOCUMENT_ROOT", "", "Label Studio's Local Storage root (also "
                                      "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT): "
                                      "`/data/local-files/?d=` images are read from disk here when they exist."),
)


def process_default(name: str) -> str:
    """A server-process variable's value: the environment's, else its default in PROCESS_VARIABLES."""
    default = next(default for variable, default, _ in PROCESS_VARIABLES if variable == name)
    return os.environ.get(name, default)
TASK_SCORE_STRATEGIES = ("uncertainty", "uncertainty_per_second", "max_confidence", "mean_confidence", "count",
                         "margin_sum", "margin_mean", "entropy_sum", "entropy_mean", "objectness")
INFERENCE_BACKENDS = ("auto", "torch", "onnxruntime")

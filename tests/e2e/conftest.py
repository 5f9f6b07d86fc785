"""Fixtures for the end-to-end tests: a real Label Studio per token mode, test images, an image server, our backend.

Session scope: one Label Studio per mode ("legacy" then "jwt"), each started once and stopped at the end
(pytest finishes one mode's instance before it starts the next, so only one runs at a time).

Data: ``shared_data`` is ../shared/data, or without it the generated stand-in of the same layout (tests/conftest.py
``shared_dir``, tests/synthetic.py): drawn fire and smoke, and a yolov7-tiny that finds them under the real
detector's file name.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import harness

MODES = ("legacy", "jwt")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the log tails of every process the harness started (Label Studio, our backend)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and harness.RUNNING:
        for process in list(harness.RUNNING):
            report.sections.append((f"{process.name} log", process.log_tail(80)))


@pytest.fixture(scope="session")
def shared_data(shared_dir) -> Path:
    """../shared/data or its generated stand-in: fire-smoke/, hot-fire/, yolov7-checkpoints/."""
    return shared_dir / "data"


@pytest.fixture(scope="session")
def valid_images(shared_data) -> Path:
    """The 47 fire/smoke validation images (labels in ../../labels/valid)."""
    return shared_data / "fire-smoke" / "images" / "valid"


@pytest.fixture(scope="session")
def detector_checkpoint(shared_data) -> Path:
    """The trained fire/smoke yolov7-tiny in the reference file format (an official checkpoint to our backend)."""
    return shared_data / "yolov7-checkpoints" / "yolov7-tiny_fire-smoke_ref-trained.pt"


@pytest.fixture(scope="session", params=MODES)
def label_studio(request, tmp_path_factory) -> harness.LabelStudio:
    """A running Label Studio 1.23: 'legacy' (legacy tokens on, `Token` auth) or 'jwt' (1.23's default, PAT)."""
    server = harness.LabelStudio(tmp_path_factory.mktemp(f"label-studio-{request.param}"),
                                 legacy_tokens=request.param == "legacy")
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    yield server
    server.stop()


@dataclass(frozen=True)
class ImageSet:
    upload: list[Path]        # files to upload (square photos and one non-square)
    url_dir: Path             # folder served over HTTP
    url_names: list[str]      # files in url_dir to import by URL (one photo and one large 1280x720)


@pytest.fixture(scope="session")
def fire_smoke_images(valid_images, tmp_path_factory) -> ImageSet:
    """Six validation photos, a 912x608 and a 1280x720 image composed from them (JPEG)."""
    from PIL import Image

    photos = sorted(valid_images.glob("*.jpg"))
    assert len(photos) >= 46, f"expected the 47 validation images in {valid_images}, found {len(photos)}"
    root = tmp_path_factory.mktemp("images")
    upload_dir, url_dir = root / "upload", root / "served"
    upload_dir.mkdir()
    url_dir.mkdir()
    upload = []
    for photo in photos[0:48:8][:6]:
        upload.append(Path(shutil.copy(photo, upload_dir / photo.name)))
    # Non-square images: the backend must report the real sizes and map boxes back through the letterbox.
    a, b, c, d = (Image.open(photos[i]).convert("RGB") for i in (3, 19, 28, 37))
    wide = Image.new("RGB", (a.width + b.width // 2, a.height))
    wide.paste(a, (0, 0))
    wide.paste(b.crop((0, 0, b.width // 2, b.height)), (a.width, 0))
    wide.save(upload_dir / "composed_912x608.jpg", quality=92)
    upload.append(upload_dir / "composed_912x608.jpg")
    large = Image.new("RGB", (1280, 720))
    large.paste(c.resize((640, 720), Image.BILINEAR), (0, 0))
    large.paste(d.resize((640, 720), Image.BILINEAR), (640, 0))
    large.save(url_dir / "large_1280x720.jpg", quality=92)
    shutil.copy(photos[45], url_dir / photos[45].name)
    return ImageSet(upload=upload, url_dir=url_dir, url_names=[photos[45].name, "large_1280x720.jpg"])


@pytest.fixture(scope="session")
def image_server(fire_smoke_images) -> harness.StaticFileServer:
    with harness.StaticFileServer(fire_smoke_images.url_dir) as server:
        yield server


@dataclass
class Backend:
    url: str
    env: dict
    process: harness.ManagedProcess


@pytest.fixture(scope="session")
def yolo_backend(label_studio, detector_checkpoint, tmp_path_factory) -> Backend:
    """Our ML backend server (`python _wsgi.py --host 127.0.0.1 --port P`) wired to this mode's Label Studio."""
    wsgi = harness.REPO_ROOT / "_wsgi.py"
    if not wsgi.is_file():
        pytest.fail(f"{wsgi} does not exist: the ML backend server is missing")
    workdir = tmp_path_factory.mktemp(f"backend-{'legacy' if label_studio.legacy_tokens else 'jwt'}")
    env = {
        "MODEL_PATH": str(detector_checkpoint),
        "MODEL_DIR": str(workdir / "models"),
        "IMAGE_CACHE_DIR": str(workdir / "image-cache"),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.api_key,
        "IMG_SIZE": "320",
        "TORCH_THREADS": "1",
        "LOG_LEVEL": "DEBUG",
    }
    process, url = harness.start_backend(workdir, env)
    yield Backend(url=url, env=env, process=process)
    process.stop()

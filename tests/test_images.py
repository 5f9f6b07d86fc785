"""Task images: fetching from a fake Label Studio on loopback (both key kinds), errors, decoding, the cache."""

from __future__ import annotations

import base64
import io
import logging
import os

import numpy as np
import pytest

from tests.support import LEGACY, PAT, FakeLabelStudio, png_bytes
from yolo_backend.labelstudio.client import LabelStudioSession, is_personal_access_token
from yolo_backend.labelstudio.images import ImageCache, ImageFetchError, ImageFetcher, decode_image


@pytest.fixture
def ls():
    with FakeLabelStudio() as server:
        yield server


@pytest.fixture
def jwt_only_ls():
    with FakeLabelStudio(legacy_enabled=False) as server:
        yield server


def fetcher_for(url, key, tmp_path, timeout=5.0, max_bytes=10 << 20):
    session = LabelStudioSession(url, key, timeout=timeout)
    return ImageFetcher(session, ImageCache(tmp_path / "cache", max_bytes), timeout=timeout)


def test_token_kinds():
    assert is_personal_access_token(PAT) and not is_personal_access_token(LEGACY)


@pytest.mark.parametrize("key", [LEGACY, PAT], ids=["legacy-token", "personal-access-token"])
def test_upload_local_files_and_cloud(ls, tmp_path, key):
    fetcher = fetcher_for(ls.url, key, tmp_path)
    image = fetcher.load("/data/upload/1/abc-img.png", task_id=1)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == (255, 0, 0)  # RGB, not BGR
    assert fetcher.load("upload/1/abc-img2.png").shape == (48, 64, 3)  # short form of an upload path
    assert fetcher.load("/data/local-files/?d=photos/a.png").shape == (10, 30, 3)
    assert fetcher.load("s3://bucket/dir/c.png", task_id=5).shape == (20, 20, 3)
    expected = f"Token {LEGACY}" if key == LEGACY else "Bearer "
    assert ls.auth_seen[0].startswith(expected)
    assert ls.refreshes == (1 if key == PAT else 0)  # the access token is reused until it expires


def test_absolute_label_studio_url_gets_the_key_other_hosts_do_not(ls, tmp_path):
    fetcher = fetcher_for(ls.url, LEGACY, tmp_path)
    assert fetcher.load(f"{ls.url}/data/upload/1/x.png").shape == (48, 64, 3)
    ls.auth_seen.clear()
    assert fetcher.load(f"{ls.other_host_url}/public/p.png").shape == (34, 12, 3)
    assert ls.auth_seen == [None]  # never send the key to a host that is not Label Studio


def test_errors_name_the_reason(ls, tmp_path):
    fetcher = fetcher_for(ls.url, LEGACY, tmp_path, timeout=0.5)
    cases = {
        "/data/upload/1/missing.png": "HTTP 404",
        "/data/upload/1/page.png": "not an image",
        "/data/upload/1/slow.png": "timed out",
        "ftp://host/x.png": "not an image URL",
        "s3://bucket/dir/c.png": "needs an integer id",
    }
    for url, reason in cases.items():
        with pytest.raises(ImageFetchError, match=reason):
            fetcher.load(url)
    with pytest.raises(ImageFetchError, match="HTML page"):
        fetcher.load("/data/upload/1/page.png")


def test_refused_key(ls, tmp_path):
    fetcher = fetcher_for(ls.url, "f" * 40, tmp_path)
    with pytest.raises(ImageFetchError, match="refused every API key.*personal access token"):
        fetcher.load("/data/upload/1/a.png")
    no_key = ImageFetcher(LabelStudioSession(ls.url, None), None)
    with pytest.raises(ImageFetchError, match="set LABEL_STUDIO_API_KEY"):
        no_key.load("/data/upload/1/a.png")


def test_jwt_only_org_setup_token_refused_configured_pat_used(jwt_only_ls, tmp_path, caplog):
    ls = jwt_only_ls
    session = LabelStudioSession(None, None, timeout=5)
    session.update_from_setup(ls.url, LEGACY)  # what /setup sends: a legacy token
    fetcher = ImageFetcher(session, ImageCache(tmp_path / "c", 1 << 20))
    with pytest.raises(ImageFetchError, match="JWT-only organisations refuse legacy tokens"):
        fetcher.load("/data/upload/1/a.png")

    session = LabelStudioSession(ls.url, PAT, timeout=5)
    session.update_from_setup(ls.url, LEGACY)
    fetcher = ImageFetcher(session, ImageCache(tmp_path / "d", 1 << 20))
    assert fetcher.load("/data/upload/1/a.png").shape == (48, 64, 3)


def test_fallback_to_setup_token_is_logged_once(ls, tmp_path, caplog):
    session = LabelStudioSession(ls.url, "e" * 40, timeout=5)  # a stale configured key
    session.update_from_setup(ls.url, LEGACY)
    fetcher = ImageFetcher(session, None)
    with caplog.at_level(logging.WARNING, logger="yolo_backend.labelstudio.client"):
        for i in range(3):
            assert fetcher.load(f"/data/upload/1/f{i}.png").shape == (48, 64, 3)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "falling back" in refusals[0].getMessage()
    # The working key is tried first from then on: one request per image.
    assert ls.hits["/data/upload/1/f2.png?"] == 1


def test_access_token_refreshed_on_401(ls, tmp_path):
    fetcher = fetcher_for(ls.url, PAT, tmp_path)
    fetcher.load("/data/upload/1/a.png")
    ls.generation += 1  # Label Studio invalidates the access token early
    assert fetcher.load("/data/upload/1/b.png").shape == (48, 64, 3)
    assert ls.refreshes == 2


def test_downloads_are_cached(ls, tmp_path):
    fetcher = fetcher_for(ls.url, LEGACY, tmp_path)
    for _ in range(3):
        fetcher.load("/data/upload/1/cached.png")
    assert ls.hits["/data/upload/1/cached.png?"] == 1
    path = fetcher.local_path("/data/upload/1/cached.png")
    assert os.path.isfile(path) and decode_image(open(path, "rb").read()).shape == (48, 64, 3)


def test_failed_decodes_are_not_cached(ls, tmp_path):
    fetcher = fetcher_for(ls.url, LEGACY, tmp_path)
    for _ in range(2):
        with pytest.raises(ImageFetchError):
            fetcher.load("/data/upload/1/page.png")
    assert fetcher.cache.size_bytes == 0


def test_cache_is_bounded_least_recently_used_first(tmp_path):
    cache = ImageCache(tmp_path, max_bytes=3000)
    keys = [ImageCache.key_for(f"url{i}") for i in range(5)]
    for i, key in enumerate(keys[:3]):
        cache.put(key, bytes([i]) * 1000)
        os.utime(cache.path_for(key), (1000 + i, 1000 + i))
    assert cache.get(keys[0]) is not None  # touching it makes it the most recently used
    cache.put(keys[3], b"x" * 1000)
    cache.put(keys[4], b"y" * 1000)
    assert cache.size_bytes <= 3000
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.get(keys[4]) is not None
    assert cache.put(ImageCache.key_for("huge"), b"z" * 4000) is None  # larger than the whole cache


def test_data_uri_and_local_storage_root(tmp_path, monkeypatch):
    fetcher = ImageFetcher(LabelStudioSession(None, None), None)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(5, 7)).decode()
    assert fetcher.load(uri).shape == (7, 5, 3)
    # With LOCAL_FILES_DOCUMENT_ROOT set here, Local Storage files are read from disk (no Label Studio needed).
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "b.png").write_bytes(png_bytes(9, 3))
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    assert fetcher.load("/data/local-files/?d=photos/b.png").shape == (3, 9, 3)
    assert fetcher.local_path("/data/local-files/?d=photos/b.png") == str(tmp_path / "photos" / "b.png")


def test_local_storage_stays_inside_its_root_and_cloud_uris_are_presigned(tmp_path, monkeypatch):
    from yolo_backend.labelstudio.storage import is_cloud_storage_uri, local_storage_path, presign_path

    root = tmp_path / "root"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "a.png").write_bytes(png_bytes(4, 4))
    (tmp_path / "secret.png").write_bytes(png_bytes(4, 4))
    assert local_storage_path("/data/local-files/?d=photos/a.png") is None  # no root: fetched from Label Studio
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(root))
    assert local_storage_path("/data/local-files/?d=photos/a.png") == str(root / "photos" / "a.png")
    assert local_storage_path("/data/local-files/?d=%2Fphotos%2Fa.png") == str(root / "photos" / "a.png")
    for outside in ("../secret.png", "photos/../../secret.png", "/../secret.png"):
        assert local_storage_path(f"/data/local-files/?d={outside}") is None, outside
    assert local_storage_path("/data/local-files/?d=photos/missing.png") is None
    assert local_storage_path("/data/local-files/?x=1") is None
    assert presign_path(5, "s3://bucket/dir/c.png") == "/tasks/5/presign/?fileuri=czM6Ly9idWNrZXQvZGlyL2MucG5n"
    assert all(is_cloud_storage_uri(u) for u in ("s3://b/k.png", "gs://b/k.png", "azure-blob://c/k.png"))
    assert not any(is_cloud_storage_uri(u) for u in ("http://x/s3://", "/data/upload/1/a.png", None))


def test_exif_orientation_is_applied():
    from PIL import Image

    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = 255
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (40, 20, 3)  # upright, as the browser (and Label Studio) sees it


def test_not_an_image():
    with pytest.raises(ImageFetchError, match="not an image"):
        decode_image(b"hello, world" * 10)
    with pytest.raises(ImageFetchError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("key", [LEGACY, PAT], ids=["legacy-token", "personal-access-token"])
def test_label_studio_down_is_a_download_failure_not_a_refused_key(key):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fetcher = ImageFetcher(LabelStudioSession(f"http://127.0.0.1:{port}", key, timeout=2), None)
    with pytest.raises(ImageFetchError, match="download failed"):
        fetcher.load("/data/upload/1/a.png")

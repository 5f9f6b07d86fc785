from __future__ import annotations

import pytest

from yolo_backend.settings import Settings, SettingsError


def test_defaults_are_valid_and_documented():
    settings = Settings.from_env({})
    assert settings.img_size is None  # the size the checkpoint was trained at, else 640
    assert settings.model_score_threshold == 0.25
    table = Settings.table()
    # every field shows up in the documentation table with its environment variable
    for name in ("MODEL_PATH", "MODEL_DIR", "DEVICE", "MODEL_SCORE_THRESHOLD", "TASK_SCORE", "REDIS_URL"):
        assert f"`{name}`" in table


def test_environment_values_are_converted():
    settings = Settings.from_env({"IMG_SIZE": "320", "HALF": "yes", "MODEL_SCORE_THRESHOLD": "0.4",
                                  "MODEL_PATH": "/m/best.pt"})
    assert settings.img_size == 320 and settings.half is True
    assert settings.model_score_threshold == pytest.approx(0.4)
    assert settings.model_path == "/m/best.pt"


@pytest.mark.parametrize("env, fragment", [
    ({"IMG_SIZE": "300"}, "multiple of 32"),
    ({"IMG_SIZE": "big"}, "IMG_SIZE='big'"),
    ({"HALF": "maybe"}, "HALF='maybe'"),
    ({"MODEL_SCORE_THRESHOLD": "1.5"}, "between 0 and 1"),
    ({"TASK_SCORE": "random"}, "use one of"),
    ({"BASIC_AUTH_USER": "u"}, "BASIC_AUTH_PASS"),
])
def test_bad_values_say_what_to_fix(env, fragment):
    with pytest.raises(SettingsError, match=fragment):
        Settings.from_env(env)


def test_overrides_and_redis_url():
    settings = Settings.from_env({"REDIS_HOST": "redis", "REDIS_PORT": "6380"}, img_size="416")
    assert settings.img_size == 416
    assert settings.effective_redis_url == "redis://redis:6380/0"
    assert Settings.from_env({"REDIS_URL": "redis://x:1/2"}).effective_redis_url == "redis://x:1/2"
    with pytest.raises(SettingsError, match="unknown setting"):
        Settings.from_env({}, no_such_thing=1)


@pytest.mark.parametrize("env, fragment", [
    ({"TRAIN_IMG_SIZE": "100"}, "TRAIN_IMG_SIZE=100 must be a positive multiple of 32"),
    ({"PREDICT_BATCH_SIZE": "0"}, "PREDICT_BATCH_SIZE=0 must be greater than 0"),
    ({"TRAIN_TIME_BUDGET_S": "0"}, "TRAIN_TIME_BUDGET_S=0.0 must be greater than 0"),
    ({"KEEP_VERSIONS": "-1"}, "KEEP_VERSIONS=-1 must not be negative"),
    ({"INFERENCE_BACKEND": "tensorrt"}, "INFERENCE_BACKEND='tensorrt' is unknown"),
])
def test_numeric_bounds_are_checked_at_start(env, fragment):
    with pytest.raises(SettingsError, match=fragment):
        Settings.from_env(env)


def test_mask_password_and_exposure_warning():
    from yolo_backend.settings import exposure_warning, is_loopback_host, mask_password

    assert mask_password("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert mask_password("redis://user:s3cret@redis:6379/1") == "redis://user:***@redis:6379/1"
    assert mask_password("redis://redis:6379/0") == "redis://redis:6379/0"
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "192.168.1.5", "backend.example", ""))
    open_settings = Settings.from_env(env={})
    assert exposure_warning("127.0.0.1", open_settings) is None
    warning = exposure_warning("0.0.0.0", open_settings)
    assert warning and "BASIC_AUTH_USER" in warning and "0.0.0.0" in warning
    assert exposure_warning("0.0.0.0", Settings.from_env(env={"BASIC_AUTH_USER": "a", "BASIC_AUTH_PASS": "b"})) is None

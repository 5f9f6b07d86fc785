"""Model versions on disk and stable version names."""

import os
import time

import pytest

from yolo_backend.registry import Registry, RegistryError, checkpoint_version, file_sha256


def write(path, data=b"weights"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_empty_registry(tmp_path):
    registry = Registry(tmp_path / "missing")
    assert registry.versions() == [] and registry.latest() is None


def test_publish_lists_and_points_latest(tmp_path):
    registry = Registry(tmp_path)
    ckpt = write(tmp_path / "ckpt.pt")
    first = registry.publish(ckpt, {"map50": 0.7})
    second = registry.publish(ckpt, {"map50": 0.8, "parent": first.name})
    assert [v.number for v in registry.versions()] == [1, 2]
    assert first.name.startswith("v1-") and second.name.startswith("v2-")
    assert registry.latest() == second
    assert second.meta()["parent"] == first.name and second.checkpoint.read_bytes() == b"weights"
    assert registry.get(first.name) == first
    with pytest.raises(RegistryError, match="not in"):
        registry.get("v9-x")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".publish-")]


def test_latest_pointer_wins_and_incomplete_folders_are_ignored(tmp_path):
    registry = Registry(tmp_path)
    write(tmp_path / "v1-20260101T0000" / "model.pt")
    write(tmp_path / "v2-20260102T0000" / "model.pt")
    (tmp_path / "v3-20260103T0000").mkdir()  # no model.pt: a publish in progress
    assert registry.latest().name == "v2-20260102T0000"
    (tmp_path / "LATEST").write_text("v1-20260101T0000\n")  # e.g. a rollback
    assert registry.latest().name == "v1-20260101T0000"
    (tmp_path / "LATEST").write_text("v7-gone\n")
    assert registry.latest().name == "v2-20260102T0000"


def test_stamp_changes_on_publish(tmp_path):
    registry = Registry(tmp_path)
    before = registry.stamp()
    registry.publish(write(tmp_path / "c.pt"))
    assert registry.stamp() != before


def test_project_registry_folder(tmp_path):
    assert Registry.for_project(tmp_path, 4).root == tmp_path / "projects" / "4"
    assert Registry.for_project(tmp_path, None).root == tmp_path


def test_checkpoint_version_is_stable_and_content_based(tmp_path):
    a = write(tmp_path / "best.pt", b"A" * 1000)
    name = checkpoint_version(a)
    assert name.startswith("best-") and len(name) == len("best-") + 8
    assert checkpoint_version(a) == name  # same weights, same name (cache or not)
    copy = write(tmp_path / "other" / "best.pt", b"A" * 1000)
    assert checkpoint_version(copy) == name
    write(a, b"B" * 1000)
    os.utime(a, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert checkpoint_version(a) != name
    assert file_sha256(a) == file_sha256(a)


def test_latest_never_moves_back_to_a_lower_version(tmp_path):
    from yolo_backend.registry import Registry

    checkpoint = tmp_path / "w.pt"
    checkpoint.write_bytes(b"weights")
    registry = Registry(tmp_path / "models")
    registry.publish(checkpoint, name="v1-20260101T000000")
    late = registry.publish(checkpoint, name="v0-untrained")  # e.g. a fallback built while v1 was published
    assert late.name == "v0-untrained"
    assert registry.latest().name == "v1-20260101T000000"


def test_the_registry_owns_its_work_folders_leftovers_and_removals(tmp_path):
    registry = Registry(tmp_path / "models")
    checkpoint = write(tmp_path / "ckpt.pt")
    v1, v2, v3 = (registry.publish(checkpoint, name=f"v{n}-2026010{n}T0000") for n in (1, 2, 3))
    tmp_path = registry.root
    work = registry.work_folder("train-1-abc")
    (work / "model.pt").write_text("partial")
    (tmp_path / ".publish-xyz").mkdir()
    (tmp_path / ".trash-v0-1").mkdir()
    registry.clean_leftovers()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert registry.prune(keep=2, protect=set()) == [v1.name]
    assert registry.remove([v3.name]) == [v3.name]  # a newer version removed: LATEST moves back to the newest left
    assert registry.latest().name == v2.name and (tmp_path / "LATEST").read_text().strip() == v2.name

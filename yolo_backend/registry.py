"""Model versions on disk (the registry in MODEL_DIR): list them, find the newest, name them stably.

Layout of one registry folder (MODEL_DIR itself, or ``MODEL_DIR/projects/<id>`` for one project's versions):

    <root>/
      LATEST                  name of the newest published version (replaced atomically on publish)
      v1-20261123T1910/
        model.pt              the checkpoint
        meta.json             metrics, parent version, annotation count, ... (optional)
      v2-20261124T0802/ ...
      .work/<run>/            a training run's files; .publish-*/ a version being copied in; .trash-*/ one being
                              deleted (never listed; removed by ``clean_leftovers`` after a killed run)

Version names are ``v<N>-<UTC timestamp>``: readable and monotonic by N. A folder without ``model.pt`` is not a
version (a publish in progress writes to a temporary folder first). Serving processes notice a new version by
the LATEST file's stat (cheap), see ``Registry.stamp``.

A checkpoint given by path (MODEL_PATH) is named ``<file stem>-<sha256[:8]>``: the same weights get the same
name after a restart, different weights a different one (``checkpoint_version``; hashing is cached by path,
size and mtime).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .atomic import atomic_write
from .hashing import file_sha256  # noqa: F401  (part of this module's API)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
META_FILE = "meta.json"
LATEST_FILE = "LATEST"
WORK_DIR = ".work"           # training runs' files, per run
STAGING_PREFIX = ".publish-"  # a version being copied in
TRASH_PREFIX = ".trash-"      # a version being deleted
_NAME = re.compile(r"^v(\d+)-[0-9A-Za-z]+$")


PROJECTS_DIR = "projects"  # MODEL_DIR/projects/<id>/<version>/


class RegistryError(ValueError):
    """A version asked for does not exist or the registry cannot be written; the message says what to do."""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    number: int
    path: Path        # the version folder
    checkpoint: Path  # its model.pt

    def meta(self) -> dict:
        try:
            return json.loads((self.path / META_FILE).read_text())
        except (OSError, ValueError):
            return {}


class Registry:
    """One registry folder. Reading is safe from any number of processes; ``publish`` is atomic."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def for_project(cls, model_dir: str | os.PathLike, project_id: Optional[int]) -> "Registry":
        """The registry of one Label Studio project's versions (MODEL_DIR itself when project_id is None)."""
        root = Path(model_dir)
        return cls(root if project_id is None else root / PROJECTS_DIR / str(int(project_id)))

    @classmethod
    def all_projects(cls, model_dir: str | os.PathLike) -> list["Registry"]:
        """The registries of every project that has one, by project id."""
        names = [p.name for p in (Path(model_dir) / PROJECTS_DIR).glob("*")]
        ids = sorted(int(name) for name in names if name.isascii() and name.isdigit())
        return [cls.for_project(model_dir, pid) for pid in ids]

    @classmethod
    def lookup_order(cls, model_dir: str | os.PathLike, project_id: Optional[int]) -> list["Registry"]:
        """Where a project's version is looked up, first match wins: its own registry, then MODEL_DIR's (shared by
        projects without one). The one home of that order (the model holder and /versions use it)."""
        own = [cls.for_project(model_dir, project_id)] if project_id is not None else []
        return own + [cls(model_dir)]

    @classmethod
    def version_names(cls, model_dir: str | os.PathLike, project_id: Optional[int]) -> list[str]:
        """Published version names for /versions: the project's and the shared ones; without a project (Label
        Studio's model list asks without one) every project's too."""
        registries = cls.lookup_order(model_dir, project_id)
        if project_id is None:
            registries = cls.all_projects(model_dir) + registries
        names: list[str] = []
        for registry in registries:
            names += [v.name for v in registry.versions() if v.name not in names]
        return names

    def versions(self) -> list[ModelVersion]:
        """Published versions, oldest first."""
        found = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        for entry in entries:
            match = _NAME.match(entry.name)
            if not match or not entry.is_dir():
                continue
            checkpoint = Path(entry.path) / CHECKPOINT_FILE
            if checkpoint.is_file():
                found.append(ModelVersion(entry.name, int(match.group(1)), Path(entry.path), checkpoint))
        return sorted(found, key=lambda v: (v.number, v.name))

    def get(self, name: str) -> ModelVersion:
        for version in self.versions():
            if version.name == name:
                return version
        names = ", ".join(v.name for v in self.versions()) or "none"
        raise RegistryError(f"model version {name!r} is not in {self.root} (published: {names}); "
                            "unset MODEL_VERSION or pick one of these")

    def latest(self) -> Optional[ModelVersion]:
        """The version LATEST names, else the highest-numbered one; None when nothing is published."""
        versions = self.versions()
        if not versions:
            return None
        try:
            name = (self.root / LATEST_FILE).read_text().strip()
        except OSError:
            name = ""
        for version in versions:
            if version.name == name:
                return version
        return versions[-1]

    def stamp(self) -> tuple:
        """Changes whenever a version is published or removed; a stat or two, cheap enough to poll."""
        stamps: list[Optional[tuple[int, int, int]]] = []
        for path in (self.root / LATEST_FILE, self.root):
            try:
                st = path.stat()
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def next_name(self, now: Optional[float] = None) -> str:
        versions = self.versions()
        number = (versions[-1].number + 1) if versions else 1
        return f"v{number}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}"

    def publish(self, checkpoint: str | os.PathLike, meta: Optional[dict] = None, name: Optional[str] = None) \
            -> ModelVersion:
        """Copy ``checkpoint`` in as a new version and point LATEST at it, atomically: the folder is built under a
        temporary name and renamed, then LATEST is replaced, so readers see either the old or the new version."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = name or self.next_name()
        if not _NAME.match(name):
            raise RegistryError(f"version name {name!r} must look like v<N>-<timestamp>")
        final = self.root / name
        if final.exists():
            raise RegistryError(f"version {name} already exists in {self.root}")
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=STAGING_PREFIX))
        try:
            shutil.copyfile(checkpoint, staging / CHECKPOINT_FILE)
            (staging / META_FILE).write_text(json.dumps({"name": name, "created": time.time(), **(meta or {})},
                                                         indent=2, default=str))
            for path in (staging / CHECKPOINT_FILE, staging / META_FILE):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        published = self.get(name)
        newest = self.versions()[-1]
        # LATEST never moves back to a lower number (a late v0 must not hide a v1 published meanwhile).
        _write_atomic(self.root / LATEST_FILE, (published if published.number >= newest.number else newest).name + "\n")
        return published


    # --- the rest of the on-disk layout: work folders, leftovers, removing versions ------------------------------
    def work_folder(self, run: str) -> Path:
        """A folder for one training run's files (never listed as a version; ``clean_leftovers`` removes it)."""
        folder = self.root / WORK_DIR / run
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def clean_leftovers(self) -> None:
        """Remove what a killed run left (its work folder, a half-copied publish, a half-deleted version). Only the
        one job holding the project's lock calls it; readers never see these (not version folders)."""
        for pattern in (WORK_DIR, f"{STAGING_PREFIX}*", f"{TRASH_PREFIX}*"):
            for path in self.root.glob(pattern):
                shutil.rmtree(path, ignore_errors=True)

    def remove(self, names: list[str]) -> list[str]:
        """Delete these versions (each gone for readers at once: renamed, then deleted) and point LATEST at the
        newest that is left. Returns the names removed."""
        removed = []
        for version in [v for v in self.versions() if v.name in names]:
            trash = version.path.with_name(f"{TRASH_PREFIX}{version.name}")
            try:
                os.rename(version.path, trash)
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(version.name)
            except OSError as exc:
                log.warning("could not remove version %s: %s", version.path, exc)
        left = self.versions()
        if removed and (self.root / LATEST_FILE).exists():
            _write_atomic(self.root / LATEST_FILE, (left[-1].name + "\n") if left else "")
        return removed

    def prune(self, keep: int, protect: set[str]) -> list[str]:
        """Delete the oldest versions beyond ``keep`` (0: keep all), never the newest or a protected one."""
        versions = self.versions()
        if keep <= 0 or len(versions) <= keep:
            return []
        latest = self.latest()
        old = [v.name for v in versions[:-keep] if v.name not in protect and (latest is None or v.name != latest.name)]
        return self.remove(old)


def _write_atomic(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


# --- stable names for checkpoints given by path -----------------------------------------------------------



def checkpoint_version(path: str | os.PathLike) -> str:
    """``<file stem>-<sha256[:8]>``: stable across restarts for the same weights."""
    path = Path(path)
    return f"{path.stem}-{file_sha256(path)[:8]}"

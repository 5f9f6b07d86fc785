"""Where boxes go in Label Studio (control/object names, labels), how tasks point at images, and back.

Image references in tasks:

* ``/data/local-files/?d=<path>``: Label Studio's local-files storage. ``<path>`` is relative to its
  ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` (give the same folder as ``document_root``); Label Studio also needs
  ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true``.
* ``<url_prefix><path>``: images served over HTTP(S); ``<path>`` is relative to ``document_root`` when given,
  else to the dataset's root.
* uploads: the files go to Label Studio through its API (see ``upload.py``); the task then points at
  ``/data/upload/<project>/<8 hex>-<file name>``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import parse_qs, quote, unquote, urlparse
from xml.sax.saxutils import quoteattr

from ..labelstudio.config import LabelConfigError, RectangleTarget, parse_label_config
from ..labelstudio.controls import read_controls
from .problems import ConversionError

LOCAL_FILES_PREFIX = "/data/local-files/?d="
UPLOAD_PREFIX = "/data/upload/"
_UPLOAD_NAME = re.compile(r"^[0-9a-f]{8}-(.+)$")


# --- target -------------------------------------------------------------------------------------------------------

def target_from_config(text: str, from_name: Optional[str] = None, where: str = "the label config") \
        -> RectangleTarget:
    """The RectangleLabels control whose boxes a conversion reads or writes (its labels in the config's order): the
    one the server would serve (``controls.read_controls``: ``model_skip``, FROM_NAME, one image), and only one, as
    a YOLO label file holds one set of boxes."""
    try:
        parsed = parse_label_config(text)
        rectangles = read_controls(parsed, from_name).rectangles
        if not rectangles:
            found = ", ".join(f"{name} ({info.get('type')})" for name, info in parsed.items())
            raise LabelConfigError(f"it has no <RectangleLabels> control for the model (found: {found}); a YOLO "
                                   "conversion needs boxes: add e.g. <RectangleLabels name=\"label\" toName=\"image\">"
                                   "<Label value=\"fire\"/></RectangleLabels>")
        if len(rectangles) > 1:
            raise LabelConfigError(f"it has several RectangleLabels controls ({', '.join(c.name for c in rectangles)}"
                                   "); name the one to convert with --from-name (FROM_NAME)")
        return rectangles[0].target()
    except LabelConfigError as exc:
        raise ConversionError(f"{where}: {exc}") from None


def target_from_flags(from_name: Optional[str], to_name: Optional[str], labels: Sequence[str],
                      data_key: str = "image") -> RectangleTarget:
    return RectangleTarget(from_name=from_name or "label", to_name=to_name or "image", data_key=data_key,
                           labels=tuple(labels))


def split_labels(text: Optional[str]) -> list[str]:
    """``fire,smoke`` -> ["fire", "smoke"]; duplicates are an error (class order must be unambiguous)."""
    if not text:
        return []
    labels = [part.strip() for part in text.split(",") if part.strip()]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConversionError(f"--labels lists {', '.join(duplicates)} more than once")
    return labels


def labels_for_classes(class_names: Sequence[str], config_labels: Sequence[str]) -> list[str]:
    """The config label for each class name (exact, else case-insensitive); every class must have one."""
    by_lower: dict[str, str] = {}
    for config_label in config_labels:
        by_lower.setdefault(config_label.lower(), config_label)
    out: list[str] = []
    missing: list[str] = []
    for name in class_names:
        label = name if name in config_labels else by_lower.get(name.lower())
        if label is None:
            missing.append(name)
        else:
            out.append(label)
    if missing:
        raise ConversionError(
            f"class(es) {', '.join(map(repr, missing))} have no <Label> in the label config (labels: "
            f"{', '.join(config_labels) or 'none'}); add them to the config or rename with --labels")
    return out


def label_config_xml(target: RectangleTarget, labels: Optional[Sequence[str]] = None) -> str:
    """A labeling config with one Image and one RectangleLabels control holding ``labels``."""
    labels = list(labels if labels is not None else target.labels)
    palette = ("red", "gray", "blue", "green", "orange", "purple", "brown", "pink", "olive", "cyan")
    label_lines = "\n".join(
        f"    <Label value={quoteattr(label)} background={quoteattr(palette[i % len(palette)])}/>"
        for i, label in enumerate(labels))
    return (f"<View>\n  <Image name={quoteattr(target.to_name)} value={quoteattr('$' + target.data_key)}/>\n"
            f"  <RectangleLabels name={quoteattr(target.from_name)} toName={quoteattr(target.to_name)}>\n"
            f"{label_lines}\n  </RectangleLabels>\n</View>\n")


# --- image references ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRefs:
    """Turns a local image path into what the task's data holds (see the module doc)."""

    mode: str                              # "local-files", "url" or "upload"
    root: Optional[Path] = None            # paths are made relative to this
    url_prefix: str = ""
    root_given: Optional[Path] = None      # the root as given (symlinks kept)

    @classmethod
    def choose(cls, document_root: Optional[str], url_prefix: Optional[str], upload: bool,
               dataset_root: Optional[Path]) -> "ImageRefs":
        chosen = [name for name, on in (("--document-root", document_root and not url_prefix),
                                        ("--url-prefix", url_prefix), ("--upload", upload)) if on]
        if len(chosen) > 1:
            raise ConversionError(f"choose one way to reference images, not {' and '.join(chosen)}")
        if upload:
            return cls("upload")
        if url_prefix:
            if not urlparse(url_prefix).scheme:
                raise ConversionError(f"--url-prefix {url_prefix!r} is not a URL; use e.g. http://host/images/")
            root = Path(document_root) if document_root else dataset_root
            return cls("url", root.resolve() if root else None, url_prefix.rstrip("/") + "/", root)
        if document_root:
            root = Path(document_root)
            if not root.is_dir():
                raise ConversionError(f"--document-root {root} is not a folder")
            return cls("local-files", root.resolve(), root_given=root)
        raise ConversionError("say how Label Studio will find the images: --document-root DIR (local files "
                              "served by Label Studio), --url-prefix URL (served over HTTP) or --upload "
                              "(upload through the API)")

    def relative(self, image: Path) -> str:
        if self.root is None:
            return image.name
        # Symlinked images keep their own path (Label Studio serves the link); a resolved match is the fallback.
        for path, root in ((Path(os.path.abspath(image)), self.root_abs), (image.resolve(), self.root)):
            try:
                return path.relative_to(root).as_posix()
            except ValueError:
                pass
        raise ConversionError(
            f"{image} is not under {self.root_abs}; " + (
                "Label Studio serves local files only below its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: give "
                "that folder as --document-root" if self.mode == "local-files" else
                "give --document-root as the folder the URL prefix serves"))

    @property
    def root_abs(self) -> Path:
        root = self.root_given or self.root
        assert root is not None  # a mode with a root
        return Path(os.path.abspath(root))

    def ref(self, image: Path) -> str:
        if self.mode == "upload":
            return image.name  # replaced by Label Studio's /data/upload/... URL when uploaded
        rel = quote(self.relative(image), safe="/")
        return (LOCAL_FILES_PREFIX if self.mode == "local-files" else self.url_prefix) + rel


def uploaded_name(file_name: str) -> str:
    """'1a2b3c4d-fire.jpg' -> 'fire.jpg': Label Studio prefixes uploaded files with 8 hex digits and '-'."""
    match = _UPLOAD_NAME.match(file_name)
    return match.group(1) if match else file_name


def image_name_from_ref(ref: str) -> str:
    """The file name a task's image reference points at (upload prefix removed)."""
    parsed = urlparse(ref)
    if parsed.path.rstrip("/").endswith("/data/local-files") or LOCAL_FILES_PREFIX in ref:
        value = parse_qs(parsed.query).get("d", [""])[0]
        return Path(value).name or "image"
    name = Path(unquote(parsed.path)).name or "image"
    return uploaded_name(name) if UPLOAD_PREFIX in parsed.path else name


@dataclass
class ImageSources:
    """Finds a local file for a task's image reference (for the export back to YOLO).

    document_root: resolves ``/data/local-files/?d=...`` (and URLs under ``url_prefix``);
    media_root:    Label Studio's media folder, resolving ``/data/upload/<project>/<file>`` to
                   ``<media_root>/upload/<project>/<file>``;
    image_dirs:    folders searched by file name (upload prefix removed), any depth.
    """

    document_root: Optional[Path] = None
    media_root: Optional[Path] = None
    image_dirs: Sequence[Path] = ()
    url_prefix: str = ""

    def __post_init__(self) -> None:
        self._by_name: Optional[dict[str, Path]] = None

    def _index(self) -> dict[str, Path]:
        if self._by_name is None:
            self._by_name = {}
            for folder in self.image_dirs:
                for path in sorted(Path(folder).rglob("*")):
                    if path.is_file():
                        self._by_name.setdefault(path.name, path)
        return self._by_name

    def find(self, ref: str) -> Optional[Path]:
        parsed = urlparse(ref)
        candidates: list[Path] = []
        if LOCAL_FILES_PREFIX in ref or parsed.path.rstrip("/").endswith("/data/local-files"):
            value = parse_qs(parsed.query).get("d", [""])[0]
            if value and self.document_root:
                candidates.append(self.document_root / value)
        elif parsed.path.startswith(UPLOAD_PREFIX) and self.media_root:
            candidates.append(self.media_root / "upload" / unquote(parsed.path[len(UPLOAD_PREFIX):]))
        elif self.url_prefix and ref.startswith(self.url_prefix) and self.document_root:
            candidates.append(self.document_root / unquote(ref[len(self.url_prefix):]))
        elif not parsed.scheme and not ref.startswith("/data/"):
            candidates.append(Path(ref))  # a plain file path
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        index = self._index()
        name = Path(unquote(parsed.path)).name
        return index.get(name) or index.get(image_name_from_ref(ref))

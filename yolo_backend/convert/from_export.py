"""A Label Studio JSON export (file or API) -> a YOLO dataset folder.

Output::

    out/images/<name>         copied or symlinked from a local source when one is found
    out/labels/<stem>.txt     one line per box: class cx cy w h (normalised); empty for a negative
    out/data.yaml             names in a stable order, train/val pointing at images/
    out/sources.tsv           image name, task id, the task's image reference, the local source (or empty)

Per task the latest non-cancelled annotation is used (by its last change, see labelstudio/annotations.py); a task
with none is left out (not labelled) and counted. An annotation without boxes gives an empty label file.
``take="predictions"`` uses each task's latest prediction instead (e.g. to turn imported pre-annotations back).

Class order: the label config's order when given, else the order given by the caller, else sorted label names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..labelstudio import regions
from ..labelstudio.annotations import latest_annotation, latest_prediction
from ..labelstudio.regions import BadRegion, RegionBox, is_box_region
from .problems import ConversionError, ProblemLog
from .targets import ImageSources, image_name_from_ref
from .yolo_files import YoloBox, write_data_yaml, write_label_file

log = logging.getLogger("yolo_backend.convert")

IMAGE_MODES = ("copy", "symlink", "none")
TAKE = ("annotations", "predictions")


# --- reading exports ----------------------------------------------------------------------------------------------

def load_export_file(path: Path) -> list[dict]:
    """The tasks of a Label Studio JSON export (``JSON`` format: a list of tasks with ``data`` and
    ``annotations``). Our own import files are accepted too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read the export ({exc.strerror or exc})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not JSON ({exc}); export the project as 'JSON' from Label Studio") from None
    return check_tasks(body, str(path))


def check_tasks(body: Any, where: str) -> list[dict]:
    if isinstance(body, dict) and isinstance(body.get("tasks"), list):
        body = body["tasks"]
    if not isinstance(body, list) or not all(isinstance(t, dict) for t in body):
        raise ConversionError(f"{where}: expected a JSON list of tasks (Label Studio's 'JSON' export)")
    for i, task in enumerate(body):
        if not isinstance(task.get("data"), dict):
            hint = (" (this looks like the 'JSON_MIN' export; export as 'JSON' instead)"
                    if "image" in task or "label" in task else "")
            raise ConversionError(f"{where}: task {task.get('id', i)} has no 'data' object{hint}")
    return body


def fetch_export(url: str, api_key: str, project: int, with_predictions: bool = False) -> tuple[list[dict], str]:
    """(tasks, label config) of a project through label-studio-sdk (legacy tokens and personal access tokens):
    the project's JSON export, all tasks included; ``with_predictions`` fills in the full predictions."""
    try:
        from label_studio_sdk.client import LabelStudio

        client = LabelStudio(base_url=url.rstrip("/"), api_key=api_key)
        label_config = client.projects.get(id=project).label_config or ""
        tasks = client.projects.exports.as_json(project)
        if with_predictions:
            # The export lists predictions by id only: fetch them and put the full ones in place.
            by_task: dict[Optional[int], list[dict]] = {}
            for prediction in client.predictions.list(project=project):
                item = prediction.model_dump(mode="json")
                by_task.setdefault(item.get("task"), []).append(item)
            for task in tasks if isinstance(tasks, list) else []:
                if isinstance(task, dict):
                    task["predictions"] = by_task.get(task.get("id"), [])
    except ConversionError:
        raise
    except Exception as exc:  # the SDK raises ApiError, httpx errors, ...
        status: Any = getattr(exc, "status_code", None)
        detail = f"HTTP {status}" if status else f"{type(exc).__name__}: {exc}"
        hint = {401: "check --api-key (a personal access token or a legacy token)",
                404: f"check --project {project} exists and the key's user can see it"}.get(status, "")
        raise ConversionError(f"Label Studio at {url}: export of project {project} failed ({detail})"
                              + (f"; {hint}" if hint else "")) from None
    return check_tasks(tasks, f"project {project} export"), label_config


# --- regions -> boxes (the rule: labelstudio/regions.py) ------------------------------------------------------------

def region_box(region: dict, where: str, problems: ProblemLog) -> Optional[RegionBox]:
    """The region's box, with what is noteworthy about it reported; None (reported) for a bad region."""
    box = regions.region_box(region)
    if isinstance(box, BadRegion):
        problems.report(box.kind, where, box.message)
        return None
    name = f"region {region.get('id')}"
    if box.extra_labels:
        labels = [box.label, *box.extra_labels]
        problems.report("several labels", where, f"{name} has labels {labels}; YOLO keeps one per box",
                        skipped=f"kept {box.label!r}")
    if box.rotated:
        problems.report("rotated box", where, f"{name} is rotated {box.rotation:g} degrees",
                        skipped="kept its axis-aligned bounding box")
    if box.clipped:
        problems.report("clipped box", where, f"{name} passes the image border", skipped="clipped to the image")
    return box


# --- the conversion ------------------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    out_dir: Path
    names: list[str]
    written: int          # label files written
    boxes: int
    negatives: int        # empty label files
    unlabelled: int       # tasks left out: nothing to take
    images_found: int
    images_missing: int


def _unique_name(name: str, task_id: Any, used: set[str]) -> str:
    stem, suffix = os.path.splitext(name)
    candidate = name
    if candidate in used or not stem:
        candidate = f"task{task_id}_{name}" if stem else f"task{task_id}{suffix or '.jpg'}"
    n = 2
    while candidate in used:
        candidate = f"task{task_id}_{n}_{name}"
        n += 1
    used.add(candidate)
    return candidate


def class_names_for(tasks: Sequence[dict], ordered: Optional[Sequence[str]], from_name: Optional[str],
                    take: str) -> list[str]:
    """The class order: ``ordered`` when given, else the sorted labels found in what will be converted."""
    if ordered:
        return list(ordered)
    seen: set[str] = set()
    for task in tasks:
        chosen = latest_annotation(task) if take == "annotations" else latest_prediction(task)
        for region in (chosen or {}).get("result") or []:
            if is_box_region(region, from_name):
                seen.update(str(v) for v in ((region.get("value") or {}).get("rectanglelabels") or [])[:1])
    if not seen:
        raise ConversionError("no box labels found in the export and no class order given; give --label-config "
                              "or --labels")
    return sorted(seen)


def export_to_yolo(tasks: Sequence[dict], out_dir: Path, problems: ProblemLog, names: Optional[Sequence[str]] = None,
                   from_name: Optional[str] = None, data_key: Optional[str] = None,
                   sources: Optional[ImageSources] = None, images: str = "copy", take: str = "annotations") \
        -> ExportResult:
    """Write ``tasks`` (Label Studio JSON export) as a YOLO dataset in ``out_dir`` (see the module doc)."""
    if images not in IMAGE_MODES:
        raise ConversionError(f"images mode {images!r} is unknown; use one of {', '.join(IMAGE_MODES)}")
    if take not in TAKE:
        raise ConversionError(f"take {take!r} is unknown; use one of {', '.join(TAKE)}")
    sources = sources or ImageSources()
    names = class_names_for(tasks, names, from_name, take)
    class_of = {name: i for i, name in enumerate(names)}
    class_of_lower: dict[str, int] = {}
    for name, i in class_of.items():
        class_of_lower.setdefault(name.lower(), i)

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    result = ExportResult(out_dir, list(names), 0, 0, 0, 0, 0, 0)
    rows = []
    for index, task in enumerate(tasks):
        task_id = task.get("id", index)
        where = f"task {task_id}"
        chosen = latest_annotation(task) if take == "annotations" else latest_prediction(task)
        if chosen is None:
            result.unlabelled += 1
            continue
        ref = _image_ref(task, data_key)
        if ref is None:
            problems.report("task without image", where, f"its data has no image field ({data_key or 'any'}); "
                            f"fields: {', '.join(sorted(task['data'])) or 'none'}")
            continue
        boxes = []
        for region in chosen.get("result") or []:
            if not is_box_region(region, from_name):
                continue
            box = region_box(region, where, problems)
            if box is None:
                continue
            class_id = class_of.get(box.label, class_of_lower.get(box.label.lower()))
            if class_id is None:
                problems.report("unknown label", where, f"label {box.label!r} is not a class "
                                f"({', '.join(names)})")
                continue
            boxes.append(YoloBox(class_id, *box.center_size()))
        name = _unique_name(image_name_from_ref(ref), task_id, used)
        write_label_file(out_dir / "labels" / (os.path.splitext(name)[0] + ".txt"), boxes)
        result.written += 1
        result.boxes += len(boxes)
        result.negatives += not boxes
        source = sources.find(ref)
        if source is None:
            result.images_missing += 1
        else:
            result.images_found += 1
            _place_image(source, out_dir / "images" / name, images)
        rows.append((name, str(task_id), ref, str(source.resolve()) if source else ""))
    write_data_yaml(out_dir / "data.yaml", names)
    with open(out_dir / "sources.tsv", "w", encoding="utf-8") as handle:
        handle.write("image\ttask\treference\tlocal_source\n")
        handle.writelines("\t".join(row) + "\n" for row in rows)
    problems.count("label files", result.written)
    problems.count("boxes", result.boxes)
    problems.count("empty label files", result.negatives)
    problems.count("tasks without annotation" if take == "annotations" else "tasks without prediction",
                   result.unlabelled)
    problems.count("images not found locally", result.images_missing)
    return result


def _image_ref(task: dict, data_key: Optional[str]) -> Optional[str]:
    data = task["data"]
    if data_key:
        value = data.get(data_key)
        return value if isinstance(value, str) and value else None
    for key in ("image", "img", "url"):
        if isinstance(data.get(key), str) and data[key]:
            return data[key]
    strings = [v for v in data.values() if isinstance(v, str) and v]
    return strings[0] if len(strings) == 1 else None


def _place_image(source: Path, dest: Path, mode: str) -> None:
    if mode == "none":
        return
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    if mode == "symlink":
        dest.symlink_to(source.resolve())
    else:
        shutil.copy2(source, dest)

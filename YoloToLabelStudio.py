#!/usr/bin/env python3
"""YOLO datasets and detections into Label Studio import JSON, and Label Studio exports back to YOLO.

    # a YOLO dataset -> tasks JSON (boxes as predictions; --as-annotations for annotations)
    python YoloToLabelStudio.py dataset DATASET_OR_DATA_YAML --out tasks.json --document-root /srv/ls-files \
        --label-config config.xml            # or: --from-name label --to-name image --labels fire,smoke

    # run a YOLOv7 checkpoint over a folder -> tasks JSON with its predictions and task scores
    python YoloToLabelStudio.py detect --weights best.pt --source images/ --out tasks.json \
        --url-prefix http://files.local/images/

    # a Label Studio JSON export (file, or the API) -> YOLO dataset (images/, labels/, data.yaml)
    python YoloToLabelStudio.py export export.json --out dataset/ --label-config config.xml --image-dir images/
    python YoloToLabelStudio.py export --label-studio-url http://localhost:8080 --api-key KEY --project 3 \
        --out dataset/ --media-root ~/.local/share/label-studio/media

Images in tasks: --document-root DIR gives /data/local-files/?d=<path under DIR> (start Label Studio with
LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=DIR, and add a Local Files
storage to the project whose path holds the images, without syncing it: Label Studio serves only files below one);
--url-prefix URL
gives URL + <path under --document-root or the dataset root>; --upload uploads the files into --project through
the API and attaches the boxes to the tasks Label Studio creates (needs --label-studio-url and --api-key, or
LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY).

Problems in the input (malformed label lines, unknown labels, unreadable images) are reported on stderr with
file and line and skipped; --strict stops at the first. A summary line ends every run. Errors: one line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from yolo_backend.convert import (LABELS_MODEL_VERSION, ConversionError, DetectOptions, ImageRefs, ImageSources,
                                  ProblemLog, dataset_to_tasks, detections_to_tasks, export_to_yolo, fetch_export,
                                  find_dataset, iter_image_files, label_config_xml, labels_for_classes,
                                  load_checkpoint_detector, load_export_file, split_labels, target_from_config,
                                  target_from_flags, upload_tasks)

PROG = "YoloToLabelStudio.py"


class CliError(Exception):
    """A usage error: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; one clear line is enough
        raise CliError(f"{message} (see {self.prog} --help)")


# --- arguments --------------------------------------------------------------------------------------------------------

def add_label_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("labels")
    g.add_argument("--label-config", metavar="XML", help="Label Studio labeling config file: from_name, to_name, "
                   f"image field and label names (in order) come from its RectangleLabels control{what}")
    g.add_argument("--from-name", help="RectangleLabels control name (default 'label'; with --label-config: "
                   "picks one of several)")
    g.add_argument("--to-name", help="Image object name (default 'image')")
    g.add_argument("--data-key", help="task data field holding the image (default 'image', i.e. $image)")
    g.add_argument("--labels", help="class names by class id, comma separated, e.g. fire,smoke")


def add_ref_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image references")
    g.add_argument("--document-root", metavar="DIR", help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT: images "
                   "become /data/local-files/?d=<path under DIR>")
    g.add_argument("--url-prefix", metavar="URL", help="images become URL + <path under --document-root, "
                   "else under the dataset/source folder>")
    g.add_argument("--upload", action="store_true", help="upload the images into --project through the API and "
                   "attach the boxes to the created tasks")


def add_api_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Label Studio API")
    g.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL"),
                   help="e.g. http://localhost:8080 (default: $LABEL_STUDIO_URL)")
    g.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                   help="personal access token or legacy token (default: $LABEL_STUDIO_API_KEY)")
    g.add_argument("--project", type=int, help="project id")


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="JSON", help="tasks JSON to write ('-' for stdout); required unless --upload")
    p.add_argument("--as-annotations", action="store_true", help="boxes as annotations instead of predictions")
    p.add_argument("--write-config", metavar="XML", help="also write the matching labeling config here")
    p.add_argument("--strict", action="store_true", help="stop at the first problem instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{dataset,detect,export}", parser_class=OneLineParser)

    p = sub.add_parser("dataset", help="YOLO dataset -> Label Studio tasks JSON")
    p.add_argument("source", help="dataset folder (images/ + labels/, Roboflow splits, or images with .txt "
                   "beside) or a data.yaml")
    p.add_argument("--split", help="only this split (train, val/valid, test, or a folder name the dataset uses); "
                   "default: every split")
    add_output_args(p)
    add_ref_args(p)
    add_label_args(p, "; class i is the i-th label unless the dataset names its classes")
    add_api_args(p)
    p.add_argument("--model-version", default=LABELS_MODEL_VERSION,
                   help=f"model_version of the predictions (default {LABELS_MODEL_VERSION})")
    p.add_argument("--score", type=float, default=1.0, help="score of each prediction and region (default 1.0)")

    p = sub.add_parser("detect", help="run a YOLOv7 checkpoint over images -> tasks JSON with predictions")
    p.add_argument("--weights", required=True, help="YOLOv7 checkpoint (official .pt or one of ours)")
    p.add_argument("--source", required=True, help="image file or folder (any depth)")
    add_output_args(p)
    add_ref_args(p)
    add_label_args(p, "; checkpoint classes map to labels by name (see --label-map)")
    add_api_args(p)
    g = p.add_argument_group("detection (defaults: the backend's settings / environment)")
    g.add_argument("--label-map", help="class=Label pairs, e.g. fire=Fire,smoke=Smoke (as LABEL_MAP)")
    g.add_argument("--conf", type=float, help="boxes at or above this score are written (MODEL_SCORE_THRESHOLD)")
    g.add_argument("--score-floor", type=float, help="detections above this feed the task score (SCORE_FLOOR)")
    g.add_argument("--iou", type=float, help="NMS IoU threshold (IOU_THRESHOLD)")
    g.add_argument("--img-size", type=int, help="inference size (IMG_SIZE)")
    g.add_argument("--batch-size", type=int, help="images per forward pass (PREDICT_BATCH_SIZE)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N (DEVICE)")
    g.add_argument("--task-score", help="task score strategy (TASK_SCORE)")

    p = sub.add_parser("export", help="Label Studio JSON export (file or API) -> YOLO dataset folder")
    p.add_argument("export", nargs="?", help="Label Studio export file ('JSON' format); omit to read the "
                   "project through the API")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder to write")
    add_label_args(p, "; sets the class order (else --labels, else sorted label names)")
    add_api_args(p)
    g = p.add_argument_group("images")
    g.add_argument("--images", choices=("copy", "symlink", "none"), default="copy",
                   help="put found images into DIR/images by copy (default) or symlink, or not at all")
    g.add_argument("--document-root", metavar="DIR", help="resolves /data/local-files/?d=... (and --url-prefix "
                   "URLs) to files")
    g.add_argument("--url-prefix", metavar="URL", help="image URLs under this prefix live under --document-root")
    g.add_argument("--media-root", metavar="DIR", help="Label Studio's media folder: resolves /data/upload/...")
    g.add_argument("--image-dir", metavar="DIR", action="append", default=[],
                   help="folder searched for images by file name (repeatable)")
    p.add_argument("--take", choices=("annotations", "predictions"), default="annotations",
                   help="latest non-cancelled annotation (default) or latest prediction per task")
    p.add_argument("--strict", action="store_true", help="stop at the first problem instead of skipping it")
    return parser


# --- helpers ----------------------------------------------------------------------------------------------------------

def read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc.strerror or exc}") from None


def resolve_target(args, class_names: Optional[list[str]]):
    """(RectangleTarget, class labels by id or None) from --label-config or the flags."""
    flag_labels = split_labels(args.labels)
    if args.label_config:
        target = target_from_config(read_text(args.label_config, "--label-config"), args.from_name,
                                    where=args.label_config)
        names = flag_labels or class_names
        labels = labels_for_classes(names, target.labels) if names else list(target.labels)
        return target, labels
    names = flag_labels or class_names
    target = target_from_flags(args.from_name, args.to_name, names or [], args.data_key or "image")
    return target, names


def need_api(args, what: str) -> tuple[str, str, int]:
    missing = [flag for flag, value in (("--label-studio-url", args.label_studio_url), ("--api-key", args.api_key),
                                        ("--project", args.project)) if not value]
    if missing:
        raise CliError(f"{what} needs {', '.join(missing)} (or LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY)")
    return args.label_studio_url, args.api_key, args.project


def write_json(tasks: list, out: str) -> None:
    text = json.dumps(tasks, indent=2, ensure_ascii=False) + "\n"
    if out == "-":
        sys.stdout.write(text)
        return
    path = Path(out)
    if path.parent and not path.parent.is_dir():
        raise CliError(f"--out {out}: folder {path.parent} does not exist")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def finish_tasks(args, made, target, problems: ProblemLog, source_desc: str) -> None:
    tasks = made.tasks
    if args.upload:
        url, key, project = need_api(args, "--upload")
        tasks = upload_tasks(url, key, project, made.images, made.tasks, target.data_key,
                             progress=not args.no_progress)
    if args.out:
        write_json(tasks, args.out)
    if args.write_config:
        Path(args.write_config).write_text(label_config_xml(target, target.labels or made.labels), encoding="utf-8")
    c = problems.counts
    where = f"project {args.project}" if args.upload else args.out
    done = (f"{len(tasks)} task(s) from {source_desc} -> {where} ({c['boxes']} box(es) as "
            f"{'annotations' if args.as_annotations else 'predictions'}")
    if "empty label files" in c or "images without a label file" in c:
        done += (f", {c['empty label files']} empty label file(s), {c['images without a label file']} image(s) "
                 "without a label file")
    if c["polygons read as their bounding box"]:
        done += f", {c['polygons read as their bounding box']} polygon(s) read as their bounding box"
    print(f"{PROG}: {problems.summary(done + ')')}", file=sys.stderr)


def check_output_args(args) -> None:
    """Fail on missing output options before any work is done."""
    if not args.out and not args.upload:
        raise CliError("--out is required (or --upload to send the tasks to Label Studio)")
    if args.upload:
        need_api(args, "--upload")


def check_refs(refs: ImageRefs, images) -> None:
    for image in images:
        refs.ref(image)  # an image outside the document root fails now, not after the work


# --- commands ---------------------------------------------------------------------------------------------------------

def only_split(layout, split: str):
    """The layout with the entries of ``split`` only ("val" and "valid" name the same split); CliError naming the
    splits there are when it has none."""
    wanted = {"val", "valid"} if split in ("val", "valid") else {split}
    entries = [e for e in layout.entries if e.split in wanted]
    if not entries:
        found = ", ".join(sorted({e.split or "(none)" for e in layout.entries})) or "none"
        raise CliError(f"{layout.source}: no images in split {split!r} (splits there: {found})")
    return dataclasses.replace(layout, entries=entries)


def cmd_dataset(args) -> int:
    check_output_args(args)
    layout = find_dataset(Path(args.source))
    if args.split:
        layout = only_split(layout, args.split)
    refs = ImageRefs.choose(args.document_root, args.url_prefix, args.upload, layout.root)
    check_refs(refs, (entry.image for entry in layout.entries))
    target, labels = resolve_target(args, layout.names)
    if not labels:
        raise CliError(f"{args.source}: the dataset does not name its classes (no data.yaml names or classes.txt); "
                       "give --labels fire,smoke or --label-config")
    problems = ProblemLog(strict=args.strict)
    made = dataset_to_tasks(layout, target, labels, refs, problems, as_annotations=args.as_annotations,
                            model_version=args.model_version, score=args.score, progress=not args.no_progress)
    finish_tasks(args, made, target, problems, layout.source)
    return 0


def cmd_detect(args) -> int:
    from yolo_backend.labelstudio.config import LabelConfigError, parse_label_map
    from yolo_backend.settings import Settings

    check_output_args(args)
    options = DetectOptions.from_settings(Settings.from_env())
    for name, value in (("threshold", args.conf), ("score_floor", args.score_floor), ("iou", args.iou),
                        ("img_size", args.img_size), ("batch_size", args.batch_size), ("device", args.device),
                        ("task_score", args.task_score)):
        if value is not None:
            setattr(options, name, value)
    try:
        label_map = parse_label_map(args.label_map)
    except LabelConfigError as exc:
        raise CliError(f"--label-map: {exc}") from None
    images = iter_image_files(Path(args.source))
    source_root = Path(args.source) if Path(args.source).is_dir() else Path(args.source).parent
    refs = ImageRefs.choose(args.document_root, args.url_prefix, args.upload, source_root)
    check_refs(refs, images)
    target, _ = resolve_target(args, None)
    detector, names, version = load_checkpoint_detector(Path(args.weights), options)
    problems = ProblemLog(strict=args.strict)
    made = detections_to_tasks(detector, names, version, images, target, refs, problems, options,
                               label_map=label_map, as_annotations=args.as_annotations,
                               progress=not args.no_progress)
    finish_tasks(args, made, target, problems, f"{args.weights} on {args.source}")
    return 0


def cmd_export(args) -> int:
    label_config = read_text(args.label_config, "--label-config") if args.label_config else None
    if args.export:
        tasks = load_export_file(Path(args.export))
        source_desc = args.export
    else:
        url, key, project = need_api(args, "export without an export file")
        tasks, project_config = fetch_export(url, key, project, with_predictions=args.take == "predictions")
        label_config = label_config or project_config or None
        source_desc = f"project {project} at {url}"
    names = split_labels(args.labels) or None
    from_name, data_key = args.from_name, args.data_key
    if label_config:
        target = target_from_config(label_config, args.from_name, where=args.label_config or "the project's config")
        names = list(target.labels)  # the config's order is the stable class order
        from_name, data_key = target.from_name, data_key or target.data_key
    problems = ProblemLog(strict=args.strict)
    sources = ImageSources(document_root=Path(args.document_root) if args.document_root else None,
                           media_root=Path(args.media_root).expanduser() if args.media_root else None,
                           image_dirs=[Path(d) for d in args.image_dir], url_prefix=args.url_prefix or "")
    result = export_to_yolo(tasks, Path(args.out), problems, names=names, from_name=from_name, data_key=data_key,
                            sources=sources, images=args.images, take=args.take)
    done = (f"{result.written} label file(s) from {source_desc} -> {result.out_dir} ({result.boxes} box(es), "
            f"{result.negatives} empty, {result.unlabelled} task(s) without {args.take[:-1]} left out; images: "
            f"{result.images_found} found, {result.images_missing} not found locally (see sources.tsv); "
            f"classes: {', '.join(result.names)})")
    print(f"{PROG}: {problems.summary(done)}", file=sys.stderr)
    return 0


COMMANDS = {"dataset": cmd_dataset, "detect": cmd_detect, "export": cmd_export}


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if not args.command:
            raise CliError("choose a command: dataset, detect or export (see --help)")
        return COMMANDS[args.command](args)
    except (CliError, ConversionError, ValueError) as exc:  # ValueError: settings, label config, checkpoint
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or ''}: {exc.strerror or exc}".replace(": : ", ": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

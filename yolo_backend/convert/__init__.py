"""Conversion between YOLO datasets / detections and Label Studio import and export JSON.

The command line is ``YoloToLabelStudio.py`` (repository root). Nothing here imports torch at module level:
running a checkpoint (``load_checkpoint_detector``) imports the detector when called.

    find_dataset(path) -> DatasetLayout                        YOLO folder / data.yaml -> images, label files, names
    dataset_to_tasks(layout, target, class_labels, refs, problems, as_annotations=False, ...) -> DatasetTasks
    load_checkpoint_detector(weights, DetectOptions) -> (detector, names, model_version)
    detections_to_tasks(detector, names, model_version, images, target, refs, problems, options) -> DatasetTasks
    load_export_file(path) / fetch_export(url, api_key, project) -> tasks (and the project's label config)
    export_to_yolo(tasks, out_dir, problems, names=None, ...) -> ExportResult
    upload_tasks(url, api_key, project, images, tasks) -> created tasks
"""

from .from_export import (ExportResult, export_to_yolo, fetch_export, latest_annotation, latest_prediction,
                          load_export_file)
from .problems import ConversionError, Problem, ProblemLog
from .targets import (ImageRefs, ImageSources, image_name_from_ref, label_config_xml, labels_for_classes,
                      split_labels, target_from_config, target_from_flags)
from .to_tasks import (LABELS_MODEL_VERSION, DatasetTasks, DetectOptions, boxes_to_detections, dataset_to_tasks,
                       detections_to_tasks, iter_image_files, load_checkpoint_detector)
from .upload import upload_tasks
from .yolo_files import (DatasetLayout, ImageEntry, YoloBox, find_dataset, image_size, read_label_file,
                         write_data_yaml, write_label_file)

__all__ = [
    "ConversionError", "DatasetLayout", "DatasetTasks", "DetectOptions", "ExportResult", "ImageEntry", "ImageRefs",
    "ImageSources", "LABELS_MODEL_VERSION", "Problem", "ProblemLog", "YoloBox", "boxes_to_detections",
    "dataset_to_tasks", "detections_to_tasks", "export_to_yolo", "fetch_export", "find_dataset",
    "image_name_from_ref", "image_size", "iter_image_files", "label_config_xml", "labels_for_classes",
    "latest_annotation", "latest_prediction", "load_checkpoint_detector", "load_export_file", "read_label_file",
    "split_labels", "target_from_config", "target_from_flags", "upload_tasks", "write_data_yaml",
    "write_label_file",
]

"""Test data made here, for a checkout without ``../shared``: images with drawn fire and smoke, YOLO labels, and
checkpoints in the reference YOLOv7 file format, laid out like ``../shared`` (see ``build_shared``).

What stands in for what:

* ``data/fire-smoke``: 608x608 JPEGs on noisy, graded backgrounds; fire is an orange ellipse with a yellow core,
  smoke a soft grey ellipse; 47 valid images with 48 boxes (one negative) like the real split, and 120 train
  images of which 20 are negatives (empty label files).
* ``data/hot-fire/images/val``: 120 320x320 images in another style (the active-learning pool of the e2e test).
* ``data/yolov7-checkpoints``: the same file names as the real folder, pickled the way the reference code pickles
  (``models.yolo.Model`` etc., fp16, ``model`` / ``ema``; ``save_reference_checkpoint``): random weights with
  BatchNorm statistics measured on generated images, except ``yolov7-tiny_fire-smoke_ref-trained.pt``, a detector
  that finds the drawn objects (``train_detector``: a random yolov7-tiny backbone whose head is fitted to them,
  half a minute on 2 cores), and ``truncated_yolov7-tiny.pt``, a file cut short. ``ref_input_1x3x320x416.npy`` is a
  generated input. The reference implementation's own outputs (``*.ref_out.npy``, the detections JSON, the real
  release's pickle) cannot be generated: tests that compare with them need the real ``../shared``, and so does
  the one that checks a bound against numbers measured on the real trained checkpoint.

Everything is deterministic (seeded). ``cached_shared`` builds the folder once per content of this file and keeps
it under the tests' cache folder (``YOLO_BACKEND_TEST_CACHE``, default ``~/.cache/yolo-backend-tests``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import time
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

NAMES = ["fire", "smoke"]
FIRE, SMOKE = 0, 1
CHECKPOINTS = "data/yolov7-checkpoints"
DETECTOR = "yolov7-tiny_fire-smoke_ref-trained.pt"
UNUSED_FOR_S = 7 * 24 * 3600   # a cached build not used for this long is removed


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Scene:
    image: np.ndarray               # H x W x 3 RGB uint8
    boxes: list[list[int]]          # x1, y1, x2, y2 in pixels
    classes: list[int]              # FIRE or SMOKE

    def yolo_lines(self) -> str:
        height, width = self.image.shape[:2]
        return "".join(f"{c} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} {(x2 - x1) / width:.6f} "
                       f"{(y2 - y1) / height:.6f}\n" for (x1, y1, x2, y2), c in zip(self.boxes, self.classes))


def _background(rng: np.random.Generator, width: int, height: int, style: str) -> np.ndarray:
    """A graded, noisy background: dull ground and walls ("ground") or a dark sky over trees ("tower")."""
    if style == "tower":
        top, bottom = rng.integers(10, 60, 3), rng.integers(20, 90, 3) * np.array([0.6, 1.0, 0.6])
    else:
        top, bottom = rng.integers(40, 120, 3), rng.integers(30, 110, 3)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (height, width, 3)).astype(np.float32)
    return image + rng.normal(0.0, 9.0, (height, width, 3)).astype(np.float32)


def _place(rng: np.random.Generator, width: int, height: int, sizes: tuple[int, int],
           taken: list[list[int]]) -> list[int] | None:
    """A box of a side in ``sizes`` inside the image, overlapping no box in ``taken``."""
    for _ in range(20):
        w, h = (int(min(v, limit - 2)) for v, limit in zip(rng.integers(sizes[0], sizes[1] + 1, 2), (width, height)))
        x1, y1 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        box = [x1, y1, x1 + w, y1 + h]
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return box
    return None


def _draw(rng: np.random.Generator, image: np.ndarray, box: list[int], cls: int) -> None:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    mask = np.zeros((h, w), np.float32)
    cv2.ellipse(mask, (w // 2, h // 2), (max(1, w // 2 - 1), max(1, h // 2 - 1)), 0, 0, 360, 1.0, -1)
    region = image[y1:y2, x1:x2]
    if cls == FIRE:
        colour = np.array([255, rng.uniform(80, 150), rng.uniform(0, 40)], np.float32)
        core = np.zeros((h, w), np.float32)
        cv2.ellipse(core, (w // 2, int(h * 0.6)), (max(1, w // 5), max(1, h // 4)), 0, 0, 360, 1.0, -1)
        region[:] = region * (1 - mask[..., None]) + colour * mask[..., None]
        region[:] = region * (1 - core[..., None]) + np.array([255, 235, 140], np.float32) * core[..., None]
    else:
        soft = cv2.GaussianBlur(mask, (0, 0), max(1.0, min(w, h) / 10))[..., None] * 0.9
        region[:] = region * (1 - soft) + rng.uniform(170, 225) * soft


def draw_scene(rng: np.random.Generator, width: int, height: int, count: int, sizes: tuple[int, int] = (30, 110),
               style: str = "ground", classes: Sequence[int] | None = None) -> Scene:
    """A ``width`` x ``height`` image with ``count`` objects (fewer when they do not fit) of sides in ``sizes``."""
    image = _background(rng, width, height, style)
    boxes, labels = [], []
    for i in range(count):
        box = _place(rng, width, height, sizes, boxes)
        if box is None:
            continue
        cls = int(classes[i]) if classes is not None else int(rng.integers(0, 2))
        _draw(rng, image, box, cls)
        boxes.append(box)
        labels.append(cls)
    return Scene(np.clip(image, 0, 255).astype(np.uint8), boxes, labels)


def write_split(root: Path, split: str, scenes: Sequence[Scene], prefix: str) -> list[Path]:
    """``root/images/<split>/<prefix>-NNNN.jpg`` and ``root/labels/<split>/<same>.txt`` (empty: a negative)."""
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes):
        stem = f"{prefix}-{i:04d}"
        cv2.imwrite(str(images / f"{stem}.jpg"), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        (labels / f"{stem}.txt").write_text(scene.yolo_lines())
        paths.append(images / f"{stem}.jpg")
    return paths


def write_fire_smoke(root: Path, seed: int = 0) -> None:
    """``root/images/{train,valid}`` and ``root/labels/...``: 608x608 like the real set; valid has 47 images with
    48 boxes (44 with one, 2 with two, 1 negative), train 100 images with 1-3 objects and 20 negatives."""
    rng = np.random.default_rng(seed)
    counts = [1] * 44 + [2] * 2 + [0]
    rng.shuffle(counts)
    write_split(root, "valid", [draw_scene(rng, 608, 608, n) for n in counts], "synthetic-valid")
    counts = [int(n) for n in rng.integers(1, 4, 100)] + [0] * 20
    rng.shuffle(counts)
    write_split(root, "train", [draw_scene(rng, 608, 608, n) for n in counts], "synthetic-train")


def write_hot_fire(root: Path, seed: int = 1, count: int = 120) -> None:
    """``root/images/val`` and ``root/labels/val``: 320x320 "tower camera" scenes, 0-3 objects, and a data.yaml."""
    rng = np.random.default_rng(seed)
    scenes = [draw_scene(rng, 320, 320, int(rng.integers(0, 4)), sizes=(16, 60), style="tower")
              for _ in range(count)]
    write_split(root, "val", scenes, "synthetic-pool")
    (root / "data.yaml").write_text("train: images/val\nval: images/val\nnames: [fire, smoke]\n")


# --------------------------------------------------------------------------------------------------------------
# Checkpoints in the reference file format
# --------------------------------------------------------------------------------------------------------------

_REFERENCE_CLASSES = {"models.yolo": ["Model", "Detect", "IDetect"],
                      "models.common": ["Conv", "MP", "SP", "Concat", "SPPCSPC", "RepConv", "ImplicitA", "ImplicitM"]}


@contextlib.contextmanager
def _reference_modules() -> Iterator[dict[str, type]]:
    """Modules named ``models.yolo`` / ``models.common`` holding empty nn.Module classes named like the reference's,
    in sys.modules only while a checkpoint is pickled (pickle names a class by its module and name)."""
    import torch

    package = types.ModuleType("models")
    modules = {name: types.ModuleType(name) for name in _REFERENCE_CLASSES}
    classes = {}
    for module_name, names in _REFERENCE_CLASSES.items():
        for name in names:
            cls = type(name, (torch.nn.Module,), {"__module__": module_name, "__qualname__": name})
            setattr(modules[module_name], name, cls)
            classes[name] = cls
    package.yolo, package.common = modules["models.yolo"], modules["models.common"]
    keys = ["models", *modules]
    saved = {key: sys.modules.get(key) for key in keys}
    sys.modules.update({"models": package, **modules})
    try:
        yield classes
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def _reference_class_name(module) -> str | None:
    """The reference class our layer stands for (None: a torch.nn module, pickled as itself)."""
    from yolo_backend.yolov7 import layers

    if isinstance(module, layers.DetectHead):
        return "IDetect" if module.implicit else "Detect"
    return {layers.ConvBnAct: "Conv", layers.MaxPoolDown: "MP", layers.MaxPoolSame: "SP", layers.Concat: "Concat",
            layers.SPPCSPC: "SPPCSPC", layers.RepConv: "RepConv", layers.ImplicitA: "ImplicitA",
            layers.ImplicitM: "ImplicitM"}.get(type(module))


def _as_reference(module, classes: dict[str, type]):
    """A copy of ``module`` (and its children) as the reference pickles it: its classes, fp16 tensors, only the
    persistent buffers (``stride`` is a plain attribute of the head there)."""
    import copy

    import torch

    def half(tensor):
        return tensor.detach().clone().half() if tensor.is_floating_point() else tensor.detach().clone()

    name = _reference_class_name(module)
    if name is None:
        twin = copy.copy(module)  # torch.nn: same class and settings; tensors and children replaced below
    else:
        twin = classes[name].__new__(classes[name])
        torch.nn.Module.__init__(twin)
    twin.training = False
    twin._parameters = OrderedDict((k, None if v is None else torch.nn.Parameter(half(v), requires_grad=False))
                                   for k, v in module._parameters.items())
    persistent = {k: v for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set}
    twin._buffers = OrderedDict((k, None if v is None else half(v)) for k, v in persistent.items())
    twin._non_persistent_buffers_set = set()
    twin._modules = OrderedDict((k, None if c is None else _as_reference(c, classes))
                                for k, c in module._modules.items())
    if name in ("Detect", "IDetect"):
        twin.nc, twin.no, twin.nl, twin.na = module.nc, module.no, module.nl, module.na
        twin.stride = module.stride.detach().clone()
        twin.grid = [torch.zeros(1)] * module.nl
    return twin


def save_reference_checkpoint(path: Path, model, ema=None, epoch: int = -1, updates: int | None = None,
                              yaml_file: str = "cfg/training/yolov7-tiny.yaml") -> Path:
    """Write ``model`` (our unfused YOLOv7) the way the reference's train.py / strip_optimizer save a checkpoint: a
    dict whose ``model`` (and ``ema``, when given) is a pickled ``models.yolo.Model`` in fp16."""
    import torch

    from yolo_backend.yolov7 import graphs

    def reference_model(source, classes):
        twin = classes["Model"].__new__(classes["Model"])
        torch.nn.Module.__init__(twin)
        twin.training = False
        layers = torch.nn.Sequential()
        for i, (layer, spec) in enumerate(zip(source.model, source.graph["layers"])):
            converted = _as_reference(layer, classes)
            converted.i, converted.f = i, spec[0]
            converted.type = f"{type(converted).__module__}.{type(converted).__name__}"
            converted.np = sum(p.numel() for p in layer.parameters())
            layers.add_module(str(i), converted)
        layers.training = False
        twin.model = layers
        twin.names, twin.yaml_file = list(source.names), yaml_file
        twin.yaml = {"nc": source.nc, "depth_multiple": 1.0, "width_multiple": 1.0}
        twin.stride = torch.tensor(graphs.head_strides(source.graph), dtype=torch.float32)
        twin.save, twin.traced = [], False
        return twin

    with _reference_modules() as classes:
        payload = {"epoch": epoch, "best_fitness": np.array([0.0]), "training_results": None,
                   "model": reference_model(model, classes),
                   "ema": reference_model(ema, classes) if ema is not None else None,
                   "updates": updates, "optimizer": None, "wandb_id": None}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread and the process's RNG left as it was (2 threads on 2 busy cores are slower, not faster)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(previous)


def _images_tensor(scenes: Sequence[Scene]):
    import torch

    return torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float().div(255.0)


def calibrate_batch_norm(model, images) -> None:
    """Set every BatchNorm's running statistics to what ``images`` (B, 3, H, W in [0, 1]) give, so the features of
    a random network stay in range layer after layer (its default statistics, 0 and 1, let them drift)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None   # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), 16):
            model(images[start:start + 16])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.03
    model.eval()


def damp_batch_norm(model, seed: int, low: float = 0.6, high: float = 0.8) -> None:
    """Scale every BatchNorm's output by a random factor in [low, high] per channel. A random network normalised to
    unit variance at every layer is chaotic: a rounding error grows layer by layer (fp16 moves its boxes by tens of
    pixels); damped, it behaves like a trained one (fp16 within half a pixel), and its features stay in range."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                factor = torch.empty(module.weight.shape).uniform_(low, high, generator=generator)
                module.weight.mul_(factor)
                module.bias.mul_(factor)


def random_model(graph_name: str, nc: int, names: Sequence[str] | None = None, head: str = "IDetect",
                 seed: int = 0, calibration: int = 8):
    """A random training-form model whose BatchNorm statistics come from ``calibration`` generated images, its
    BatchNorm outputs damped (``damp_batch_norm``)."""
    import torch

    from yolo_backend.yolov7 import graphs
    from yolo_backend.yolov7.model import build_model

    with _one_thread():
        torch.manual_seed(seed)
        model = build_model(graphs.get_graph(graph_name, head=head), nc, names=names)
        rng = np.random.default_rng(seed)
        calibrate_batch_norm(model, _images_tensor([draw_scene(rng, 160, 128, 2, sizes=(20, 60))
                                                    for _ in range(calibration)]))
        damp_batch_norm(model, seed)
    return model.eval()


def train_detector(seed: int = 0, img_size: int = 160, images: int = 192, steps: int = 400):
    """A full yolov7-tiny (fire, smoke) that finds the drawn objects, in under a minute on 2 cores: a random backbone
    whose head alone is fitted with our YOLO loss to features computed once (training the whole network as far takes
    an hour on a CPU). The backbone's convs get He initialisation and its BatchNorms stay the identity, so a signal
    neither dies nor explodes through it and its features tell where the objects are (BatchNorm statistics measured
    on images would make a random network chaotic: fine for the features, but fp16 rounding then moves boxes by tens
    of pixels). Not an accurate detector: it finds objects of 14-96 px at the input size, with false positives."""
    import torch

    from yolo_backend.yolov7 import graphs
    from yolo_backend.yolov7.loss import LossGains, YoloLoss
    from yolo_backend.yolov7.model import build_model

    with _one_thread():
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        scenes = [draw_scene(rng, img_size, img_size, int(rng.integers(0, 4)), sizes=(14, 96)) for _ in range(images)]
        model = build_model(graphs.get_graph("yolov7-tiny"), len(NAMES), names=NAMES).eval()
        head = model.head
        for module in model.model[:-1].modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, a=0.1, nonlinearity="leaky_relu")
        x = _images_tensor(scenes)
        with torch.no_grad():
            parts = [model.head_inputs(x[start:start + 32]) for start in range(0, len(x), 32)]
        features = [torch.cat([p[level] for p in parts]) for level in range(len(parts[0]))]
        targets = [torch.tensor([[0, c, (x1 + x2) / 2 / img_size, (y1 + y2) / 2 / img_size, (x2 - x1) / img_size,
                                  (y2 - y1) / img_size] for (x1, y1, x2, y2), c in zip(s.boxes, s.classes)],
                                dtype=torch.float32).reshape(-1, 6) for s in scenes]
        head.train()
        loss_fn = YoloLoss.for_model(model, LossGains(), img_size)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.3, momentum=0.9, nesterov=True, weight_decay=5e-4)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            batch = torch.randint(0, len(scenes), (32,), generator=generator).tolist()
            rows = [torch.cat([torch.full((len(targets[j]), 1), float(k)), targets[j][:, 1:]], 1)
                    for k, j in enumerate(batch)]
            loss, _ = loss_fn(head([f[batch] for f in features]), torch.cat(rows))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def reference_input(seed: int = 3) -> np.ndarray:
    """(1, 3, 320, 416) float32 RGB in [0, 1], NCHW: a drawn scene, the shape of the real reference input."""
    scene = draw_scene(np.random.default_rng(seed), 416, 320, 3, sizes=(30, 90))
    return np.ascontiguousarray(scene.image.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)


def write_checkpoints(folder: Path) -> None:
    """The checkpoint folder of ``../shared`` (same names), generated; see the module docstring."""
    folder.mkdir(parents=True, exist_ok=True)
    train = random_model("yolov7-tiny", 2, NAMES, seed=1)
    save_reference_checkpoint(folder / "yolov7-tiny_fire-smoke_train.pt", train)
    ema = random_model("yolov7-tiny", 2, NAMES, seed=2)
    save_reference_checkpoint(folder / "yolov7-tiny_fire-smoke_last.pt", train, ema=ema, epoch=3, updates=120)
    coco = random_model("yolov7-tiny", 80, [f"class{i}" for i in range(80)], head="Detect", seed=3)
    save_reference_checkpoint(folder / "yolov7-tiny_coco_deploy.pt", coco, yaml_file="cfg/deploy/yolov7-tiny.yaml")
    big = random_model("yolov7", 2, NAMES, seed=4, calibration=4)
    save_reference_checkpoint(folder / "yolov7_fire-smoke_train.pt", big, yaml_file="cfg/training/yolov7.yaml")
    del big
    save_reference_checkpoint(folder / DETECTOR, train_detector())
    whole = (folder / "yolov7-tiny_fire-smoke_train.pt").read_bytes()
    (folder / "truncated_yolov7-tiny.pt").write_bytes(whole[: len(whole) * 2 // 5])
    np.save(folder / "ref_input_1x3x320x416.npy", reference_input())


# --------------------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------------------

def build_shared(root: Path) -> Path:
    """Write the stand-in for ``../shared`` into ``root`` (``root/data/...``, the real folder's layout)."""
    write_fire_smoke(root / "data" / "fire-smoke")
    write_hot_fire(root / "data" / "hot-fire")
    write_checkpoints(root / CHECKPOINTS)
    (root / "README.md").write_text("Generated by tests/synthetic.py: a stand-in for ../shared (see its docstring).\n")
    return root


def cache_dir() -> Path:
    """The tests' cache folder (the e2e harness keeps Label Studio there too)."""
    return Path(os.environ.get("YOLO_BACKEND_TEST_CACHE") or Path.home() / ".cache" / "yolo-backend-tests")


def cached_shared(cache: Path | None = None) -> Path:
    """The generated stand-in for ``../shared``, built once per content of this file (and torch version) and kept
    in ``cache``; builds not used for a week are removed (another checkout may use another one meanwhile). A file
    lock keeps parallel test sessions from building it twice."""
    import torch

    cache = cache or cache_dir()
    source = Path(__file__).read_bytes() + torch.__version__.split("+")[0].encode()
    root = cache / f"synthetic-shared-{hashlib.sha256(source).hexdigest()[:12]}"
    marker = root / ".complete"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "synthetic-shared.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file():
            os.utime(root)   # in use: kept
            return root
        print(f"\n[synthetic] generating the stand-in for ../shared in {root} (once; under a minute)", file=sys.stderr)
        for old in cache.glob("synthetic-shared-*"):
            if old.is_dir() and time.time() - old.stat().st_mtime > UNUSED_FOR_S:
                shutil.rmtree(old, ignore_errors=True)
        building = cache / f".building-{root.name}"
        shutil.rmtree(building, ignore_errors=True)
        build_shared(building)
        building.rename(root)
        marker.write_text("complete\n")
    return root

"""The training loop: setup pieces, determinism, starting points, output, and proof that it learns."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from yolo_backend.yolov7 import graphs
from yolo_backend.yolov7.checkpoint import load_checkpoint, load_model
from yolo_backend.yolov7.dataset import Sample
from yolo_backend.yolov7.ema import ModelEMA
from yolo_backend.yolov7.layers import ImplicitA, ImplicitM
from yolo_backend.yolov7.model import build_model
from yolo_backend.yolov7.train import (TrainConfig, build_optimizer, evaluate, fine_tune, lr_factor, prepare_model,
                                       scale_graph_width, warmup_iterations)

torch.set_num_threads(2)
NAMES = ["rect", "ellipse"]


def shapes(n: int, size: int, seed: int) -> list[Sample]:
    """Grey images with 1-2 filled red rectangles (class 0) or blue ellipses (class 1) at known boxes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = np.full((size, size, 3), rng.integers(80, 170), np.uint8)
        boxes, classes = [], []
        for _ in range(rng.integers(1, 3)):
            w, h = rng.integers(size // 4, size // 2, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            c = int(rng.integers(0, 2))
            if c == 0:
                cv2.rectangle(image, (int(x), int(y)), (int(x + w - 1), int(y + h - 1)), (230, 40, 40), -1)
            else:
                cv2.ellipse(image, (int(x + w / 2), int(y + h / 2)), (int(w / 2), int(h / 2)), 0, 0, 360,
                            (40, 40, 230), -1)
            boxes.append([x, y, x + w, y + h])
            classes.append(c)
        out.append(Sample(image, boxes, classes))
    return out


def small_config(**overrides) -> TrainConfig:
    """A reduced-width yolov7-tiny at 64 px on generated shapes: seconds per epoch on 2 cores."""
    settings = dict(train_samples=shapes(16, 64, 0), val_samples=shapes(8, 64, 1), names=NAMES, img_size=64,
                    epochs=1, batch_size=8, nominal_batch=8, width=0.25, device="cpu", progress="none",
                    warmup_min_iters=10)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_schedule_warmup_and_ema_ramp():
    assert lr_factor(0, 10, 0.01, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 10, 0.01, "cosine") == pytest.approx(0.01)
    assert lr_factor(5, 10, 0.01, "linear") == pytest.approx(0.505)
    # Small set: the minimum applies, but never more than half the run.
    assert warmup_iterations(TrainConfig(epochs=100, warmup_min_iters=50), 2) == 50
    assert warmup_iterations(TrainConfig(epochs=10, warmup_min_iters=50), 2) == 10
    assert warmup_iterations(TrainConfig(epochs=100), 55) == 165  # 3 epochs x 55
    ema = ModelEMA(torch.nn.Linear(2, 2), decay=0.9999, tau=100)
    ema.updates = 100
    assert ema.decay() == pytest.approx(0.9999 * (1 - math.exp(-1)))


def test_optimizer_groups_exclude_bn_implicit_and_biases_from_decay():
    model = build_model(scale_graph_width(graphs.get_graph("yolov7-tiny"), 0.25), 2)
    optimizer = build_optimizer(model, 0.01, 0.937, 5e-4)
    no_decay, decay, biases = (set(map(id, g["params"])) for g in optimizer.param_groups)
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.937
    assert optimizer.param_groups[0]["weight_decay"] == 0 and optimizer.param_groups[2]["weight_decay"] == 0
    assert optimizer.param_groups[1]["weight_decay"] == 5e-4
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert id(module.weight) in no_decay and id(module.bias) in biases
        elif isinstance(module, (ImplicitA, ImplicitM)):
            assert id(module.implicit) in no_decay
        elif isinstance(module, torch.nn.Conv2d):
            assert id(module.weight) in decay
    assert len(no_decay) + len(decay) + len(biases) == len(list(model.parameters()))


def test_same_seed_same_losses_on_cpu():
    first = fine_tune(small_config(seed=7))
    second = fine_tune(small_config(seed=7))
    other = fine_tune(small_config(seed=8))
    assert first.history[0]["loss"] == second.history[0]["loss"]
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert first.history[0]["loss"] != other.history[0]["loss"]


def test_output_checkpoint_loads_and_carries_metadata(tmp_path):
    events = []
    result = fine_tune(small_config(out=str(tmp_path / "out.pt"), parent_version="v1", epochs=2, export_onnx=True),
                       events.append)
    assert result.path and result.path.is_file()
    assert result.onnx_path == tmp_path / "out.onnx" and result.onnx_path.is_file()
    model = load_model(result.path)
    assert model.names == NAMES and model(torch.rand(1, 3, 64, 64)).shape[-1] == 7
    ckpt = load_checkpoint(result.path)
    assert ckpt.weights == "ema" and ckpt.metadata["parent"] == "v1"
    assert ckpt.metadata["metrics"]["map50"] == pytest.approx(result.metrics["map50"])
    # The kept weights' per-image matches come back too: they give the same summary (the publish rule's bootstrap).
    assert result.val_images is not None and result.val_images.compute() == result.metrics
    assert ckpt.metadata["training"]["img_size"] == 64 and ckpt.metadata["epochs_run"] == 2
    phases = {e["phase"] for e in events}
    assert {"setup", "train", "eval", "epoch", "done"} <= phases
    train_event = next(e for e in events if e["phase"] == "train")
    assert {"epoch", "iteration", "loss", "lr"} <= set(train_event)
    # Fine-tuning our own checkpoint again starts from its weights.
    again = fine_tune(small_config(weights=str(result.path), epochs=1))
    assert again.epochs_run == 1


def test_time_budget_stops_the_run():
    result = fine_tune(small_config(epochs=500, time_budget=8))
    assert result.stopped_by_budget and result.epochs_run < 500 and result.seconds < 30


def test_start_from_official_checkpoints(shared_dir):
    folder = shared_dir / "data" / "yolov7-checkpoints"
    coco = folder / "yolov7-tiny_coco_deploy.pt"
    model, origin = prepare_model(TrainConfig(weights=str(coco)), ["fire", "smoke", "person"])
    source = load_checkpoint(coco).state_dict
    state = model.state_dict()
    assert model.head_type == "IDetect" and model.nc == 3
    assert torch.equal(state["model.0.conv.weight"], source["model.0.conv.weight"])
    assert state["model.77.m.0.weight"].shape[0] == 3 * 8
    assert "model.77.m.0" in origin["reinitialised"]
    for module in model.head.modules():  # identity at the start, so the backbone transfer is intact
        if isinstance(module, ImplicitA):
            assert torch.count_nonzero(module.implicit) == 0
        elif isinstance(module, ImplicitM):
            assert torch.all(module.implicit == 1)
    trained = folder / "yolov7-tiny_fire-smoke_ref-trained.pt"
    same, origin = prepare_model(TrainConfig(weights=str(trained)), ["fire", "smoke"])
    ref = load_checkpoint(trained).state_dict
    assert all(torch.equal(v, ref[k]) for k, v in same.state_dict().items())
    assert origin["start"] == "checkpoint"


def test_a_new_label_keeps_what_the_head_knew_of_the_others(shared_dir):
    trained = shared_dir / "data" / "yolov7-checkpoints" / "yolov7-tiny_fire-smoke_ref-trained.pt"
    model, origin = prepare_model(TrainConfig(weights=str(trained)), ["Smoke", "fire", "person"])
    ref = load_checkpoint(trained).state_dict
    state = model.state_dict()
    assert origin["head_classes_kept"] == ["Smoke", "fire"]
    for level in range(3):
        old_w, new_w = ref[f"model.77.m.{level}.weight"], state[f"model.77.m.{level}.weight"]
        old_m, new_m = ref[f"model.77.im.{level}.implicit"], state[f"model.77.im.{level}.implicit"]
        assert new_w.shape[0] == 3 * 8
        for a in range(3):
            o, n = a * 7, a * 8
            assert torch.equal(new_w[n:n + 5], old_w[o:o + 5])          # box and objectness
            assert torch.equal(new_w[n + 5], old_w[o + 6])               # smoke: old class 1 -> new class 0
            assert torch.equal(new_w[n + 6], old_w[o + 5])               # fire: old class 0 -> new class 1
            assert not torch.equal(new_w[n + 7], old_w[o + 5]) and not torch.equal(new_w[n + 7], old_w[o + 6])
            assert torch.equal(new_m[:, n + 6], old_m[:, o + 5])                # implicit multiplier too
            assert abs(float(new_m[0, n + 7]) - 1) < 0.2                       # the new class: fresh init
        assert torch.equal(state[f"model.77.m.{level}.bias"][:5], ref[f"model.77.m.{level}.bias"][:5])


@pytest.mark.slow
def test_training_learns_to_find_shapes():
    """A reduced-width yolov7-tiny from scratch on generated shapes reaches a mAP it cannot reach untrained."""
    val = shapes(16, 64, 1)
    config = small_config(train_samples=shapes(64, 64, 0), val_samples=val, epochs=40, mosaic=0.0, mixup=0.0,
                          scale=0.2, hsv_h=0, hsv_s=0, hsv_v=0, warmup_epochs=1, eval_interval=10, seed=0)
    torch.manual_seed(0)
    untrained = build_model(scale_graph_width(graphs.get_graph("yolov7-tiny"), 0.25), 2, names=NAMES)
    before = evaluate(untrained, val, NAMES, 64)["map50"]
    result = fine_tune(config)
    assert before < 0.05
    assert result.metrics["map50"] > 0.4, result.history


def test_cli_train_and_val(tmp_path, capsys):
    from yolo_backend.cli import main

    for split, seed in (("train", 0), ("val", 1)):
        (tmp_path / "data" / "images" / split).mkdir(parents=True)
        (tmp_path / "data" / "labels" / split).mkdir(parents=True)
        for i, sample in enumerate(shapes(4, 64, seed)):
            cv2.imwrite(str(tmp_path / "data" / "images" / split / f"{i}.png"), sample.image[:, :, ::-1])
            lines = [f"{c} {(x1 + x2) / 128} {(y1 + y2) / 128} {(x2 - x1) / 64} {(y2 - y1) / 64}"
                     for (x1, y1, x2, y2), c in zip(sample.boxes.tolist(), sample.classes.tolist())]
            (tmp_path / "data" / "labels" / split / f"{i}.txt").write_text("\n".join(lines))
    (tmp_path / "data" / "data.yaml").write_text("names: [rect, ellipse]\ntrain: images/train\nval: images/val\n")
    out = tmp_path / "model.pt"
    code = main(["train", "--data", str(tmp_path / "data"), "--epochs", "1", "--img-size", "64", "--out", str(out),
                 "--batch-size", "4", "--device", "cpu", "--threads", "2"])
    assert code == 0 and out.is_file()
    assert "mAP@.5" in capsys.readouterr().out
    code = main(["val", "--data", str(tmp_path / "data" / "data.yaml"), "--weights", str(out), "--img-size", "64",
                 "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and "rect" in printed and "ellipse" in printed
    # A dataset that does not exist: one clear line, exit 2.
    assert main(["train", "--data", str(tmp_path / "nope"), "--epochs", "1", "--out", str(out)]) == 2
    assert "no such" in capsys.readouterr().err

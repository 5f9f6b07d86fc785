"""Training augmentations on numpy images, written for this project after the reference recipe's facts.

Every function takes an HxWx3 uint8 RGB image, boxes as an (n, 4) float array of xyxy pixels and a numpy
``Generator`` (so a seed fixes the result, whatever the worker layout). Boxes and classes travel together as a
(n, 5) ``labels`` array ``[class, x1, y1, x2, y2]``.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import cv2
import numpy as np

PAD_VALUE = 114


def letterbox_square(image: np.ndarray, labels: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Fit the image into a size x size square (aspect kept, centred, padded with 114); labels follow."""
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = round(w * r), round(h * r)
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[top:top + new_h, left:left + new_w] = image
    labels = labels.copy()
    if len(labels):
        labels[:, [1, 3]] = labels[:, [1, 3]] * (new_w / w) + left
        labels[:, [2, 4]] = labels[:, [2, 4]] * (new_h / h) + top
    return canvas, labels


def augment_hsv(image: np.ndarray, rng: np.random.Generator, hgain: float = 0.015, sgain: float = 0.7,
                vgain: float = 0.4) -> np.ndarray:
    """Random hue/saturation/value gains (each gain is 1 ± a uniform fraction), applied through lookup tables."""
    if not (hgain or sgain or vgain):
        return image
    gains = rng.uniform(-1, 1, 3) * np.array([hgain, sgain, vgain]) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)  # OpenCV's 8-bit hue runs 0..179
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _flip(image: np.ndarray, labels: np.ndarray, axis: int) -> Tuple[np.ndarray, np.ndarray]:
    """Mirror along image ``axis`` (0 = rows: upside down, 1 = columns: left-right); labels
    [class, x1, y1, x2, y2] follow (for axis 1 the x columns 1 and 3, for axis 0 the y columns 2 and 4)."""
    extent = image.shape[axis]
    low, high = (1, 3) if axis == 1 else (2, 4)
    labels = labels.copy()
    if len(labels):
        labels[:, [low, high]] = extent - labels[:, [high, low]]
    return np.ascontiguousarray(np.flip(image, axis)), labels


def flip_horizontal(image: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    return _flip(image, labels, 1)


def flip_vertical(image: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    return _flip(image, labels, 0)


def keep_plausible_boxes(before: np.ndarray, after: np.ndarray, min_side: float = 2.0, max_aspect: float = 20.0,
                         min_area_kept: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Mask of boxes still worth training on after a warp: (n, 4) xyxy before (scaled) and after clipping.

    A box must keep at least ``min_side`` pixels per side, ``min_area_kept`` of its (warped) area and an
    aspect ratio under ``max_aspect``.
    """
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > min_side) & (h2 > min_side) & (w2 * h2 / (w1 * h1 + eps) > min_area_kept) & (aspect < max_aspect)


def random_affine(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, out_size: Tuple[int, int],
                  degrees: float = 0.0, translate: float = 0.1, scale: float = 0.5,
                  shear: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation about the input's centre, output ``out_size`` (h, w).

    The input's centre lands at the output's centre (± ``translate``), so a 2x mosaic canvas is cropped to
    its middle.
    """
    h_in, w_in = image.shape[:2]
    out_h, out_w = out_size
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -w_in / 2, -h_in / 2
    rotate = np.eye(3)
    angle = rng.uniform(-degrees, degrees)
    s = rng.uniform(1 - scale, 1 + scale)
    rotate[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=s)
    shear_m = np.eye(3)
    shear_m[0, 1] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)
    shear_m[1, 0] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_w
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_h
    matrix = move @ shear_m @ rotate @ centre
    if (matrix != np.eye(3)).any() or (out_h, out_w) != (h_in, w_in):
        image = cv2.warpAffine(image, matrix[:2], dsize=(out_w, out_h),
                               borderValue=(PAD_VALUE, PAD_VALUE, PAD_VALUE))
    if len(labels):
        n = len(labels)
        corners = np.ones((n * 4, 3))
        corners[:, :2] = labels[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # x1y1, x2y2, x1y2, x2y1
        corners = (corners @ matrix.T)[:, :2].reshape(n, 8)
        xs, ys = corners[:, [0, 2, 4, 6]], corners[:, [1, 3, 5, 7]]
        warped = np.stack((xs.min(1), ys.min(1), xs.max(1), ys.max(1)), 1)
        clipped = warped.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, out_w)
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, out_h)
        keep = keep_plausible_boxes(labels[:, 1:5] * s, clipped)
        labels = np.concatenate((labels[keep, :1], clipped[keep]), 1)
    return image, labels


def mosaic(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], size: int,
           rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Four images around a random centre on a 2*size canvas (pad 114); labels shifted and clipped.

    The result is cropped back to ``size`` by the random affine that follows (see ``random_affine``).
    """
    if len(images) != 4:
        raise ValueError("mosaic needs exactly four images")
    s = size
    yc, xc = (int(rng.uniform(s / 2, 1.5 * s)) for _ in range(2))
    canvas = np.full((2 * s, 2 * s, 3), PAD_VALUE, dtype=np.uint8)
    out_labels: List[np.ndarray] = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        h, w = img.shape[:2]
        if i == 0:    # top left
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
        elif i == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
            x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
        elif i == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
        else:         # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
        canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
        dx, dy = x1a - x1b, y1a - y1b
        lab = lab.copy()
        if len(lab):
            lab[:, [1, 3]] += dx
            lab[:, [2, 4]] += dy
        out_labels.append(lab)
    merged = np.concatenate(out_labels, 0) if out_labels else np.zeros((0, 5), np.float32)
    merged[:, 1:5] = merged[:, 1:5].clip(0, 2 * s)
    return canvas, merged


def mixup(image: np.ndarray, labels: np.ndarray, other: np.ndarray, other_labels: np.ndarray,
          rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images (ratio from Beta(8, 8)); the labels of both are kept."""
    r = rng.beta(8.0, 8.0)
    blended = (image.astype(np.float32) * r + other.astype(np.float32) * (1 - r)).astype(np.uint8)
    return blended, np.concatenate((labels, other_labels), 0)

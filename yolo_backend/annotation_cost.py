"""What an annotator's actions cost in seconds: one cost model for the simulator's report and the cost-aware
task score (``active_learning``, ``uncertainty_per_second``).

Defaults and where they come from (docs/active-learning.md, "Annotation effort", has the full references):

- ``draw_s`` 7.0: drawing one box. Papadopoulos et al., "Extreme clicking for efficient object annotation"
  (ICCV 2017), abstract: 7 s per box by extreme clicking, against 35 s per high-quality box for ILSVRC's
  crowd-sourced drawing with its verification steps (Su et al. 2012). 7 s is the cheaper published figure, so the
  time pre-annotations save is not overstated; ``--draw-s 35`` gives the ILSVRC figure.
- ``adjust_s`` 3.5, ``delete_s`` 1.0, ``accept_s`` 1.6, ``image_s`` 3.0: our assumptions, no published timing
  was verified for them (moving a box's edges: half a drawing; deleting: one click and a key; accepting: a look,
  about a yes/no box verification; per image: open, look over, submit).

Standard library at import (numpy only inside ``expected_seconds``): the server's task score uses it, and the
command line reads its defaults for ``simulate --help`` without loading numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Protocol


class BoxActions(Protocol):
    """Counts of what an annotator did over some images (``simulate.effort.RoundEffort`` is one): a Protocol so
    this module needs nothing from the simulator above it."""

    @property
    def images(self) -> int: ...
    @property
    def accepted(self) -> int: ...
    @property
    def adjusted(self) -> int: ...
    @property
    def deleted(self) -> int: ...
    @property
    def drawn(self) -> int: ...
    @property
    def truth_boxes(self) -> int:
        """Ground-truth boxes on those images: what the annotator ends with."""


@dataclass(frozen=True)
class CostModel:
    """Seconds an annotator spends per action (the module doc says where each default comes from)."""

    # "action" completes "seconds to ..." in the command lines' help (add_cost_arguments)
    draw_s: float = field(default=7.0, metadata={"action": "draw a box from scratch"})
    adjust_s: float = field(default=3.5, metadata={"action": "adjust a pre-annotated box (IoU 0.5-0.9 with the "
                                                             "right box)"})
    delete_s: float = field(default=1.0, metadata={"action": "delete a wrong pre-annotated box"})
    accept_s: float = field(default=1.6, metadata={"action": "accept a right pre-annotated box"})
    image_s: float = field(default=3.0, metadata={"action": "spend per image: open, look over, submit"})

    def __post_init__(self) -> None:
        if min(self.draw_s, self.adjust_s, self.delete_s, self.accept_s, self.image_s) < 0:
            raise ValueError("annotation costs are seconds: none may be negative")

    def seconds(self, effort: BoxActions) -> float:
        """Estimated seconds for ``effort``: its images and box actions."""
        return (effort.images * self.image_s + effort.drawn * self.draw_s + effort.adjusted * self.adjust_s
                + effort.deleted * self.delete_s + effort.accepted * self.accept_s)

    def scratch_seconds(self, effort: BoxActions) -> float:
        """Estimated seconds for the same images without pre-annotations: every ground-truth box drawn."""
        return effort.images * self.image_s + effort.truth_boxes * self.draw_s

    def expected_seconds(self, confidences, threshold: float) -> float:
        """The model's own guess of what one image will cost, before anyone has looked at it.

        Each detection with confidence ``c`` is taken as an object with probability ``c``: a shown one
        (``c >= threshold``) is adjusted if it is real and deleted if not; one not shown is drawn if it is real.
        Objects the model did not detect at all are not counted (nothing says where they are)."""
        import numpy as np

        c = np.clip(np.asarray(confidences, np.float64).reshape(-1), 0.0, 1.0)
        shown = c >= threshold
        fix = np.where(shown, c * self.adjust_s + (1.0 - c) * self.delete_s, c * self.draw_s)
        return float(self.image_s + fix.sum())


def add_cost_arguments(parser) -> None:
    """``--draw-s`` ... ``--image-s`` on an argparse parser or group, one per ``CostModel`` field (unset: None)."""
    for f in fields(CostModel):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=float, metavar="S",
                            help=f"seconds to {f.metadata['action']} (default {f.default:g})")


def cost_from_args(args: Any) -> CostModel:
    """The cost model from ``add_cost_arguments``' options, defaults where one was not given; ValueError when a
    cost is negative."""
    given = {f.name: getattr(args, f.name) for f in fields(CostModel)}
    return CostModel(**{name: value for name, value in given.items() if value is not None})

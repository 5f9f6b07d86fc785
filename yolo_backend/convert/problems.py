"""Problems found while converting: reported with where they are, counted, skipped or fatal (strict mode).

Nothing is dropped silently: every skipped label line, unknown label or unusable image becomes a ``Problem``
(logged as a warning at once, named ``file:line: what``) and is counted in the summary the CLI prints.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Optional

from ..yolov7.yolo_format import Problem

log = logging.getLogger("yolo_backend.convert")


class ConversionError(ValueError):
    """The conversion cannot go on; the message says what is wrong and what to do."""


class ProblemLog:
    """Collects problems and counts; ``strict`` turns the first problem into a ConversionError."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.problems: list[Problem] = []
        self.counts: Counter = Counter()

    def report(self, kind: str, where: object, message: str, line: Optional[int] = None,
               skipped: str = "skipped") -> None:
        self.add(Problem(kind, str(where), message, line), skipped)

    def add(self, problem: Problem, skipped: str = "skipped") -> None:
        """Record ``problem`` (``skipped`` says what became of it, for the log line); fatal in strict mode."""
        if self.strict:
            raise self.fatal(problem)
        self.problems.append(problem)
        log.warning("%s; %s", problem, skipped)

    @staticmethod
    def fatal(problem: Problem) -> ConversionError:
        return ConversionError(f"{problem} (--strict makes this fatal; fix it or drop --strict to skip it)")

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def by_kind(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    def summary(self, done: str) -> str:
        """One line: what was done (``done``), then the problems by kind."""
        if not self.problems:
            return f"{done}; no problems"
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.by_kind().items()))
        return f"{done}; {len(self.problems)} problem(s) reported above: {kinds}"

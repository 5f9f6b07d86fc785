"""Problems found while converting: reported with where they are, counted, skipped or fatal (strict mode).

Nothing is dropped silently: every skipped label line, unknown label or unusable image becomes a ``Problem``
(logged as a warning at once, named ``file:line: what``) and is counted in the summary the CLI prints.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger("yolo_backend.convert")


class ConversionError(ValueError):
    """The conversion cannot go on; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Problem:
    kind: str              # short category for the summary, e.g. "wrong field count"
    where: str             # a file, or "task 12"
    message: str
    line: Optional[int] = None

    def __str__(self) -> str:
        place = f"{self.where}:{self.line}" if self.line is not None else self.where
        return f"{place}: {self.message}"


class ProblemLog:
    """Collects problems and counts; ``strict`` turns the first problem into a ConversionError."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.problems: list[Problem] = []
        self.counts: Counter = Counter()

    def report(self, kind: str, where, message: str, line: Optional[int] = None, skipped: str = "skipped") -> None:
        problem = Problem(kind, str(where), message, line)
        if self.strict:
            raise ConversionError(f"{problem} (--strict makes this fatal; fix it or drop --strict to skip it)")
        self.problems.append(problem)
        log.warning("%s; %s", problem, skipped)

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

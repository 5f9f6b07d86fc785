"""Strategy names of the simulator -> which images come next.

``random``                  k unlabelled images uniformly at random
``default``                 the backend's TASK_SCORE (Settings), lowest score first
``<score>``                 any TASK_SCORE strategy (uncertainty, entropy_sum, ...), lowest score first, as Label
                            Studio serves tasks sorted by prediction score
``kcenter``                 k-center greedy on the pooled neck embeddings (pure diversity, core-set)
``<score>+kcenter``         the 3k lowest scores, k-center greedy among them (uncertainty, then diversity)

With cluster ids (``--clusters source`` or ``kmeans``), score strategies (not ``random``, not the ``kcenter``
ones) follow Label Studio's cluster rule instead (least-solved cluster first, then lowest score; one pick at a
time, as one annotator is served): ``clusters.next_task_order`` via ``active_learning.select_lowest``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .. import active_learning as al
from ..settings import Settings

DIVERSITY_SUFFIX = "+kcenter"


@dataclass(frozen=True)
class Strategy:
    name: str               # as given on the command line (``default`` stays ``default`` in the outputs)
    score: Optional[str]    # the task score it ranks by (None: random or pure diversity)
    diverse: bool           # k-center greedy on embeddings

    @property
    def needs_scoring(self) -> bool:
        return self.score is not None or self.diverse

    @property
    def uses_clusters(self) -> bool:
        """Whether cluster ids change its picks (Label Studio's rule applies to score-ranked strategies only)."""
        return self.score is not None and not self.diverse


def parse_strategy(name: str, settings: Settings) -> Strategy:
    """A strategy name -> what it does; ValueError naming the choices for an unknown one."""
    if name == "random":
        return Strategy(name, None, False)
    if name == "kcenter":
        return Strategy(name, None, True)
    base, diverse = (name[:-len(DIVERSITY_SUFFIX)], True) if name.endswith(DIVERSITY_SUFFIX) else (name, False)
    score = settings.task_score if base == "default" else base
    if score not in al.STRATEGIES:
        raise ValueError(f"strategy {name!r} is unknown; use random, default, kcenter, one of "
                         f"{', '.join(al.STRATEGIES)}, or a score followed by {DIVERSITY_SUFFIX}")
    return Strategy(name, score, diverse)


def choose(strategy: Strategy, candidates: Sequence[int], k: int, rng: np.random.Generator,
           scores: Optional[np.ndarray] = None, embeddings: Optional[np.ndarray] = None,
           labelled_embeddings: Optional[np.ndarray] = None, clusters: Optional[Sequence[int]] = None,
           solved: Optional[dict[int, int]] = None) -> list[int]:
    """The next ``k`` of ``candidates`` (``scores``, ``embeddings``, ``clusters`` aligned with them)."""
    if strategy.score is None and not strategy.diverse:
        return al.select_random(candidates, k, rng)
    if strategy.score is None:
        assert embeddings is not None and labelled_embeddings is not None  # a diverse strategy is given them
        return al.select_k_center(candidates, embeddings, labelled_embeddings, k)
    assert scores is not None  # a scoring strategy is given the scores
    if strategy.diverse:
        assert embeddings is not None and labelled_embeddings is not None
        return al.select_diverse_lowest(candidates, scores, embeddings, labelled_embeddings, k)
    return al.select_lowest(candidates, scores, k, clusters, solved)

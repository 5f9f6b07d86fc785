"""Pool-based active-learning simulation of the product's own loop (``python -m yolo_backend simulate``).

``loop`` runs the rounds (training through ``jobs.training.train_and_publish``, as the worker does), ``scoring``
scores the pool as the server would (plus neck embeddings), ``strategies`` maps strategy names to selections
(``active_learning``), ``effort`` counts what the annotator does with the served pre-annotations on the picked
images and what that costs in time, ``report`` writes curves.csv, report.md and curves.png. See
docs/active-learning.md.
"""

from .loop import SimConfig, Simulation, simulate

__all__ = ["SimConfig", "Simulation", "simulate"]

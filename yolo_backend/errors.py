"""Errors every layer may raise and the server answers with their own HTTP status (standard library only)."""

from __future__ import annotations


class RequestRefused(RuntimeError):
    """A request that cannot be taken now; the server answers ``status`` with the message (which says why and
    what to do). E.g. 429 when too many projects wait for training, 503 when the disk is full."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

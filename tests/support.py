"""Small helpers shared by the fast tests (the end-to-end ones have tests/e2e/harness.py)."""

from __future__ import annotations

import time

FIRE_SMOKE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="fire"/><Label value="smoke"/>
  </RectangleLabels>
</View>"""


def wait_for(predicate, timeout: float, message: str, interval: float = 0.1):
    """Poll ``predicate()`` until it returns something truthy and return that; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")

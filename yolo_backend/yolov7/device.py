"""Where inference runs: device choice and CPU thread count.

Nothing here touches ``torch.cuda`` at import time: CUDA must be initialised only after any fork (gunicorn
workers, RQ jobs), so callers ask for the device when they need it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?|\d+)$")


class DeviceError(ValueError):
    """The requested device cannot be used; the message says why and what to set instead."""


def select_device(spec: Optional[str] = "auto") -> torch.device:
    """Turn a device setting into a ``torch.device``.

    ``auto`` (or empty/None): the first CUDA device when one is available, else the CPU.
    ``cpu``, ``cuda``, ``cuda:N`` (or a bare ``N``): that device; asking for CUDA where there is none is an error.
    """
    text = (spec or "auto").strip().lower()
    if not _SPEC.match(text):
        raise DeviceError(f"device {spec!r} is not understood; use auto, cpu, cuda or cuda:N")
    if text == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    index = int(text.split(":")[1]) if ":" in text else (int(text) if text.isascii() and text.isdigit() else 0)
    if not torch.cuda.is_available():
        reason = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise DeviceError(f"device {spec!r} was asked for but {reason}; set DEVICE=cpu or DEVICE=auto")
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {spec!r} was asked for but only {count} CUDA device(s) exist "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device(f"cuda:{index}")


def _affinity_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _physical_cores(cpus: set[int]) -> Optional[int]:
    """Number of distinct physical cores behind ``cpus`` (hyper-threads counted once); None if unknown."""
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return None
        cores.add((package, core))
    return len(cores) or None


def _cgroup_cpu_limit() -> Optional[int]:
    """CPU quota of the container (cgroup v2 ``cpu.max``), rounded up; None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))


def default_thread_count() -> int:
    """A sane CPU thread count: the CPUs this process may run on, capped at their physical cores and at the
    container's CPU quota. More threads than cores only adds contention for conv-heavy inference."""
    cpus = _affinity_cpus()
    count = len(cpus)
    physical = _physical_cores(cpus)
    if physical:
        count = min(count, physical)
    quota = _cgroup_cpu_limit()
    if quota:
        count = min(count, quota)
    return max(1, count)


def configure_threads(threads: int = 0) -> int:
    """Set torch's intra-op CPU threads: ``threads`` > 0 as given, 0 = ``default_thread_count()``. Returns it."""
    if threads < 0:
        raise DeviceError(f"TORCH_THREADS={threads} must be 0 (auto) or a positive number")
    count = threads or default_thread_count()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a module's weights are (its first parameter, else buffer; the CPU for a module with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def use_half(device: torch.device, half: bool) -> bool:
    """fp16 inference only where it pays off and is supported: on CUDA. On CPU the request is ignored."""
    if half and device.type != "cuda":
        log.info("half=True ignored on %s: fp16 inference is used on CUDA only", device)
        return False
    return half

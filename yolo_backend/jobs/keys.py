"""What the server-side queue and the RQ job agree on in Redis: key names, the Lua scripts that change them
atomically, the timings, and how to tell that the process running a job is gone.

Per project: ``waiting`` names the job that has not read the annotations yet (triggers coalesce into it; the job
deletes it once it holds the project's lock), ``lock`` is held by the job that trains, ``last`` names the newest
job. Per job: ``alive`` is its work horse's heartbeat ("<host>:<pid>", refreshed every LOCK_TTL_S / 4 seconds),
``coalesced`` counts the triggers it covers.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

# The job waits this long before reading the annotations: Label Studio sends START_TRAINING while it is still
# saving the annotation that triggered it.
SETTLE_S = 2.0
# A running job refreshes its heartbeat key ("<host>:<pid>" of its work horse) every LOCK_TTL_S / 4 seconds;
# without it for LOCK_TTL_S, the worker running it is gone (killed) and the job is reported failed. On the same
# machine a dead horse is seen at once (its pid is gone).
LOCK_TTL_S = 20
# A waiting-slot reservation lives this long until its job exists; one older than RESERVE_GRACE_S without a job is
# a leftover (a server that died between reserving and enqueueing), never a job to coalesce into.
RESERVE_TTL_S = 30
RESERVE_GRACE_S = 2
# RQ statuses of a job that has not started yet (a request can still join it).
NOT_STARTED = {"queued", "deferred", "scheduled", "created"}


class Keys:
    """Redis key names of the training queue (shared by the server and the job)."""

    def __init__(self, queue_name: str):
        self.prefix = f"yolo-backend:{queue_name}"

    def waiting(self, project_id: int) -> str:
        return f"{self.prefix}:project:{project_id}:waiting"

    def lock(self, project_id: int) -> str:
        return f"{self.prefix}:project:{project_id}:lock"

    def last(self, project_id: int) -> str:
        return f"{self.prefix}:project:{project_id}:last"

    def alive(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:alive"

    def coalesced(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:coalesced"

    def pool(self, project_id: int) -> str:
        """Hash: the project's newest pool-scoring run (version, total, done, failed, chunks, state, times)."""
        return f"{self.prefix}:project:{project_id}:pool"

    def pool_waiting(self, project_id: int) -> str:
        """The pool-scoring coordinator job of the project that has not started yet (requests coalesce into it)."""
        return f"{self.prefix}:project:{project_id}:pool-waiting"

    def pool_stored(self, project_id: int, version: str) -> str:
        """Set: task ids whose prediction of ``version`` is stored (a retried chunk stores no second one)."""
        return f"{self.prefix}:project:{project_id}:pool-stored:{version}"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"


# Reserve the waiting slot: returns {job id, 1} when ours was stored, {existing id, 0} otherwise.
RESERVE = """
local current = redis.call('GET', KEYS[1])
if current then return {current, 0} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', 30)  -- RESERVE_TTL_S
return {ARGV[1], 1}
"""
# Replace a stale waiting id (its job started or vanished without clearing the key) only if it is still there.
REPLACE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'EX', 30) return 1 end
return 0
"""
# The job exists now: the reservation no longer expires (until the job starts and deletes it).
CONFIRM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PERSIST', KEYS[1]) end
return 0
"""
# Delete a key only if it holds our value (a job clearing its waiting slot or releasing its lock).
DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def text(value) -> Optional[str]:
    """A Redis reply (bytes or None) as text."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def process_space() -> str:
    """Names the process table this process lives in: host name, boot and PID namespace (containers sharing a host
    name, or a host network, still differ), so a PID is only ever checked where it means the same process."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(open(path).read().strip() if path.endswith("boot_id") else str(os.stat(path).st_ino))
        except OSError:
            parts.append("-")
    return "/".join(parts)


def heartbeat_value() -> str:
    """What a running job's ``alive`` key holds: ``<process space>:<pid>`` of its work horse."""
    return f"{process_space()}:{os.getpid()}"


def holder_alive(connection, keys: Keys, job_id: str) -> bool:
    """Whether the work horse running ``job_id`` is alive: its heartbeat key exists and, when it runs in this
    process table, its process too (a killed horse is known dead at once instead of when its heartbeat expires)."""
    beat = text(connection.get(keys.alive(job_id)))
    if not beat:
        return False
    space, _, pid = beat.rpartition(":")
    if space == process_space() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True

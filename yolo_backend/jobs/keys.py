"""What the server-side queue and the RQ job agree on in Redis: key names, the Lua scripts that change them
atomically, the timings, and how to tell that the process running a job is gone.

Per project: ``waiting`` (and ``pool_waiting``) is the slot naming the job that has not started its work yet
(triggers coalesce into it; slots.py), ``lock`` is held by the job that trains, ``lock_queue`` orders the jobs
waiting for it by ticket, ``last`` names the newest job. Per job: ``alive`` is its work horse's heartbeat
("<host>:<pid>", refreshed every LOCK_TTL_S / 4 seconds), ``coalesced`` counts the triggers it covers.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any, Optional, overload

if TYPE_CHECKING:
    from redis import Redis
    from rq.job import Job

# The job waits this long before reading the annotations: Label Studio sends START_TRAINING while it is still
# saving the annotation that triggered it.
SETTLE_S = 2.0
# A running job refreshes its heartbeat key ("<host>:<pid>" of its work horse) every LOCK_TTL_S / 4 seconds;
# without it for LOCK_TTL_S, the worker running it is gone (killed) and the job is reported failed. On the same
# machine a dead horse is seen at once (its pid is gone).
LOCK_TTL_S = 20
# A waiting-slot reservation lives this long until its job exists (the one number: slots.py passes it to its Lua);
# one older than RESERVE_GRACE_S without a job is a leftover (a server that died between reserving and enqueueing),
# never a job to coalesce into.
RESERVE_TTL_S = 30
RESERVE_GRACE_S = 2
# RQ marks a job started before the job's own code writes its heartbeat (a fork and an import later): a started job
# without a heartbeat is taken for starting, not gone, for this long.
START_GRACE_S = LOCK_TTL_S


class Keys:
    """Redis key names of the training queue (shared by the server and the job)."""

    def __init__(self, queue_name: str):
        self.prefix = f"yolo-backend:{queue_name}"

    def waiting(self, project_id: int) -> str:
        """Hash: the project's waiting training job (job, state, at, ticket; slots.py)."""
        return f"{self.prefix}:project:{project_id}:slot"

    def slot_projects(self, kind: str) -> str:
        """Sorted set: the projects with a slot of ``kind`` (score: when an unconfirmed reservation expires)."""
        return f"{self.prefix}:slots:{kind}"

    @property
    def tickets(self) -> str:
        """Counter: each reservation's ticket, the order in which a project's jobs take its lock."""
        return f"{self.prefix}:tickets"

    def lock(self, project_id: int) -> str:
        return f"{self.prefix}:project:{project_id}:lock"

    def lock_queue(self, project_id: int) -> str:
        """Sorted set: the jobs waiting for the project's lock, by ticket."""
        return f"{self.prefix}:project:{project_id}:lock-queue"

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
        """Hash: the project's pool-scoring coordinator that has not started yet (slots.py)."""
        return f"{self.prefix}:project:{project_id}:pool-slot"

    def pool_stored(self, project_id: int, version: str) -> str:
        """Set: task ids whose prediction of ``version`` is stored (a retried chunk stores no second one)."""
        return f"{self.prefix}:project:{project_id}:pool-stored:{version}"


# Delete a key only if it holds our value (a job releasing its lock).
DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# The project's lock, first come (by ticket) first served. KEYS: lock, lock queue. ARGV: job id, ticket, lock TTL,
# queue TTL. Returns {1} when taken, else {0, holder or '', first in line or ''}.
ACQUIRE = """
redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[4])
local holder = redis.call('GET', KEYS[1])
local first = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if holder == ARGV[1] or (not holder and first == ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {1}
end
return {0, holder or '', first or ''}
"""


@overload
def text(value: None) -> None: ...


@overload
def text(value: bytes | str | int | float) -> str: ...


def text(value: Any) -> Optional[str]:
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


def holder_alive(connection: Redis, keys: Keys, job_id: str) -> bool:
    """Whether the work horse running ``job_id`` is alive: its heartbeat key exists and, when it runs in this
    process table, its process too (a killed horse is known dead at once instead of when its heartbeat expires)."""
    beat = text(connection.get(keys.alive(job_id)))
    if not beat:
        return False
    space, _, pid = beat.rpartition(":")
    if space == process_space() and pid.isascii() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def job_status_of(job: Job) -> str:
    """An RQ job's status as a plain string ("queued", "started", "finished", ...): rq returns a JobStatus enum
    (or, in older versions, a string). The one place that reads it."""
    status = job.get_status(refresh=False)
    return str(getattr(status, "value", status))

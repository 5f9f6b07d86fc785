"""One waiting job per project, for training jobs and pool-scoring coordinators alike: reserve, coalesce, cap.

A project's *slot* (a Redis hash: job, state, at, ticket) names its job that has not started its work yet; a
request while that job is alive *coalesces* into it. The decision is one Lua script (``CLAIM``): without a slot, or
when the slot still names the job the caller judged gone, it reserves the slot for a new job unless
MAX_QUEUED_PROJECTS projects already have one (a sorted set of those projects: no SCAN); otherwise it returns the
slot. Any interleaving of requests from any number of server processes thus leaves at most one slot per project
and never more slots than the cap.

A slot moves through three states, each by one script:
- ``reserved`` (CLAIM): the server is creating the RQ job. It expires after RESERVE_TTL_S if the server dies first,
  and is taken for a leftover after RESERVE_GRACE_S when RQ has no such job.
- ``queued`` (CONFIRM): the RQ job exists.
- ``started`` (TAKE, the job's first step, after its heartbeat is written): a training job keeps the slot while it
  waits for the project's lock, then frees it (RELEASE) before it reads the annotations; a pool coordinator frees
  it at once.
The slot's job is judged gone (and the slot replaced, compare-and-set) only when RQ no longer has it or says it
ended, or when it started and its heartbeat is gone. RQ marks a job started before the job's code runs: a started
job whose slot still reads ``queued`` is starting, not stale, for START_GRACE_S. A job whose slot names another job
(it was judged gone and replaced) does not run: the other job covers its requests.

Each reservation draws a ticket (one counter per queue); a training job waits for the project's lock in ticket
order (``job._project_lock``), so a queued job keeps its turn.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

from ..errors import RequestRefused
from .keys import RESERVE_GRACE_S, RESERVE_TTL_S, START_GRACE_S, Keys, holder_alive, job_status_of, text

log = logging.getLogger(__name__)

# RQ statuses of a job that has not started yet (a request can still join it).
NOT_STARTED = {"queued", "deferred", "scheduled", "created"}
# How long a job's count of coalesced requests stays readable (as long as its result).
COALESCED_TTL_S = 7 * 24 * 3600


class SlotKind(str, Enum):
    """Whose slots: each kind has its own slot per project and its own cap."""

    TRAINING = "training"
    POOL = "pool"


class SlotState(str, Enum):
    RESERVED = "reserved"
    QUEUED = "queued"
    STARTED = "started"


@dataclass(frozen=True)
class Slot:
    job: str
    state: SlotState
    age_s: float      # since the state was set, by Redis's clock
    ticket: int


@dataclass(frozen=True)
class Joined:
    """What a request got: a new job (``queued``) or the waiting one (``coalesced``)."""

    job: str
    status: str
    ticket: int


# KEYS: slot, the kind's set of projects with a slot, the ticket counter.
# ARGV: project, new job id, cap, RESERVE_TTL_S, the job id the caller judged gone ('' for none).
# Returns {'current', job, state, age, ticket} | {'full', count} | {'reserved', job, 'reserved', '0', ticket}.
CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local job = redis.call('HGET', KEYS[1], 'job')
if job and job ~= ARGV[5] then
  local s = redis.call('HMGET', KEYS[1], 'state', 'at', 'ticket')
  return {'current', job, s[1] or 'queued', tostring(now - tonumber(s[2] or now)), s[3] or '0'}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  local count = redis.call('ZCARD', KEYS[2])
  if count >= tonumber(ARGV[3]) then return {'full', tostring(count)} end
end
local ttl = tonumber(ARGV[4])
local ticket = redis.call('INCR', KEYS[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'job', ARGV[2], 'state', 'reserved', 'at', tostring(now), 'ticket', ticket)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
return {'reserved', ARGV[2], 'reserved', '0', tostring(ticket)}
"""
# KEYS: slot, projects set. ARGV: project, job id. The RQ job exists: the reservation no longer expires.
CONFIRM = """
if redis.call('HGET', KEYS[1], 'job') ~= ARGV[2] then return 0 end
if redis.call('HGET', KEYS[1], 'state') == 'reserved' then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'state', 'queued', 'at', t[1] + t[2] / 1000000)
end
redis.call('PERSIST', KEYS[1])
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then redis.call('ZADD', KEYS[2], '+inf', ARGV[1]) end
return 1
"""
# KEYS: slot, projects set, ticket counter. ARGV: project, job id. The job starts: {1, ticket} when the slot is its
# own (or there is none: it takes it, outside the cap, as an existing job), {0, other job} when it was replaced.
TAKE = """
local job = redis.call('HGET', KEYS[1], 'job')
if job and job ~= ARGV[2] then return {0, job} end
local t = redis.call('TIME')
local ticket = redis.call('HGET', KEYS[1], 'ticket') or redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'job', ARGV[2], 'state', 'started', 'at', t[1] + t[2] / 1000000, 'ticket', ticket)
redis.call('PERSIST', KEYS[1])
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then redis.call('ZADD', KEYS[2], '+inf', ARGV[1]) end
return {1, tostring(ticket)}
"""
# KEYS: slot, projects set. ARGV: project, job id. Free the slot if it is still this job's.
RELEASE = """
if redis.call('HGET', KEYS[1], 'job') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

_REFUSED = {SlotKind.TRAINING: ("a training job", "it trains with a later request once the queue has room"),
            SlotKind.POOL: ("pool scoring", "ask again once the queue has room")}


class WaitingSlots:
    """The slots of one kind on one queue (``Keys``)."""

    def __init__(self, connection, keys: Keys, kind: SlotKind):
        self.connection, self.keys, self.kind = connection, keys, kind

    def key(self, project_id: int) -> str:
        return self.keys.waiting(project_id) if self.kind is SlotKind.TRAINING else self.keys.pool_waiting(project_id)

    def _keys(self, project_id: int) -> list[str]:
        return [self.key(project_id), self.keys.slot_projects(self.kind.value), self.keys.tickets]

    # --- the server side ---------------------------------------------------------------------------------
    def request(self, project_id: int, cap: int, create: Callable[[str], None], new_id: Callable[[], str]) -> Joined:
        """Join the project's waiting job, or reserve the slot and ``create(job_id)`` the RQ job. RequestRefused
        (429) when ``cap`` projects already have one waiting: made-up project ids cannot fill the queue."""
        gone = ""
        for _ in range(8):
            job_id = new_id()
            verdict, slot = self._claim(project_id, job_id, cap, gone)
            if verdict == "full":
                what, later = _REFUSED[self.kind]
                raise RequestRefused(429, f"{slot} projects already have {what} waiting (MAX_QUEUED_PROJECTS={cap}): "
                                          f"the request for project {project_id} is refused; {later}")
            if verdict == "reserved":
                joined = self._create(project_id, job_id, slot.ticket, create)
                if joined is not None:
                    return joined
                gone = ""
                continue
            if self.alive(slot):
                pipe = self.connection.pipeline()
                pipe.incr(self.keys.coalesced(slot.job))
                pipe.expire(self.keys.coalesced(slot.job), COALESCED_TTL_S)
                pipe.execute()
                return Joined(slot.job, "coalesced", slot.ticket)
            gone = slot.job  # its job is gone: replace it, if it is still the one there
        raise RuntimeError(f"could not reserve a {self.kind.value} job for project {project_id} (the waiting slot "
                           "keeps changing); try again")

    def _claim(self, project_id: int, job_id: str, cap: int, gone: str):
        reply = [text(v) for v in self.connection.eval(CLAIM, 3, *self._keys(project_id), project_id, job_id,
                                                       int(cap), int(RESERVE_TTL_S), gone)]
        if reply[0] == "full":
            return "full", int(reply[1])
        state = reply[2] if reply[2] in SlotState._value2member_map_ else SlotState.QUEUED.value
        return reply[0], Slot(reply[1], SlotState(state), float(reply[3]), int(reply[4]))

    def _create(self, project_id: int, job_id: str, ticket: int, create: Callable[[str], None]) -> Optional[Joined]:
        try:
            create(job_id)
        except BaseException:
            with contextlib.suppress(Exception):  # Redis went away: the reservation expires by itself
                self.release(project_id, job_id)
            raise
        if self.connection.eval(CONFIRM, 2, *self._keys(project_id)[:2], project_id, job_id):
            return Joined(job_id, "queued", ticket)
        # Creating it took longer than RESERVE_GRACE_S and another request took the slot: that job covers this one.
        log.warning("%s job %s of project %s was created after its reservation was taken over; cancelled",
                    self.kind.value, job_id, project_id)
        self._cancel(job_id)
        return None

    def _cancel(self, job_id: str) -> None:
        from rq.job import Job

        with contextlib.suppress(Exception):  # already started: it finds its slot taken and does not run
            job = Job.fetch(job_id, connection=self.connection)
            if job_status_of(job) in NOT_STARTED:
                job.cancel()

    def alive(self, slot: Slot) -> bool:
        """Whether the slot's job will still start its work: a request may coalesce into it."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        if slot.state is SlotState.RESERVED and slot.age_s < RESERVE_GRACE_S:
            return True  # its job is being created right now
        try:
            job = Job.fetch(slot.job, connection=self.connection)
        except NoSuchJobError:
            return False
        status = job_status_of(job)
        if status in NOT_STARTED:
            return True
        if status != "started":
            return False  # finished, failed, stopped, cancelled
        if self.connection.exists(self.keys.alive(slot.job)):
            return holder_alive(self.connection, self.keys, slot.job)
        # RQ marked it started; its own first step (heartbeat, TAKE) has not run yet.
        started = job.started_at
        return slot.state is not SlotState.STARTED and started is not None and \
            (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() < START_GRACE_S

    def job(self, project_id: int) -> Optional[str]:
        """The project's waiting job (None when there is none)."""
        return text(self.connection.hget(self.key(project_id), "job"))

    def count(self) -> int:
        """How many projects have a slot (reservations that expired unconfirmed left out)."""
        return int(self.connection.zcount(self.keys.slot_projects(self.kind.value), time.time(), "+inf"))

    # --- the job side ------------------------------------------------------------------------------------
    def take(self, project_id: int, job_id: str) -> tuple[Optional[int], Optional[str]]:
        """The job starts: (its ticket, None), or (None, the job that replaced it) when its slot was taken over."""
        ok, value = self.connection.eval(TAKE, 3, *self._keys(project_id), project_id, job_id)
        return (int(text(value)), None) if int(ok) else (None, text(value))

    def release(self, project_id: int, job_id: str) -> bool:
        """Free the slot if it is still ``job_id``'s: the next request queues a new job."""
        return bool(self.connection.eval(RELEASE, 2, *self._keys(project_id)[:2], project_id, job_id))



"""The study index and job state in Redis, shared by listeners, the monitor, workers and the CLI.

Keys (all under ``discus:``):

``study:<uid>``
    hash: folder, first_seen, last_seen, instances, changes (content change counter),
    claimed_changes (changes covered by the last claimed revision), revision, state, reason,
    export_error, purged.
``study:<uid>:sops``
    hash: SOP Instance UID -> digest of the dataset bytes, so an identical re-send changes nothing.
``pending``
    sorted set of studies with unclaimed changes, scored by last-seen time.
``studies``
    sorted set of every known study, scored by last-seen time.
``job:<uid>:<revision>``
    hash: state (queued, running, exporting, export_failed, done, failed, superseded), reason
    (why the analysis failed or was not performed), export_error, attempts,
    queued_at, started_at, finished_at, done_at, result, objects, exports_expected,
    exports_done, exports_dead, timings (JSON).
``job:<uid>:<revision>:exports``
    set of ``destination|file name`` already delivered, so a redelivered export counts once.
``jobs``
    sorted set of ``<uid>:<revision>`` scored by queue time.
``deadletter``
    hash: entry id -> JSON of an export that missed its deadline or failed permanently.
``purge``
    sorted set of studies whose results are delivered, scored by the time they were.

Every transition that several processes may race on is one Lua script, so the
index stays consistent with any number of listeners and workers.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from worker.errors import DeadLetterError, JobNotFoundError

PREFIX = "discus:"

# KEYS: study, sops, pending, studies. ARGV: sop, digest, now, folder, study uid.
_RECORD = """
local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev == ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if not prev then redis.call('HINCRBY', KEYS[1], 'instances', 1) end
redis.call('HINCRBY', KEYS[1], 'changes', 1)
redis.call('HSETNX', KEYS[1], 'first_seen', ARGV[3])
redis.call('HSETNX', KEYS[1], 'revision', 0)
redis.call('HSETNX', KEYS[1], 'claimed_changes', 0)
redis.call('HSET', KEYS[1], 'last_seen', ARGV[3], 'folder', ARGV[4], 'state', 'receiving')
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[5])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[5])
return 1
"""

# KEYS: study, pending, jobs. ARGV: now, quiet, force ('1'/'0'), study uid, job key prefix.
# Returns the claimed revision, 0 when there is nothing new, -1 when not quiet yet.
_CLAIM = """
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seen') or '0')
local changes = tonumber(redis.call('HGET', KEYS[1], 'changes') or '0')
local claimed = tonumber(redis.call('HGET', KEYS[1], 'claimed_changes') or '0')
local force = ARGV[3] == '1'
if changes == 0 then redis.call('ZREM', KEYS[2], ARGV[4]); return 0 end
if changes <= claimed and not force then redis.call('ZREM', KEYS[2], ARGV[4]); return 0 end
if last > tonumber(ARGV[1]) - tonumber(ARGV[2]) and not force then return -1 end
local rev = redis.call('HINCRBY', KEYS[1], 'revision', 1)
redis.call('HSET', KEYS[1], 'claimed_changes', changes, 'state', 'queued')
redis.call('HDEL', KEYS[1], 'reason', 'export_error')
redis.call('ZREM', KEYS[2], ARGV[4])
local job = ARGV[5] .. rev
redis.call('HSET', job, 'study', ARGV[4], 'revision', rev, 'state', 'queued',
           'queued_at', ARGV[1], 'attempts', 0,
           'folder', redis.call('HGET', KEYS[1], 'folder') or '')
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[4] .. ':' .. rev)
return rev
"""

# KEYS: job, exports set, study, purge. ARGV: member, now, study uid.
# Returns 1 when this delivery completed the job, 0 otherwise.
_EXPORTED = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
local done = redis.call('HINCRBY', KEYS[1], 'exports_done', 1)
local expected = tonumber(redis.call('HGET', KEYS[1], 'exports_expected') or '0')
if done >= expected then
  redis.call('HSET', KEYS[1], 'state', 'done', 'done_at', ARGV[2])
  redis.call('HDEL', KEYS[1], 'export_error')
  redis.call('HSET', KEYS[3], 'state', 'done')
  redis.call('HDEL', KEYS[3], 'export_error')
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3])
  return 1
end
return 0
"""

# KEYS: job, study. ARGV: new state. Sets it only while the job is still running.
_IF_RUNNING = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
redis.call('HSET', KEYS[2], 'state', ARGV[1])
return 1
"""


def dataset_digest(path: Path) -> str:
    """SHA-1 of a Part-10 file's dataset, leaving out the preamble and file meta.

    The file meta carries the sender's AE title, so the same instance sent by another
    modality is still the same content.
    """
    data = Path(path).read_bytes()
    start = 0
    # Part-10: 128-byte preamble, "DICM", then (0002,0000) UL with the group length.
    if len(data) >= 144 and data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00":
        start = 144 + int.from_bytes(data[140:144], "little")
    return hashlib.sha1(data[start:]).hexdigest()


def _decode(h: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in h.items()}


@dataclass
class DeadLetter:
    """An export that missed its deadline or failed permanently, parked for an admin."""

    id: str
    study_uid: str
    revision: int
    path: str
    destination: str
    reason: str
    failed_at: float
    attempts: int = 0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


class StudyIndex:
    """Study index and job state in one Redis database.

    Parameters
    ----------
    client : redis.Redis
        Connection to the Redis holding the index (the Celery broker's, usually).

    Raises
    ------
    TypeError
        ``client`` is not a Redis client.
    """

    def __init__(self, client: redis.Redis) -> None:
        if not isinstance(client, redis.Redis):
            raise TypeError(f"client: expected redis.Redis, got {type(client).__name__}")
        self.r = client
        self._record = client.register_script(_RECORD)
        self._claim = client.register_script(_CLAIM)
        self._exported = client.register_script(_EXPORTED)
        self._if_running = client.register_script(_IF_RUNNING)

    @classmethod
    def from_url(cls, url: str) -> StudyIndex:
        """Index on the Redis at ``url`` (``redis://host:port/db``)."""
        return cls(redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5))

    # keys
    @staticmethod
    def study_key(uid: str) -> str:
        return f"{PREFIX}study:{uid}"

    @staticmethod
    def job_key(uid: str, revision: int) -> str:
        return f"{PREFIX}job:{uid}:{revision}"

    # listener side
    def record_instance(
        self, study_uid: str, sop_uid: str, digest: str, folder: Path, now: float | None = None
    ) -> bool:
        """Note one stored instance; return whether it changed the study's content."""
        now = time.time() if now is None else now
        sk = self.study_key(study_uid)
        changed = self._record(
            keys=[sk, f"{sk}:sops", PREFIX + "pending", PREFIX + "studies"],
            args=[sop_uid, digest, repr(now), str(folder), study_uid],
        )
        return bool(changed)

    def quiet_candidates(self, quiet: float, now: float | None = None) -> list[str]:
        """Studies with unclaimed changes and no new instance for ``quiet`` seconds."""
        now = time.time() if now is None else now
        return [u.decode() for u in self.r.zrangebyscore(PREFIX + "pending", "-inf", now - quiet)]

    def claim(self, study_uid: str, quiet: float, now: float | None = None, force: bool = False) -> int:
        """Atomically claim the next revision of a quiet study.

        Returns
        -------
        int
            The claimed revision (>= 1), 0 when there is nothing new to analyse, -1 when the
            study is not quiet yet. Exactly one caller gets each revision.
        """
        now = time.time() if now is None else now
        return int(
            self._claim(
                keys=[self.study_key(study_uid), PREFIX + "pending", PREFIX + "jobs"],
                args=[repr(now), repr(quiet), "1" if force else "0", study_uid,
                      f"{PREFIX}job:{study_uid}:"],
            )
        )

    def mark_enqueued(self, study_uid: str, revision: int, task_id: str) -> None:
        self.r.hset(self.job_key(study_uid, revision), mapping={"task_id": task_id})

    # worker side
    def study(self, study_uid: str) -> dict[str, str]:
        """The study's hash; raises :class:`JobNotFoundError` when unknown."""
        h = _decode(self.r.hgetall(self.study_key(study_uid)))
        if not h:
            raise JobNotFoundError(f"study_uid: no study {study_uid!r} in the index")
        return h

    def job(self, study_uid: str, revision: int) -> dict[str, str]:
        """The job's hash; raises :class:`JobNotFoundError` when unknown."""
        h = _decode(self.r.hgetall(self.job_key(study_uid, revision)))
        if not h:
            raise JobNotFoundError(f"no job for study {study_uid!r} revision {revision}")
        return h

    def start_attempt(self, study_uid: str, revision: int, now: float | None = None) -> int:
        """Count one more attempt at the job and mark it running; return the attempt number."""
        now = time.time() if now is None else now
        key = self.job_key(study_uid, revision)
        pipe = self.r.pipeline()
        pipe.hincrby(key, "attempts", 1)
        pipe.hset(key, mapping={"state": "running", "started_at": repr(now)})
        pipe.hset(self.study_key(study_uid), "state", "running")
        attempts = pipe.execute()[0]
        return int(attempts)

    def latest_revision(self, study_uid: str) -> int:
        return int(self.r.hget(self.study_key(study_uid), "revision") or 0)

    def set_job(self, study_uid: str, revision: int, study_state: str | None = None, **fields: Any) -> None:
        """Update job fields (and the study's state when given); non-strings are stored as JSON."""
        mapping = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        pipe = self.r.pipeline()
        if mapping:
            pipe.hset(self.job_key(study_uid, revision), mapping=mapping)
        if study_state is not None:
            sm = {"state": study_state}
            if "reason" in fields:
                sm["reason"] = mapping["reason"]
            pipe.hset(self.study_key(study_uid), mapping=sm)
        pipe.execute()

    def fail(self, study_uid: str, revision: int, reason: str, now: float | None = None) -> None:
        """Mark the job failed with its reason."""
        now = time.time() if now is None else now
        self.set_job(study_uid, revision, study_state="failed", state="failed", reason=reason,
                     finished_at=repr(now))

    def expect_exports(self, study_uid: str, revision: int, objects: int, destinations: int,
                       now: float | None = None) -> None:
        """Record how many deliveries finish the job; with none expected the job is done."""
        now = time.time() if now is None else now
        expected = objects * destinations
        fields: dict[str, Any] = {"objects": objects, "exports_expected": expected,
                                  "finished_at": repr(now)}
        if expected == 0:
            self.set_job(study_uid, revision, study_state="done", state="done", done_at=repr(now),
                         **fields)
            self.r.zadd(PREFIX + "purge", {study_uid: now})
        else:
            # The state stays "running" until the exports are queued (see mark_exporting), so a
            # worker lost in between leaves a job that is analysed again, not one stuck.
            self.set_job(study_uid, revision, **fields)

    def mark_exporting(self, study_uid: str, revision: int) -> None:
        """After the exports are queued: running -> exporting (unless they already finished)."""
        self._if_running(keys=[self.job_key(study_uid, revision), self.study_key(study_uid)],
                         args=["exporting"])

    def unsent_jobs(self, older_than: float, now: float | None = None, scan: int = 200) -> list[tuple[str, int]]:
        """Recent jobs claimed but never handed to the queue (their claimer died in between)."""
        now = time.time() if now is None else now
        members = [m.decode() for m in self.r.zrangebyscore(
            PREFIX + "jobs", now - 24 * 3600, now - older_than, start=0, num=scan)]
        pipe = self.r.pipeline()
        for m in members:
            uid, rev = m.rsplit(":", 1)
            pipe.hmget(self.job_key(uid, int(rev)), "state", "task_id")
        out = []
        for m, (state, task_id) in zip(members, pipe.execute()):
            if state == b"queued" and not task_id:
                uid, rev = m.rsplit(":", 1)
                out.append((uid, int(rev)))
        return out

    def lock(self, name: str, seconds: float) -> bool:
        """A short-lived lock (SET NX EX): True for the one caller that got it."""
        return bool(self.r.set(f"{PREFIX}lock:{name}", "1", nx=True, px=int(seconds * 1000)))

    def exported(self, study_uid: str, revision: int, destination: str, name: str,
                 now: float | None = None) -> bool:
        """Count one delivered object (once per destination and file); True when it finished the job."""
        now = time.time() if now is None else now
        jk = self.job_key(study_uid, revision)
        return bool(self._exported(
            keys=[jk, f"{jk}:exports", self.study_key(study_uid), PREFIX + "purge"],
            args=[f"{destination}|{name}", repr(now), study_uid],
        ))

    # dead letters
    def add_dead_letter(self, study_uid: str, revision: int, path: str, destination: str,
                        reason: str, attempts: int = 0, now: float | None = None) -> DeadLetter:
        """Park an export; the job shows it until a replay delivers it."""
        now = time.time() if now is None else now
        dl = DeadLetter(uuid.uuid4().hex[:12], study_uid, int(revision), str(path), destination,
                        reason, now, attempts)
        pipe = self.r.pipeline()
        pipe.hset(PREFIX + "deadletter", dl.id, dl.to_json())
        pipe.hincrby(self.job_key(study_uid, revision), "exports_dead", 1)
        pipe.hset(self.job_key(study_uid, revision),
                  mapping={"state": "export_failed", "export_error": reason})
        pipe.hset(self.study_key(study_uid),
                  mapping={"state": "export_failed", "export_error": reason})
        pipe.execute()
        return dl

    def dead_letters(self) -> list[DeadLetter]:
        """Every parked export, oldest first."""
        items = [DeadLetter(**json.loads(v)) for v in self.r.hvals(PREFIX + "deadletter")]
        return sorted(items, key=lambda d: d.failed_at)

    def take_dead_letter(self, entry_id: str) -> DeadLetter:
        """Remove one entry for replay; raises :class:`DeadLetterError` if it is gone."""
        pipe = self.r.pipeline()
        pipe.hget(PREFIX + "deadletter", entry_id)
        pipe.hdel(PREFIX + "deadletter", entry_id)
        raw, removed = pipe.execute()
        if raw is None or not removed:
            raise DeadLetterError(f"entry_id: no dead letter {entry_id!r}")
        dl = DeadLetter(**json.loads(raw))
        self.r.hincrby(self.job_key(dl.study_uid, dl.revision), "exports_dead", -1)
        self.set_job(dl.study_uid, dl.revision, study_state="exporting", state="exporting")
        return dl

    # purge of delivered input
    def purge_due(self, retention: float, now: float | None = None) -> list[str]:
        """Studies delivered more than ``retention`` seconds ago whose input can go."""
        now = time.time() if now is None else now
        return [u.decode() for u in self.r.zrangebyscore(PREFIX + "purge", "-inf", now - retention)]

    def unschedule_purge(self, study_uid: str) -> None:
        self.r.zrem(PREFIX + "purge", study_uid)

    def purged(self, study_uid: str) -> None:
        pipe = self.r.pipeline()
        pipe.zrem(PREFIX + "purge", study_uid)
        pipe.hset(self.study_key(study_uid), "purged", "1")
        pipe.execute()

    def is_settled(self, study_uid: str) -> bool:
        """No unclaimed changes and the latest revision is finished: safe to purge input."""
        h = _decode(self.r.hgetall(self.study_key(study_uid)))
        return bool(h) and h.get("changes") == h.get("claimed_changes") and h.get("state") == "done"

    # reading, for status
    def studies(self, limit: int = 50) -> list[dict[str, str]]:
        """The most recently seen studies with their hash fields, newest first."""
        uids = [u.decode() for u in self.r.zrevrange(PREFIX + "studies", 0, limit - 1)]
        pipe = self.r.pipeline()
        for u in uids:
            pipe.hgetall(self.study_key(u))
        return [{"study": u, **_decode(h)} for u, h in zip(uids, pipe.execute())]

    def jobs(self, limit: int = 50) -> list[dict[str, str]]:
        """The most recent jobs with their hash fields, newest first."""
        members = [m.decode() for m in self.r.zrevrange(PREFIX + "jobs", 0, limit - 1)]
        pipe = self.r.pipeline()
        for m in members:
            uid, rev = m.rsplit(":", 1)
            pipe.hgetall(self.job_key(uid, int(rev)))
        return [_decode(h) for h in pipe.execute()]

    def jobs_of(self, study_uid: str) -> list[dict[str, str]]:
        """Every job of one study, by revision."""
        latest = self.latest_revision(study_uid)
        return [j for j in (self._maybe_job(study_uid, r) for r in range(1, latest + 1)) if j]

    def _maybe_job(self, uid: str, rev: int) -> dict[str, str]:
        return _decode(self.r.hgetall(self.job_key(uid, rev)))

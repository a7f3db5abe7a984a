"""Putting jobs on the Celery queue, and the sweeper that repairs what a crash left behind.

A job is stored (``received``) before its task is published; publishing then moves it to
``queued``. If the broker is down the job simply stays ``received`` and the sweeper
publishes it later, so a submission is never lost between the store and the queue.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable

from .celery_app import QUEUES, TASK_NAME
from .db import utcnow
from .jobs import JobStore

__all__ = ["Enqueuer", "Sweeper", "sweep_once", "reconcile_once"]

log = logging.getLogger("spectdose.service.queue")

_RECEIVED_GRACE_S = 5.0  # a job just stored is being published by its creator
_PRIORITY_SEP = "\x06\x16"  # kombu's Redis priority queues are "<queue>\x06\x16<priority>"


def _job_of(message: bytes | str | dict, task: str = TASK_NAME) -> str | None:
    """The job id a Celery message of ``task`` carries (first task argument), or None if it is not one."""
    try:
        msg = json.loads(message) if isinstance(message, (bytes, str)) else message
        if msg.get("headers", {}).get("task") != task:
            return None
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


class Enqueuer:
    """Publishes the task of a job and records it as queued."""

    def __init__(self, celery_app, store: JobStore):
        self.app = celery_app
        self.store = store

    def _redis(self):
        import redis

        url = self.app.conf.broker_url
        if url.startswith("redis+socket://"):
            url = "unix://" + url[len("redis+socket://"):]
        return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    def ping(self) -> bool:
        """True when the broker answers (raises otherwise)."""
        with self._redis() as client:
            return bool(client.ping())

    def queue_lengths(self) -> dict[str, int]:
        """Tasks waiting per queue (kombu keeps each Redis queue as a list named after it)."""
        with self._redis() as client:
            return {q: int(client.llen(q)) for q in QUEUES}

    def broker_job_ids(self, task: str = TASK_NAME) -> set[str]:
        """Job ids that have a message in the broker: waiting in a queue, or delivered and unacked.

        kombu keeps each queue as a Redis list (plus priority lists) and a delivered message in
        the ``unacked`` hash until the task acknowledges it (acks_late), retries with a countdown
        included; a job in neither has no message and would wait forever.
        """
        ids: set[str] = set()
        with self._redis() as client:
            for queue in QUEUES:
                keys = [queue, *client.scan_iter(match=f"{queue}{_PRIORITY_SEP}*", count=100)]
                for key in keys:
                    ids.update(filter(None, (_job_of(m, task) for m in client.lrange(key, 0, -1))))
            for raw in client.hvals("unacked"):
                with contextlib.suppress(ValueError, TypeError, IndexError):
                    ids.add(_job_of(json.loads(raw)[0], task))
        ids.discard(None)
        return ids

    def submit(self, job_id: str, queue: str, *, resend: bool = False) -> bool:
        """Publish ``job_id`` on ``queue``; False (job left for the sweeper) if the broker fails."""
        try:
            self.app.send_task(TASK_NAME, args=[job_id], queue=queue, routing_key=queue)
        except Exception as exc:  # noqa: BLE001 - kombu/redis raise many types; all mean "not published"
            log.warning("job %s: could not publish to queue %s (%s: %s); the sweeper will retry",
                        job_id, queue, type(exc).__name__, exc)
            return False
        if not self.store.mark_queued(job_id) and resend:
            self.store.touch_queued(job_id)
        return True

    def submit_cycle(self, result_id: str) -> bool:
        """Publish cycle result ``result_id`` (``service.cycles``) on the job queue; False if the broker fails."""
        from .cycles import CYCLE_TASK_NAME, mark_result_queued

        queue = getattr(getattr(self.app, "spectdose_settings", None), "job_queue", "cpu")
        try:
            self.app.send_task(CYCLE_TASK_NAME, args=[result_id], queue=queue, routing_key=queue)
        except Exception as exc:  # noqa: BLE001 - as submit()
            log.warning("cycle result %s: could not publish to queue %s (%s: %s); the sweeper will retry",
                        result_id, queue, type(exc).__name__, exc)
            return False
        mark_result_queued(self.store, result_id, resend=True)
        return True


def sweep_once(store: JobStore, enqueuer: Enqueuer, *, lease_s: float, visibility_timeout_s: float,
               now: dt.datetime | None = None) -> dict[str, int]:
    """One pass: publish stored-but-unpublished jobs, requeue lost ones, republish stuck ones.

    - ``received`` for more than a few seconds: its publication failed (broker down, crash).
    - ``running`` with a heartbeat older than ``lease_s``: its worker died; requeued.
    - ``queued`` for longer than the visibility timeout: its message may have been lost
      with a Redis that keeps nothing on disk; republished (a duplicate is claimed once).
    """
    now = now or utcnow()
    received, lost, waiting = store.jobs_to_sweep(
        received_before=now - dt.timedelta(seconds=_RECEIVED_GRACE_S),
        heartbeat_before=now - dt.timedelta(seconds=lease_s),
        queued_before=now - dt.timedelta(seconds=visibility_timeout_s),
    )
    counts = {"published": 0, "requeued_lost": 0, "republished": 0}
    for job_id in received:
        job = store.get(job_id)
        if job is not None and enqueuer.submit(job_id, job.queue):
            counts["published"] += 1
    for job_id in lost:
        reason = f"worker lost (no heartbeat for {lease_s:.0f} s); requeued"
        if store.requeue_if_stale(job_id, lease_s=lease_s, reason=reason):
            log.warning("job %s: %s", job_id, reason)
            store.audit("sweeper", "job_requeued", job_id=job_id, why="lost worker")
            job = store.get(job_id)
            if job is not None and enqueuer.submit(job_id, job.queue, resend=True):
                counts["requeued_lost"] += 1
    for job_id in waiting:
        job = store.get(job_id)
        if job is not None and enqueuer.submit(job_id, job.queue, resend=True):
            counts["republished"] += 1
    counts |= _sweep_cycle_results(store, enqueuer, lease_s=lease_s, visibility_timeout_s=visibility_timeout_s, now=now)
    return counts


def _sweep_cycle_results(store: JobStore, enqueuer: Enqueuer, *, lease_s: float, visibility_timeout_s: float,
                         now: dt.datetime) -> dict[str, int]:
    """The same three rules for cycle results (``service.cycles``): a cycle integration is as durable as a dose job."""
    from . import cycles

    received, lost, waiting = cycles.results_to_sweep(
        store, received_before=now - dt.timedelta(seconds=_RECEIVED_GRACE_S),
        heartbeat_before=now - dt.timedelta(seconds=lease_s),
        queued_before=now - dt.timedelta(seconds=visibility_timeout_s))
    counts = {"cycle_published": 0, "cycle_requeued_lost": 0, "cycle_republished": 0}
    for result_id in received:
        counts["cycle_published"] += enqueuer.submit_cycle(result_id)
    for result_id in lost:
        reason = f"worker lost (no heartbeat for {lease_s:.0f} s); requeued"
        if cycles.requeue_result_if_stale(store, result_id, lease_s=lease_s, reason=reason):
            log.warning("cycle result %s: %s", result_id, reason)
            store.audit("sweeper", "cycle_result_requeued", result_id=result_id, why="lost worker")
            counts["cycle_requeued_lost"] += enqueuer.submit_cycle(result_id)
    for result_id in waiting:
        counts["cycle_republished"] += enqueuer.submit_cycle(result_id)
    return counts


def reconcile_once(store: JobStore, enqueuer: Enqueuer, *, grace_s: float, now: dt.datetime | None = None) -> int:
    """Republish every ``queued`` job (older than ``grace_s``) that has no message in the broker.

    A Redis restarted without its data, or a disk-full episode that lost its append-only
    file, leaves the job store saying "queued" over an empty queue; without this, such jobs
    waited for the visibility timeout. A duplicate message is harmless: a job is claimed once.
    Returns how many were republished.
    """
    now = now or utcnow()
    epoch = dt.datetime(1970, 1, 1)
    queued = store.jobs_to_sweep(received_before=epoch, heartbeat_before=epoch,
                                 queued_before=now - dt.timedelta(seconds=grace_s))[2]
    n_cycles = _reconcile_cycle_results(store, enqueuer, grace_s=grace_s, now=now)
    if not queued:
        return n_cycles
    present = enqueuer.broker_job_ids()  # read after the job list: a message consumed meanwhile is not missed
    n = 0
    for job_id in queued:
        if job_id in present:
            continue
        job = store.get(job_id)
        if job is None or job.state != "queued":
            continue
        if enqueuer.submit(job_id, job.queue, resend=True):
            n += 1
            log.warning("job %s was queued with no message in the broker: republished", job_id)
            store.audit("sweeper", "job_republished", job_id=job_id, why="no message in the broker")
    return n + n_cycles


def _reconcile_cycle_results(store: JobStore, enqueuer: Enqueuer, *, grace_s: float, now: dt.datetime) -> int:
    """Republish every ``queued`` cycle result (older than ``grace_s``) without a message in the broker."""
    from . import cycles

    epoch = dt.datetime(1970, 1, 1)
    queued = cycles.results_to_sweep(store, received_before=epoch, heartbeat_before=epoch,
                                     queued_before=now - dt.timedelta(seconds=grace_s))[2]
    if not queued:
        return 0
    present = enqueuer.broker_job_ids(cycles.CYCLE_TASK_NAME)
    n = 0
    for result_id in queued:
        if result_id in present:
            continue
        row = cycles.get_result(store, result_id)
        if row is None or row.state != "queued":
            continue
        if enqueuer.submit_cycle(result_id):
            n += 1
            log.warning("cycle result %s was queued with no message in the broker: republished", result_id)
            store.audit("sweeper", "cycle_result_republished", result_id=result_id, why="no message in the broker")
    return n


class Sweeper(threading.Thread):
    """Runs :func:`sweep_once` every ``interval_s`` (first at start), :func:`reconcile_once` every
    ``reconcile_interval_s`` (first at start) and ``purge`` (retention) every ``purge_interval_s``."""

    def __init__(self, store: JobStore, enqueuer: Enqueuer, *, interval_s: float, lease_s: float,
                 visibility_timeout_s: float, reconcile_interval_s: float | None = None,
                 purge: Callable[[], object] | None = None, purge_interval_s: float = 3600.0):
        super().__init__(name="spectdose-sweeper", daemon=True)
        self.store, self.enqueuer = store, enqueuer
        self.interval_s, self.lease_s, self.visibility_timeout_s = interval_s, lease_s, visibility_timeout_s
        self.reconcile_interval_s = reconcile_interval_s
        self.purge, self.purge_interval_s = purge, purge_interval_s
        self._stop_event = threading.Event()

    def _due(self, last: float | None, every: float | None) -> bool:
        return every is not None and (last is None or time.monotonic() - last >= every)

    def run(self) -> None:
        last_reconcile = last_purge = None
        while True:
            try:
                counts = sweep_once(self.store, self.enqueuer, lease_s=self.lease_s,
                                    visibility_timeout_s=self.visibility_timeout_s)
                if self._due(last_reconcile, self.reconcile_interval_s):
                    last_reconcile = time.monotonic()
                    counts["republished_missing"] = reconcile_once(self.store, self.enqueuer,
                                                                   grace_s=min(self.reconcile_interval_s, 5.0))
                if any(counts.values()):
                    log.info("sweeper: %s", counts)
            except Exception as exc:  # noqa: BLE001 - a failed pass (DB or broker restarting) must not end the thread
                log.warning("sweeper pass failed (%s: %s); retrying in %.0f s", type(exc).__name__, exc,
                            self.interval_s)
            if self.purge is not None and self._due(last_purge, self.purge_interval_s):
                last_purge = time.monotonic()
                try:
                    self.purge()
                except Exception:  # noqa: BLE001
                    log.exception("retention purge failed; retrying in %.0f s", self.purge_interval_s)
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop_event.set()

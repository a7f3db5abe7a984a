"""Putting jobs on the Celery queue, and the sweeper that repairs what a crash left behind.

A job is stored (``received``) before its task is published; publishing then moves it to
``queued``. If the broker is down the job simply stays ``received`` and the sweeper
publishes it later, so a submission is never lost between the store and the queue.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from .db import utcnow
from .jobs import JobStore

__all__ = ["Enqueuer", "Sweeper", "sweep_once"]

log = logging.getLogger("spectdose.service.queue")

_TASK_NAME = "spectdose.process_job"  # worker.app.TASK_NAME (not imported: no cycle)
_RECEIVED_GRACE_S = 5.0  # a job just stored is being published by its creator


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
            return {q: int(client.llen(q)) for q in ("gpu", "cpu")}

    def submit(self, job_id: str, queue: str, *, resend: bool = False) -> bool:
        """Publish ``job_id`` on ``queue``; False (job left for the sweeper) if the broker fails."""
        try:
            self.app.send_task(_TASK_NAME, args=[job_id], queue=queue, routing_key=queue)
        except Exception as exc:  # noqa: BLE001 - kombu/redis raise many types; all mean "not published"
            log.warning("job %s: could not publish to queue %s (%s: %s); the sweeper will retry",
                        job_id, queue, type(exc).__name__, exc)
            return False
        if not self.store.mark_queued(job_id) and resend:
            self.store.touch_queued(job_id)
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
    return counts


class Sweeper(threading.Thread):
    """Runs :func:`sweep_once` every ``interval_s`` until stopped."""

    def __init__(self, store: JobStore, enqueuer: Enqueuer, *, interval_s: float, lease_s: float,
                 visibility_timeout_s: float):
        super().__init__(name="spectdose-sweeper", daemon=True)
        self.store, self.enqueuer = store, enqueuer
        self.interval_s, self.lease_s, self.visibility_timeout_s = interval_s, lease_s, visibility_timeout_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                counts = sweep_once(self.store, self.enqueuer, lease_s=self.lease_s,
                                    visibility_timeout_s=self.visibility_timeout_s)
                if any(counts.values()):
                    log.info("sweeper: %s", counts)
            except Exception:  # noqa: BLE001 - a failed pass (DB restarting) must not end the thread
                log.exception("sweeper pass failed; retrying in %.0f s", self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()

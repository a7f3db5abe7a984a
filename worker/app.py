"""Celery on Redis: the broker settings that make a lost or killed worker safe.

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a task is acknowledged only when it
  has finished; if the process running it dies, the message goes back to the queue.
- ``visibility_timeout`` above the hard time limit: Redis redelivers an unacknowledged
  task only after the longest job could have finished, never while it still runs.
- ``worker_prefetch_multiplier = 1``: a worker holds one job at a time, so a dose
  calculation never waits behind another on a busy worker while others are idle.
- Two queues, ``gpu`` and ``cpu``; GPU workers consume both, CPU workers only ``cpu``.

The job store, not Celery's result backend, holds state and progress, so no backend is set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

from celery import Celery, signals
from kombu import Queue

from service.config import Settings, load_settings
from service.jobs import JobStore
from service.queue import Enqueuer, reconcile_once
from service.storage import Storage

__all__ = ["make_celery", "Runtime", "runtime", "TASK_NAME", "QUEUES"]

log = logging.getLogger("spectdose.worker")

TASK_NAME = "spectdose.process_job"
QUEUES = ("gpu", "cpu")


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``; importing :mod:`worker.tasks` registers the task."""
    app = Celery("spectdose", broker=settings.redis_url, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        task_queues=tuple(Queue(q, routing_key=q) for q in QUEUES),
        task_default_queue="cpu",
        task_create_missing_queues=False,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
        },
        broker_connection_timeout=5,
        broker_connection_retry_on_startup=True,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_heartbeat=0,
    )
    app.spectdose_settings = settings
    return app


@dataclasses.dataclass
class Runtime:
    """What a worker process needs, built once per process (after the prefork fork)."""

    settings: Settings
    store: JobStore
    storage: Storage
    enqueuer: Enqueuer


_runtime: Runtime | None = None
_runtime_pid: int | None = None
_runtime_lock = threading.Lock()


def runtime(settings: Settings | None = None) -> Runtime:
    """This process's runtime; rebuilt in a forked child so no DB connection is shared."""
    global _runtime, _runtime_pid
    with _runtime_lock:
        if _runtime is None or _runtime_pid != os.getpid():
            settings = settings or load_settings()
            store = JobStore(settings.db_url)
            _runtime = Runtime(settings, store, Storage(settings.data_dir), Enqueuer(make_celery(settings), store))
            _runtime_pid = os.getpid()
        return _runtime


@signals.worker_ready.connect
def _requeue_own_jobs(sender=None, **_kwargs) -> None:
    """A worker that restarts after being killed takes back the jobs it held, at once.

    Without this they would wait for their heartbeat to go stale (the gateway's sweeper)
    or for Redis's visibility timeout. Duplicate deliveries are harmless: a job is claimed
    once (see :meth:`service.jobs.JobStore.claim`).
    """
    hostname = getattr(sender, "hostname", None)
    if not hostname:
        return
    rt = runtime()
    for job_id in rt.store.requeue_of_worker(hostname):
        log.warning("job %s was running on %s before it restarted: requeued", job_id, hostname)
        job = rt.store.get(job_id)
        rt.enqueuer.submit(job_id, job.queue if job else "cpu", resend=True)
    # A worker (re)start also repairs a broker that lost its data: queued jobs without a
    # message are republished now, not at the gateway's next reconcile pass.
    try:
        reconcile_once(rt.store, rt.enqueuer, grace_s=5.0)
    except Exception as exc:  # noqa: BLE001 - the gateway's sweeper tries again
        log.warning("start-up reconcile failed (%s: %s)", type(exc).__name__, exc)


_module_app: Celery | None = None


@signals.task_failure.connect
def _hard_time_limit(sender=None, task_id=None, exception=None, args=None, **_kwargs) -> None:
    """A job killed at the hard time limit fails at once with a reason (the pool process
    that would have recorded it is gone; without this, its lease would lapse and the job
    would be retried until max_attempts)."""
    from billiard.exceptions import TimeLimitExceeded

    if isinstance(exception, TimeLimitExceeded) and args:
        rt = runtime()
        rt.store.fail(str(args[0]), f"killed at the hard time limit of {rt.settings.task_time_limit_s} s")


def __getattr__(name: str):
    """``celery -A worker.app`` finds ``app``, built from the environment on first use."""
    global _module_app
    if name in ("app", "celery"):
        if _module_app is None:
            _module_app = make_celery(load_settings())
        return _module_app
    raise AttributeError(name)

"""The worker process: the Celery app (``celery -A worker.app``) and its signal handlers.

The broker settings, task name and queues are :mod:`service.celery_app`'s; the context
(settings, job store, storage, publisher) is :mod:`service.context`'s; the delivery
guarantees (late acknowledgement, visibility timeout, one job per worker, cpu/gpu queues)
are explained in :mod:`service.celery_app`.
"""

from __future__ import annotations

import logging

from celery import Celery, signals

from service.celery_app import make_celery
from service.config import load_settings
from service.context import process_context
from service.queue import reconcile_once

__all__: list[str] = []  # `app` (and `celery`) come from __getattr__ below

log = logging.getLogger("spectdose.worker")


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
    rt = process_context()
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
        rt = process_context()
        rt.store.fail(str(args[0]), f"killed at the hard time limit of {rt.settings.task_time_limit_s} s")


def __getattr__(name: str):
    """``celery -A worker.app`` finds ``app``, built from the environment on first use."""
    global _module_app
    if name in ("app", "celery"):
        if _module_app is None:
            _module_app = make_celery(load_settings())
        return _module_app
    raise AttributeError(name)

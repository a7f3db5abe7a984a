"""The Celery task: a job id in, the job processed once; operational settings in the decorator."""

from __future__ import annotations

from celery import shared_task

from service.celery_app import TASK_NAME
from service.context import process_context

from . import app as _app  # noqa: F401 - the worker's signal handlers, connected on import
from .execute import TransientFailure, run_job

__all__ = ["process_job"]


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def process_job(self, job_id: str) -> dict:
    """Compute, publish and export ``job_id``; a redelivered message for a finished job does nothing."""
    rt = process_context()
    try:
        return run_job(rt.store, rt.storage, rt.settings, job_id, worker=self.request.hostname or "worker")
    except TransientFailure as exc:
        # Bounded by the job store's failure count (Settings.max_retries), not by Celery's.
        queue = (self.request.delivery_info or {}).get("routing_key")  # back on the queue it came from
        raise self.retry(countdown=exc.delay_s, max_retries=None, exc=exc, queue=queue) from exc

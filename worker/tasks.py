"""The Celery tasks: a job id in, the job processed once; a region set id in, applied once.

Operational settings in the decorators.
"""

from __future__ import annotations

from celery import shared_task

from service.celery_app import TASK_NAME
from service.context import process_context
from service.intake import REGIONS_TASK_NAME

from . import app as _app  # noqa: F401 - the worker's signal handlers, connected on import
from .execute import TransientFailure, run_job, run_region_set

__all__ = ["process_job", "process_region_set"]


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


@shared_task(name=REGIONS_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def process_region_set(self, region_set_id: str) -> dict:
    """Region statistics of a set received after the dose, on the stored dose; new objects exported."""
    rt = process_context()
    try:
        return run_region_set(rt.store, rt.storage, rt.settings, region_set_id,
                              worker=self.request.hostname or "worker")
    except TransientFailure as exc:
        # Bounded by the region set's attempt count (Settings.max_retries).
        queue = (self.request.delivery_info or {}).get("routing_key")
        raise self.retry(countdown=exc.delay_s, max_retries=None, exc=exc, queue=queue) from exc

"""Celery on Redis: the one app factory, task name and queue names, for publisher and worker.

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a task is acknowledged only when it
  has finished; if the process running it dies, the message goes back to the queue.
- ``visibility_timeout`` above the hard time limit: Redis redelivers an unacknowledged
  task only after the longest job could have finished, never while it still runs.
- ``worker_prefetch_multiplier = 1``: a worker holds one job at a time, so a dose
  calculation never waits behind another on a busy worker while others are idle.
- Two queues, ``gpu`` and ``cpu``; GPU workers consume both, CPU workers only ``cpu``.

The job store, not Celery's result backend, holds state and progress, so no backend is set.
The gateway and the DICOM node only publish with this app; the task itself is registered by
``worker.tasks`` (named here as a module path, so this package never imports the worker).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from .config import Settings

__all__ = ["make_celery", "TASK_NAME", "QUEUES", "TASK_MODULE", "WORKER_MODULE"]

TASK_NAME = "spectdose.process_job"
QUEUES = ("gpu", "cpu")
TASK_MODULE = "worker.tasks"  # imported by a worker process only
WORKER_MODULE = "worker.app"  # its signal handlers; imported by `spectdose worker` before it starts


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``; a worker imports :data:`TASK_MODULE`, which registers the task."""
    app = Celery("spectdose", broker=settings.redis_url, include=[TASK_MODULE, "worker.cycle_tasks"])  # + cycle jobs
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

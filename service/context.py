"""The one service context: settings, job store, data directory and queue publisher.

The gateway, the DICOM node and the worker all run on it. A gateway or node builds it
once at start (:func:`build_context`); a worker process takes it from
:func:`process_context`, which builds it again in a forked child so that no database
connection is shared across a fork (Celery's prefork pool).
"""

from __future__ import annotations

import dataclasses
import os
import threading

from .celery_app import make_celery
from .config import Settings, load_settings
from .jobs import JobStore
from .queue import Enqueuer
from .storage import Storage

__all__ = ["ServiceContext", "build_context", "process_context"]


@dataclasses.dataclass
class ServiceContext:
    """What every route, DICOM handler and task needs, built once per process."""

    settings: Settings
    store: JobStore
    storage: Storage
    enqueuer: Enqueuer


def build_context(settings: Settings) -> ServiceContext:
    """Job store, data directory and queue publisher for ``settings``."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.db_url)
    return ServiceContext(settings, store, Storage(settings.data_dir), Enqueuer(make_celery(settings), store))


_process_context: ServiceContext | None = None
_process_pid: int | None = None
_process_lock = threading.Lock()


def process_context(settings: Settings | None = None) -> ServiceContext:
    """This process's context (settings from the environment unless given); rebuilt in a forked child."""
    global _process_context, _process_pid
    with _process_lock:
        if _process_context is None or _process_pid != os.getpid():
            _process_context = build_context(settings or load_settings())
            _process_pid = os.getpid()
        return _process_context

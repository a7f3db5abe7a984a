"""The Celery worker: broker settings (app) and the one task that runs a job (tasks)."""

__all__: list[str] = []

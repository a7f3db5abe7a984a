"""The cycle job: a cycle result's time points integrated with ``spectdose.cycle.run_cycle``, then exported.

Made and queued by :func:`service.cycles.time_point_done` when a cycle gains a time point.
Like a dose job it is claimed with a fencing attempt number, renews a heartbeat, computes
into a fresh work folder published whole (``DATA_DIR/cycles/<cycle>/<result>/output``), and
exports only what is not yet sent; a retry after a failed export only exports. Failure
classes as in :mod:`worker.execute`: a :class:`~spectdose.errors.SpectdoseError` fails the
result with its message; anything else is retried a bounded number of times.

A time point whose CT registration fails its quality check is left out (and rejected from
the cycle, with the figures); the others are integrated if at least two remain. Only the
newest result of a cycle is sent to the PACS, under the job id of the time point whose
arrival made it (its export records and own-output records are that job's).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from celery import shared_task, signals
from celery.exceptions import SoftTimeLimitExceeded

from service import cycles
from service.config import Settings
from service.context import process_context
from service.diskguard import DISK_FULL_NAME, is_disk_full
from service.export import OutputFile, export_outputs
from service.jobs import JobStore
from service.storage import Storage, folder_manifest, publish_folder

from . import app as _app  # noqa: F401 - the worker's signal handlers, connected on import
from .execute import Heartbeat, LeaseLost, TransientFailure, dose_options, region_inputs_of

__all__ = ["process_cycle", "run_cycle_job"]

log = logging.getLogger("spectdose.worker.cycles")

# Outputs of a cycle result sent to the PACS: the cycle RT Dose and the effective half-life map.
_SENT_KINDS = {"rtdose": "cycle_rtdose", "effective_half_life": "cycle_teff"}
_REGISTRATION_LABEL = re.compile(r"time point t(\d+):")


def _excerpt(summary: dict, by_path: dict[str, str]) -> dict:
    """What the job store keeps of a cycle summary: UIDs, time points used (by job), regions, warnings."""
    def job_of(path: str) -> str | None:
        return next((j for p, j in by_path.items() if path.startswith(p)), None)

    regions = [{k: r.get(k) for k in ("region", "volume_ml", "absorbed_dose_gy", "bed_gy", "effective_half_life_h",
                                      "coverage")}
               | {"model": (r.get("fit") or {}).get("model")} for r in summary.get("regions") or []]
    return {
        "uids": summary.get("uids") or {},
        "time_points": [{"job_id": job_of(tp["path"]), "index": tp["index"], "hours": tp["hours"],
                         "study_instance_uid": tp["study_instance_uid"],
                         "registration": tp.get("registration")} for tp in summary.get("time_points") or []],
        "regions": regions,
        "regions_not_reported": [{k: r.get(k) for k in ("region", "volume_ml", "spect_coverage_per_time_point",
                                                        "reason")} for r in summary.get("regions_not_reported") or []],
        "administration": summary.get("administration"),
        "method": summary.get("method"),
        "software": summary.get("software"),
        "warnings": list(summary.get("warnings") or []),
        "dose": summary.get("dose"),
    }


def _compute(store: JobStore, storage: Storage, settings: Settings, row, attempt: int, hb: Heartbeat,
             base: Path) -> dict:
    """run_cycle over the result's time points; a time point failing registration is left out."""
    from spectdose.cycle import run_cycle
    from spectdose.timeseries import RegistrationError

    cycle = cycles.get_cycle(store, row.cycle_id)
    options = dose_options(cycle.options if cycle else {}, settings)
    excluded = list(row.excluded or [])
    points = [tp for tp in cycles.joined_time_points(store, list(row.time_points))
              if tp.job_id not in {e["job_id"] for e in excluded}]
    for tp in list(points):
        if not storage.job_input(tp.job_id).is_dir():
            why = ("its stored input is gone (removed by retention, SPECTDOSE_RETAIN_INPUTS_DAYS): it cannot be "
                   "integrated again")
            excluded.append({"job_id": tp.job_id, "reason": why})
            cycles.reject_time_point(store, tp.job_id, why)
            points.remove(tp)

    def progress(stage: str, fraction: float) -> None:
        if hb.lost.is_set() or not cycles.result_heartbeat(store, row.id, attempt, stage):
            raise LeaseLost(f"cycle result {row.id} attempt {attempt} was taken over")

    while True:
        if len(points) < 2:
            raise _NotEnough(excluded)
        if not cycles.set_excluded(store, row.id, attempt, excluded):
            raise LeaseLost(f"cycle result {row.id} attempt {attempt} was taken over")
        paths = [storage.job_input(tp.job_id) for tp in points]
        regions, _ = region_inputs_of(store, paths[0])  # the reference time point's, not our own returned
        if regions is not None:
            import dataclasses

            options = dataclasses.replace(options, regions_path=regions)
        work = base / f"work-{attempt}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        try:
            result = run_cycle(paths, work, options, progress=progress)
        except RegistrationError as exc:
            match = _REGISTRATION_LABEL.search(str(exc))
            shutil.rmtree(work, ignore_errors=True)
            if match is None or not (1 < int(match.group(1)) <= len(points)):
                raise
            bad = points[int(match.group(1)) - 1]  # run_cycle labels time points in time order, as here
            why = f"left out: {exc}"
            log.info("cycle result %s: time point job %s failed its registration check; left out", row.id, bad.job_id)
            excluded.append({"job_id": bad.job_id, "reason": why})
            cycles.reject_time_point(store, bad.job_id, why)
            points.remove(bad)
            continue
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        by_path = {str(storage.job_input(tp.job_id)): tp.job_id for tp in points}
        excerpt = _excerpt(result.summary, by_path)
        files: dict = {}
        for kind, path in result.outputs.items():
            entry = {"file": path.name}
            if kind in _SENT_KINDS:
                uids = result.summary["uids"][kind]
                import pydicom

                entry |= {"sop_instance_uid": uids["sop_instance_uid"],
                          "series_instance_uid": uids["series_instance_uid"],
                          "sop_class_uid": str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)}
            files[kind] = entry
        manifest = {"attempt": attempt, "files": files, "used": [tp.job_id for tp in points], "excluded": excluded,
                    "result": excerpt}
        if hb.lost.is_set() or not cycles.result_heartbeat(store, row.id, attempt, "publishing"):
            shutil.rmtree(work, ignore_errors=True)
            raise LeaseLost(f"cycle result {row.id} attempt {attempt} was taken over before publishing")
        publish_folder(work, base / "output", manifest)
        return manifest


class _NotEnough(Exception):
    def __init__(self, excluded: list[dict]):
        reasons = "; ".join(f"job {e['job_id']}: {e['reason']}" for e in excluded) or "none"
        super().__init__(f"fewer than 2 time points left to integrate (left out: {reasons})")


def run_cycle_job(store: JobStore, storage: Storage, settings: Settings, result_id: str, *, worker: str,
                  sleep=None) -> dict:
    """Process cycle result ``result_id`` once; raises :class:`TransientFailure` to retry later."""
    from spectdose.errors import SpectdoseError

    cycles.ensure_tables(store)
    row = cycles.claim_result(store, result_id, worker, lease_s=settings.lease_s,
                               max_attempts=settings.max_attempts)
    if row is None:
        current = cycles.get_result(store, result_id)
        state = current.state if current else "unknown"
        log.info("cycle result %s not claimed (state %s): nothing to do", result_id, state)
        return {"result_id": result_id, "skipped": state}
    attempt = row.attempt
    base = cycles.result_dir(storage, row.cycle_id, result_id)
    base.mkdir(parents=True, exist_ok=True)
    log.info("cycle result %s (cycle %s): attempt %d on %s", result_id, row.cycle_id, attempt, worker)
    hb = Heartbeat(lambda: cycles.result_heartbeat(store, result_id, attempt), f"cycle result {result_id}",
                   settings.heartbeat_s)
    hb.start()
    try:
        manifest = folder_manifest(base / "output")
        if manifest is None:
            manifest = _compute(store, storage, settings, row, attempt, hb, base)
        for p in base.glob("work-*"):
            shutil.rmtree(p, ignore_errors=True)
        out = base / "output"
        trigger = store.get(row.trigger_job_id)
        sent = [OutputFile(_SENT_KINDS[k], out / e["file"], e["sop_instance_uid"], e["sop_class_uid"])
                for k, e in manifest["files"].items() if k in _SENT_KINDS]
        store.record_outputs(row.trigger_job_id, [
            {"sop_instance_uid": f.sop_instance_uid, "kind": f.kind, "sop_class_uid": f.sop_class_uid,
             "series_instance_uid": manifest["files"][k]["series_instance_uid"]}
            for k, f in zip([k for k in manifest["files"] if k in _SENT_KINDS], sent, strict=True)])
        destinations = list(trigger.export) if trigger is not None else []
        export_note = None
        if cycles.is_newest(store, result_id) and (destinations or settings.stow_url):
            # Only the newest result goes to the PACS; an older one finishing late stays stored, superseded.
            if not cycles.result_heartbeat(store, result_id, attempt, "export"):
                raise LeaseLost(f"cycle result {result_id} attempt {attempt} was taken over before exporting")
            failures = export_outputs(store, settings, row.trigger_job_id, destinations=destinations,
                                      calling_aet=trigger.calling_aet if trigger else None, files=sent,
                                      **({"sleep": sleep} if sleep else {}))
            if failures:
                message = "; ".join(f"{f.destination}: {f.message}" for f in failures)
                if not any(f.permanent for f in failures):
                    raise OSError(f"export failed: {message}")
                export_note = f"cycle dose computed, but export failed: {message}"
        outputs = {k: e["file"] for k, e in manifest["files"].items()}
        if not cycles.finish_result(store, result_id, attempt, outputs=outputs, result=manifest["result"],
                                    used=manifest["used"], note=export_note):
            raise LeaseLost(f"cycle result {result_id} attempt {attempt} was taken over before finishing")
        log.info("cycle result %s done: %d time points", result_id, len(manifest["used"]))
        return {"result_id": result_id, "state": "done", "attempt": attempt}
    except LeaseLost as exc:
        log.warning("%s; leaving it to the new owner", exc)
        return {"result_id": result_id, "skipped": "taken over"}
    except _NotEnough as exc:
        cycles.fail_result(store, result_id, str(exc), attempt=attempt)
        return {"result_id": result_id, "state": "failed", "reason": str(exc)}
    except SpectdoseError as exc:
        cycles.fail_result(store, result_id, str(exc), attempt=attempt)
        log.info("cycle result %s failed: %s", result_id, type(exc).__name__)
        return {"result_id": result_id, "state": "failed", "reason": str(exc)}
    except Exception as exc:
        if isinstance(exc, SoftTimeLimitExceeded):
            reason = f"exceeded the time limit of {settings.task_soft_time_limit_s} s"
            cycles.fail_result(store, result_id, reason, attempt=attempt)
            return {"result_id": result_id, "state": "failed", "reason": reason}
        disk_full = is_disk_full(exc)
        reason = f"{DISK_FULL_NAME} ({type(exc).__name__})" if disk_full else f"{type(exc).__name__}: {exc}"
        failures = cycles.retry_result_later(store, result_id, attempt, f"transient error, will retry: {reason}")
        if failures is None:
            return {"result_id": result_id, "skipped": "taken over"}
        if failures > settings.max_retries:
            cycles.fail_result(store, result_id, f"gave up after {failures} transient failures; last: {reason}")
            return {"result_id": result_id, "state": "failed", "reason": reason}
        delay = settings.disk_retry_after_s if disk_full else settings.retry_backoff_s * 2 ** (failures - 1)
        log.warning("cycle result %s: transient failure %d/%d (%s); retry in %.0f s", result_id, failures,
                    settings.max_retries, type(exc).__name__, delay)
        raise TransientFailure(reason, delay) from exc
    finally:
        hb.stop()


@shared_task(name=cycles.CYCLE_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def process_cycle(self, result_id: str) -> dict:
    """Integrate and export cycle result ``result_id``; a redelivered message for a finished one does nothing."""
    rt = process_context()
    try:
        return run_cycle_job(rt.store, rt.storage, rt.settings, result_id, worker=self.request.hostname or "worker")
    except TransientFailure as exc:
        queue = (self.request.delivery_info or {}).get("routing_key")
        raise self.retry(countdown=exc.delay_s, max_retries=None, exc=exc, queue=queue) from exc


@signals.worker_ready.connect
def _requeue_own_cycle_results(sender=None, **_kwargs) -> None:
    """A worker restarting under its name takes back at once the cycle results it was running (as dose jobs,
    worker/app.py); without this they wait for their lease to lapse and the gateway's sweeper."""
    hostname = getattr(sender, "hostname", None)
    if not hostname:
        return
    rt = process_context()
    try:
        for result_id in cycles.requeue_results_of_worker(rt.store, hostname):
            log.warning("cycle result %s was running on %s before it restarted: requeued", result_id, hostname)
            rt.enqueuer.submit_cycle(result_id)
    except Exception as exc:  # noqa: BLE001 - the gateway's sweeper does it after the lease
        log.warning("start-up requeue of cycle results failed (%s: %s)", type(exc).__name__, exc)


@signals.task_failure.connect
def _hard_time_limit(sender=None, exception=None, args=None, **_kwargs) -> None:
    """A cycle job killed at the hard time limit fails at once with a reason (as dose jobs do, worker/app.py)."""
    from billiard.exceptions import TimeLimitExceeded

    if getattr(sender, "name", None) == cycles.CYCLE_TASK_NAME and isinstance(exception, TimeLimitExceeded) and args:
        rt = process_context()
        cycles.fail_result(rt.store, str(args[0]), f"killed at the hard time limit of {rt.settings.task_time_limit_s} s")

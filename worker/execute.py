"""What a worker does with one job: claim, compute (once), publish, export, finish.

Kept apart from the Celery task so it reads as a plain function of a job id. Failure
classes (:func:`is_transient`): a :class:`~spectdose.errors.SpectdoseError` is the study's fault
and final (the job fails with its message), and so is any other error that the same input
would raise again (``ValueError``, ``KeyError``, ...: failed once, with its message); only disk,
network, broker, job-store and memory faults are transient and retried a bounded number of
times with a doubling delay.

Every DICOM object among the outputs goes back (RT Dose, map, SEG, RT Structure Set, SR and any
later one), in :func:`export_order`. Region sets in the job's input (a SEG or RT Structure Set
sent with the study) are the job's regions instead of automatic lesions
(:func:`region_inputs_of`); one that arrives after the dose is a *region set* of the finished
job (:func:`run_region_set`): statistics again on the stored dose, new objects beside the result.

A job on a study that already has a result from other input content, other options or
another software version *replaces* it: the worker records which series and why, and
the new result (new UIDs) says so. A finished job carries what its result says about
itself (engine, software, warnings, output UIDs); every warning is also logged once.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
from celery.exceptions import SoftTimeLimitExceeded
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ParametricMapStorage,
    RTDoseStorage,
    RTStructureSetStorage,
    SegmentationStorage,
)

from service.config import Settings
from service.cycles import time_point_done
from service.diskguard import DISK_FULL_NAME, is_disk_full
from service.export import OutputFile, export_outputs
from service.jobs import JobStore
from service.storage import Storage, folder_manifest, publish_folder

__all__ = ["run_job", "dose_options", "is_transient", "deterministic_reason", "build_manifest", "result_of", "find_replaced", "LeaseLost", "TransientFailure",
           "Heartbeat",
           "Outcome", "export_order", "output_files", "region_inputs_of", "run_region_set", "regions_dir"]

log = logging.getLogger("spectdose.worker")

# Every output file with this suffix is a DICOM object: recorded as ours and sent back.
_DICOM_SUFFIX = ".dcm"
# The outputs a recomputation replaces (series marked CORRECTED): the ones that carry the dose.
_REPLACED_KINDS = ("rtdose", "doserate")
# Export order by SOP Class: the dose first, then what references it (PS3.4 B.5); any other class last.
_EXPORT_RANK = {
    RTDoseStorage: 0,
    ParametricMapStorage: 1,
    SegmentationStorage: 2,
    RTStructureSetStorage: 3,
    Comprehensive3DSRStorage: 4,
    ComprehensiveSRStorage: 4,
    EnhancedSRStorage: 4,
}


class LeaseLost(Exception):
    """Another attempt owns the job now (this worker was presumed dead); stop quietly."""


class TransientFailure(Exception):
    """Failed for a reason a later try may not meet; carries the retry delay."""

    def __init__(self, message: str, delay_s: float):
        super().__init__(message)
        self.delay_s = delay_s


Outcome = dict

# Exception types whose next try may not meet them: disk, network, the broker, the job store,
# memory. Anything else a job raises is deterministic (the same input fails the same way again):
# it fails the job once, with its message, instead of being retried as if transient.
_TRANSIENT_NAMES = frozenset({
    "OperationalError", "InterfaceError", "DisconnectionError", "TimeoutError",  # SQLAlchemy, DB drivers
    "ConnectionError", "BusyLoadingError", "ReadOnlyError",  # redis-py
    "ChannelError", "ConnectionForced",  # kombu / amqp (their OperationalError is named above)
    "OutOfMemoryError",  # torch.cuda
})
_TRANSIENT_WORDS = ("out of memory", "cuda error", "cudnn", "nccl")  # torch raises these as RuntimeError


def is_transient(exc: BaseException) -> bool:
    """Whether a later try may succeed where ``exc`` failed (see :data:`_TRANSIENT_NAMES`).

    ``OSError`` (disk full, I/O, a network peer, export failures) and ``MemoryError`` are transient;
    the core's :class:`~spectdose.errors.SpectdoseError` and programming-level errors on the input
    (``ValueError``, ``KeyError``, ``IndexError``, ``TypeError``, ...) are not.
    """
    from spectdose.errors import SpectdoseError

    for e in (exc, exc.__cause__):
        if e is None:
            continue
        if isinstance(e, SpectdoseError):
            return False
        if isinstance(e, OSError | MemoryError):
            return True
        if any(t.__name__ in _TRANSIENT_NAMES for t in type(e).__mro__):
            return True
        if isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _TRANSIENT_WORDS):
            return True
    return False


def deterministic_reason(exc: BaseException) -> str:
    """The failure message of a deterministic error: what failed, and that retrying cannot help."""
    return (f"processing failed on this input ({type(exc).__name__}: {exc}); not retried: the same input fails the "
            "same way (please report it with the job id)")


def dose_options(options: dict, settings: Settings):
    """The core's DoseOptions from a job's stored options (public names) and the service settings."""
    from spectdose.dicom.ingest import load_calibrations
    from spectdose.pipeline import DoseOptions

    stored = dict(options)
    if stored.get("sensitivity_cps_per_mbq") is None and settings.sensitivity_cps_per_mbq:
        stored["sensitivity_cps_per_mbq"] = settings.sensitivity_cps_per_mbq
    return DoseOptions.from_dict(
        stored,
        calibrations=tuple(load_calibrations(settings.calibrations_file)) if settings.calibrations_file else (),
        kernel_cache_dir=settings.kernel_dir,
        device=settings.device,
    )


class Heartbeat(threading.Thread):
    """Renews a lease while the work computes (``beat()`` returns False once another attempt took
    it over); a dose job and a cycle job each give their own ``beat``."""

    def __init__(self, beat: Callable[[], bool], label: str, every_s: float):
        super().__init__(name=f"heartbeat-{label}", daemon=True)
        self.beat, self.label, self.every_s = beat, label, every_s
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            try:
                if not self.beat():
                    self.lost.set()
                    return
            except Exception:  # noqa: BLE001 - a DB hiccup: try again next beat
                log.warning("%s: heartbeat failed", self.label, exc_info=True)

    def stop(self) -> None:
        self._stop_event.set()


def build_manifest(outputs: dict[str, Path], options_key: str, attempt: int) -> dict:
    """What an output folder holds: file names, and the UIDs of the DICOM objects to export."""
    files = {}
    for kind, path in outputs.items():
        entry: dict = {"file": path.name}
        if path.suffix.lower() == _DICOM_SUFFIX:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            entry.update(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
            )
        files[kind] = entry
    return {"options_key": options_key, "attempt": attempt, "files": files}


def export_order(files: list[OutputFile]) -> list[OutputFile]:
    """RT Dose first, then the map, SEG, RT Structure Set, SR, then any other class (by kind, stable)."""
    return sorted(files, key=lambda f: (_EXPORT_RANK.get(f.sop_class_uid, 9), f.kind))


def output_files(out_dir: Path, manifest: dict) -> list[OutputFile]:
    """The DICOM objects of a manifest, in export order."""
    return export_order([OutputFile(kind, out_dir / e["file"], e["sop_instance_uid"], e["sop_class_uid"])
                         for kind, e in manifest["files"].items() if "sop_instance_uid" in e])


def result_of(out_dir: Path, manifest: dict) -> dict:
    """What a finished job shows of its result: engine, software, network, options key, output UIDs, warnings."""
    summary_entry = manifest["files"].get("summary_json")
    summary = json.loads((out_dir / summary_entry["file"]).read_text()) if summary_entry else {}
    network = (summary.get("dose_rate") or {}).get("network")
    return {
        "method": summary.get("method"),
        "software": summary.get("software"),
        "network": {k: network.get(k) for k in ("name", "weights_sha256", "bf16")} if network else None,
        "options_key": manifest.get("options_key"),
        "outputs": {kind: {k: e[k] for k in ("sop_instance_uid", "series_instance_uid")}
                    for kind, e in manifest["files"].items() if "sop_instance_uid" in e},
        "warnings": list(summary.get("warnings") or []),
        "region_warnings": list(summary.get("region_warnings") or []),
    }


def _key_changes(old_key: str | None, new_key: str) -> list[str]:
    try:
        old, new = json.loads(old_key or "{}"), json.loads(new_key)
    except ValueError:
        return ["options"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    reasons = []
    if "version" in changed:
        reasons.append(f"software version changed ({old.get('version')} -> {new.get('version')})")
    if "model_sha256" in changed and "method" not in changed:
        reasons.append("network weights changed")
    rest = [k for k in changed if k not in ("version", "model_sha256")]
    if rest:
        reasons.append(f"options changed ({', '.join(rest)})")
    return reasons


def find_replaced(store: JobStore, storage: Storage, job, options_key: str) -> dict:
    """The earlier result of the job's study that this job's result replaces, and why; {} if none.

    An earlier finished job on the same study counts when its input content (fingerprint),
    its options or the software differ: its numbers may differ, so the new result is a new
    series that names it. The same content, options and software give the same UIDs again
    (an identical retry), which replaces nothing.
    """
    earlier = store.previous_result(job)
    if earlier is None:
        return {}
    manifest = storage.output_manifest(earlier.id)
    if manifest is None:
        return {}
    reasons = []
    if job.fingerprint and earlier.fingerprint and job.fingerprint != earlier.fingerprint:
        reasons.append("input changed (other instances, or the same instances with other content)")
    reasons += _key_changes(manifest.get("options_key"), options_key)
    if not reasons:
        return {}
    files = manifest["files"]
    main = files.get("rtdose") or files.get("doserate") or {}
    return {
        "job_id": earlier.id,
        "series_instance_uid": main.get("series_instance_uid"),
        "series": {k: e["series_instance_uid"] for k, e in files.items() if "series_instance_uid" in e},
        "sop_instance_uids": {k: e["sop_instance_uid"] for k, e in files.items() if "sop_instance_uid" in e},
        "reason": "; ".join(reasons),
    }


def _run_kwargs(run, replaces: dict, region_notes: list[str]) -> dict:
    """``replaces=`` for the core's run() (each earlier output series of the same kind, with the
    reason) and ``region_notes=`` (which region set sent with the study was used, and why)."""
    params = inspect.signature(run).parameters
    kwargs: dict = {"region_notes": list(region_notes)} if region_notes and "region_notes" in params else {}
    if replaces and "replaces" in params:
        kwargs["replaces"] = {kind: {"series_instance_uid": uid, "reason": replaces["reason"]}
                              for kind, uid in replaces["series"].items() if kind in _REPLACED_KINDS}
    return kwargs


def _compute(store: JobStore, storage: Storage, job, attempt: int, options, hb: Heartbeat) -> dict:
    """Run the pipeline into a fresh work folder and publish it as the job's output."""
    from spectdose.pipeline import run

    def progress(stage: str, fraction: float) -> None:
        if hb.lost.is_set() or not store.set_progress(job.id, attempt, stage, 0.9 * fraction):
            raise LeaseLost(f"job {job.id} attempt {attempt} was taken over")

    if job.replaces is None:  # decided once per job, so a retried attempt computes the same result
        replaces = find_replaced(store, storage, job, options.key())
        if not store.set_replaces(job.id, attempt, replaces):
            raise LeaseLost(f"job {job.id} attempt {attempt} was taken over")
    else:
        replaces = job.replaces
    if replaces:
        log.info("job %s replaces series %s of job %s: %s", job.id, replaces["series_instance_uid"],
                 replaces["job_id"], replaces["reason"])
    region_path, notes = region_inputs_of(store, storage.job_input(job.id))
    if region_path is not None:
        options = dataclasses.replace(options, regions_path=region_path)
    work = storage.new_work_dir(job.id, attempt)
    result = run(storage.job_input(job.id), work, options, progress=progress, **_run_kwargs(run, replaces, notes))
    manifest = build_manifest(result.outputs, options.key(), attempt)
    # Judged on the dose objects: the automatic-lesion SEG (from the activity alone) is the same object
    # after a changed time model, and that does not make the new dose the old one.
    same = {uid for kind, uid in replaces.get("sop_instance_uids", {}).items() if kind in _REPLACED_KINDS} & {
        e["sop_instance_uid"] for kind, e in manifest["files"].items() if kind in _REPLACED_KINDS and "sop_instance_uid" in e}
    if same and not store.set_replaces(job.id, attempt, {}):  # the same objects again: they replace nothing
        raise LeaseLost(f"job {job.id} attempt {attempt} was taken over")
    if hb.lost.is_set() or not store.heartbeat(job.id, attempt):
        raise LeaseLost(f"job {job.id} attempt {attempt} was taken over before publishing")
    # Paths in the manifest are names inside the folder, so they stay valid after the rename.
    storage.publish_output(job.id, work, manifest)
    store.record_outputs(job.id, [
        {"sop_instance_uid": e["sop_instance_uid"], "kind": kind, "sop_class_uid": e["sop_class_uid"],
         "series_instance_uid": e["series_instance_uid"]}
        for kind, e in manifest["files"].items() if "sop_instance_uid" in e
    ])
    return manifest


def run_job(
    store: JobStore,
    storage: Storage,
    settings: Settings,
    job_id: str,
    *,
    worker: str,
    sleep: Callable[[float], None] | None = None,
) -> Outcome:
    """Process ``job_id`` once. Returns what happened; raises :class:`TransientFailure` to retry.

    A job that is finished, unknown or owned by a live worker is left alone (a redelivered
    message). Outputs are computed only if the job has no complete output for the same
    options, so a retry after a failed export only exports.
    """
    from spectdose.errors import SpectdoseError

    attempt = store.claim(job_id, worker, lease_s=settings.lease_s, max_attempts=settings.max_attempts)
    if attempt is None:
        job = store.get(job_id)
        state = job.state if job else "unknown"
        log.info("job %s not claimed (state %s): nothing to do", job_id, state)
        return {"job_id": job_id, "skipped": state}
    job = store.get(job_id)
    log.info("job %s: attempt %d on %s", job_id, attempt, worker)
    hb = Heartbeat(lambda: store.heartbeat(job_id, attempt), f"job {job_id}", settings.heartbeat_s)
    hb.start()
    try:
        options = dose_options(job.options, settings)
        manifest = storage.output_manifest(job_id)
        if manifest is None or manifest.get("options_key") != options.key():
            manifest = _compute(store, storage, job, attempt, options, hb)
        else:
            log.info("job %s: output already complete; exporting only", job_id)
        storage.clean_work_dirs(job_id)
        out_dir = storage.job_output(job_id)
        files = output_files(out_dir, manifest)
        destinations = list(job.export)
        if destinations or settings.stow_url:
            store.set_progress(job_id, attempt, "export", 0.9)
            failures = export_outputs(
                store, settings, job_id, destinations=destinations, calling_aet=job.calling_aet, files=files,
                **({"sleep": sleep} if sleep else {}),
            )
            if failures:
                message = "; ".join(f"{f.destination}: {f.message}" for f in failures)
                if any(f.permanent for f in failures):
                    store.fail(job_id, f"dose computed, but export failed: {message}", attempt=attempt)
                    return {"job_id": job_id, "state": "failed", "reason": message}
                raise OSError(f"export failed: {message}")
        outputs = {kind: e["file"] for kind, e in manifest["files"].items()}
        result = result_of(out_dir, manifest)
        if not store.finish(job_id, attempt, outputs, result):
            raise LeaseLost(f"job {job_id} attempt {attempt} was taken over before finishing")
        for warning in result["warnings"]:  # the core's warnings name facts and options, never the patient
            log.warning("job %s: result warning: %s", job_id, warning)
        log.info("job %s done (attempt %d, %s, %d warning(s))", job_id, attempt, result["method"],
                 len(result["warnings"]))
        time_point_done(store, storage, settings, job_id)  # a time point of a therapy cycle (service/cycles.py)
        return {"job_id": job_id, "state": "done", "attempt": attempt}
    except LeaseLost as exc:
        log.warning("%s; leaving it to the new owner", exc)
        return {"job_id": job_id, "skipped": "taken over"}
    except SpectdoseError as exc:
        storage.discard_work(job_id, attempt)  # a failed job leaves no empty work folder
        store.fail(job_id, str(exc), attempt=attempt)
        log.info("job %s failed: %s", job_id, type(exc).__name__)
        return {"job_id": job_id, "state": "failed", "reason": str(exc)}
    except Exception as exc:
        if isinstance(exc, SoftTimeLimitExceeded):
            reason = f"exceeded the time limit of {settings.task_soft_time_limit_s} s"
            store.fail(job_id, reason, attempt=attempt)
            return {"job_id": job_id, "state": "failed", "reason": reason}
        storage.discard_work(job_id, attempt)
        if not is_transient(exc):
            reason = deterministic_reason(exc)
            log.error("job %s failed (deterministic %s, not retried)", job_id, type(exc).__name__, exc_info=True)
            store.fail(job_id, reason, attempt=attempt)
            return {"job_id": job_id, "state": "failed", "reason": reason}
        disk_full = is_disk_full(exc)
        # A full disk is named as such (never blamed on the study) and waited out, not hammered.
        reason = f"{DISK_FULL_NAME} ({type(exc).__name__})" if disk_full else f"{type(exc).__name__}: {exc}"
        try:
            failures = store.retry_later(job_id, attempt, f"transient error, will retry: {reason}")
        except Exception as store_exc:
            if not is_disk_full(store_exc):
                raise
            # The job store is on the full disk too: Celery retries later; should that fail
            # as well, the lease lapses and the sweeper requeues the job once it can write.
            log.error("job %s: %s; the job store cannot record it either; retry in %d s",
                      job_id, DISK_FULL_NAME, settings.disk_retry_after_s)
            raise TransientFailure(reason, settings.disk_retry_after_s) from exc
        if failures is None:
            return {"job_id": job_id, "skipped": "taken over"}
        if failures > settings.max_retries:
            store.fail(job_id, f"gave up after {failures} transient failures; last: {reason}")
            return {"job_id": job_id, "state": "failed", "reason": reason}
        delay = settings.disk_retry_after_s if disk_full else settings.retry_backoff_s * 2 ** (failures - 1)
        log.warning("job %s: transient failure %d/%d (%s); retry in %.0f s",
                    job_id, failures, settings.max_retries, type(exc).__name__, delay)
        raise TransientFailure(reason, delay) from exc
    finally:
        hb.stop()


# ------------------------------------------------------------------ region sets


def region_inputs_of(store: JobStore, input_dir: Path) -> tuple[Path | None, list[str]]:
    """The region set sent with the study (the newest SEG or RT Structure Set in the job's input), and notes.

    Our own region objects that came back with a study (recorded output UIDs) are not the
    clinic's contours and are left out. The frame of reference is checked by the core, which
    reports a set drawn on another CT in ``region_warnings`` and still computes the dose.
    """
    from spectdose.dicom.region_inputs import find_region_inputs

    found = [r for r in find_region_inputs(input_dir) if not store.is_own_output(r.sop_instance_uid)]
    if not found:
        return None, []
    chosen, others = found[0], found[1:]
    notes = [f"regions: the {chosen.kind} {chosen.sop_instance_uid} sent with the study is used"]
    if others:
        notes.append(f"regions: {len(others)} older region set(s) in the study not used "
                     f"({', '.join(f'{r.kind} {r.sop_instance_uid}' for r in others)}); send one after the dose "
                     "(POST /jobs/{id}/regions or a DICOM push) to report it as well")
    return chosen.path, notes


def regions_dir(storage: Storage, job_id: str) -> Path:
    """Where a job's region sets received after the dose and their versions of region outputs live."""
    return storage.job_dir(job_id) / "regions"


def _version_result(folder: Path, manifest: dict, version: int) -> dict:
    report = json.loads((folder / "regions.json").read_text())
    keys = ("region", "volume_ml", "mean_gy", "median_gy", "min_gy", "max_gy", "d2_gy", "d50_gy", "d98_gy",
            "mean_dose_rate_mgy_per_h", "coverage", "spect_coverage_fraction", "ct_coverage_fraction", "automatic",
            "location", "size_note")
    return {
        "version": version,
        "folder": f"regions/{folder.name}",
        "source": report.get("source"),
        "regions": [{k: row.get(k) for k in keys if k in row} for row in report.get("regions", [])],
        "warnings": list(report.get("warnings") or []),
        "outputs": {kind: {k: e[k] for k in ("sop_instance_uid", "series_instance_uid", "sop_class_uid")}
                    for kind, e in manifest["files"].items() if "sop_instance_uid" in e},
        "files": {kind: e["file"] for kind, e in manifest["files"].items()},
    }


def run_region_set(store: JobStore, storage: Storage, settings: Settings, region_set_id: str, *, worker: str,
                   sleep: Callable[[float], None] | None = None) -> Outcome:
    """Apply a region set received after the dose to its finished job, once; raises :class:`TransientFailure` to retry.

    The statistics come from the stored RT Dose and map (``spectdose.region_report``, no dose
    recomputed); the outputs are a new version folder ``regions/v<N>/`` beside the result and
    new DICOM objects (new UIDs: the SR, the traced SEG or RT Structure Set, and the RT Dose
    carrying the new DVHs), sent where the job's results went. A version already written is
    only exported again.
    """
    from spectdose.errors import SpectdoseError
    from spectdose.region_report import region_report

    rec = store.region_set(region_set_id)
    if rec is None or rec.state in ("done", "failed"):
        return {"region_set": region_set_id, "skipped": rec.state if rec else "unknown"}
    job = store.get(rec.job_id)
    if job is None or job.state != "done" or storage.output_manifest(job.id) is None:
        why = f"job {rec.job_id} is {job.state if job else 'unknown'}: regions are applied to a finished result"
        store.fail_region_set(region_set_id, why)
        return {"region_set": region_set_id, "state": "failed", "reason": why}
    attempt = store.claim_region_set(region_set_id)
    if attempt is None:
        return {"region_set": region_set_id, "skipped": "taken"}
    root = regions_dir(storage, job.id)
    folder = root / f"v{rec.version}"
    log.info("job %s: region set %s (version %d, %s), attempt %d on %s", job.id, rec.id, rec.version, rec.kind,
             attempt, worker)
    try:
        manifest = folder_manifest(folder)
        if manifest is None:
            work = root / f".work-v{rec.version}-{attempt}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            try:
                outputs = region_report(storage.job_output(job.id), root / f"{rec.id}.dcm", work)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            manifest = build_manifest(outputs, "", attempt)
            manifest["region_set"] = rec.id
            publish_folder(work, folder, manifest, keep_complete=True)
            manifest = folder_manifest(folder)  # this attempt's, or the one that finished first
        files = output_files(folder, manifest)
        store.record_outputs(job.id, [{"sop_instance_uid": f.sop_instance_uid, "kind": f.kind,
                                       "sop_class_uid": f.sop_class_uid,
                                       "series_instance_uid": manifest["files"][f.kind]["series_instance_uid"]}
                                      for f in files])
        if job.export or settings.stow_url:
            failures = export_outputs(store, settings, job.id, destinations=list(job.export), calling_aet=job.calling_aet,
                                      files=files, **({"sleep": sleep} if sleep else {}))
            if failures:
                message = "; ".join(f"{f.destination}: {f.message}" for f in failures)
                if any(f.permanent for f in failures) or attempt > settings.max_retries:
                    store.fail_region_set(rec.id, f"regions computed (regions/{folder.name}), but export failed: "
                                                  f"{message}")
                    return {"region_set": rec.id, "state": "failed", "reason": message}
                raise TransientFailure(f"export failed: {message}", settings.retry_backoff_s * 2 ** (attempt - 1))
        result = _version_result(folder, manifest, rec.version)
        store.finish_region_set(rec.id, result)
        store.audit("worker", "region_set_done", job_id=job.id, region_set=rec.id, version=rec.version,
                    objects=len(files))
        log.info("job %s: region set version %d done (%d region(s), %d object(s))", job.id, rec.version,
                 len(result["regions"]), len(files))
        return {"region_set": rec.id, "state": "done", "version": rec.version}
    except TransientFailure:
        raise
    except SpectdoseError as exc:
        store.fail_region_set(rec.id, str(exc))
        log.info("job %s: region set %s refused: %s", job.id, rec.id, type(exc).__name__)
        return {"region_set": rec.id, "state": "failed", "reason": str(exc)}
    except Exception as exc:
        if not is_transient(exc):
            reason = deterministic_reason(exc)
            log.error("job %s: region set %s failed (deterministic %s, not retried)", job.id, rec.id,
                      type(exc).__name__, exc_info=True)
            store.fail_region_set(rec.id, reason)
            return {"region_set": rec.id, "state": "failed", "reason": reason}
        reason = f"{DISK_FULL_NAME} ({type(exc).__name__})" if is_disk_full(exc) else f"{type(exc).__name__}: {exc}"
        if attempt > settings.max_retries:
            store.fail_region_set(rec.id, f"gave up after {attempt} attempts; last: {reason}")
            return {"region_set": rec.id, "state": "failed", "reason": reason}
        log.warning("job %s: region set %s attempt %d failed (%s); will retry", job.id, rec.id, attempt,
                    type(exc).__name__)
        raise TransientFailure(reason, settings.retry_backoff_s * 2 ** (attempt - 1)) from exc


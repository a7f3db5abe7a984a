"""The worker's job execution: failure classes, bounded retries, exactly-once export, Celery config.

``run_job`` is called directly here (the Celery round trip is in test_e2e.py); results
go to real C-STORE SCPs and a real HTTP STOW-RS receiver on loopback.
"""

from __future__ import annotations

import http.server
import io
import json
import shutil
import threading
import uuid
from pathlib import Path

import pydicom
import pytest
from pynetdicom.sop_class import ParametricMapStorage, RTDoseStorage

from service.celery_app import make_celery
from service.demo import DemoPacs
from service.jobs import JobStore
from service.localredis import free_port
from service.storage import Storage
from worker.execute import TransientFailure, build_manifest, dose_options, run_job

from .support import make_settings


@pytest.fixture()
def env(tmp_path, db_url):
    def build(**kw):
        settings = make_settings(tmp_path / "data", database_url=db_url, export_retries=2, **kw)
        return settings, JobStore(settings.db_url), Storage(settings.data_dir)

    return build


def _job(store, storage, files, *, export=(), calling_aet=None, options=None) -> str:
    job_id = uuid.uuid4().hex
    storage.publish_input(job_id, list(files))
    store.create_job(job_id, source="dicom" if calling_aet else "rest", submitted_by=calling_aet or "token:x",
                     options=options or {"method": "dvk"}, export=list(export), queue="cpu", n_files=len(files),
                     calling_aet=calling_aet)
    store.mark_queued(job_id)
    return job_id


def _with_outputs(settings, store, storage, files, computed_output: Path, **kw) -> str:
    """A job whose outputs were already computed (as after a failed export)."""
    job_id = _job(store, storage, files, **kw)
    work = storage.new_work_dir(job_id, 1)
    outputs = {}
    for kind, name in {"rtdose": "rtdose.dcm", "doserate": "doserate_pm.dcm", "summary_json": "summary.json",
                       "summary_txt": "summary.txt"}.items():
        shutil.copy(computed_output / name, work / name)
        outputs[kind] = work / name
    key = dose_options(store.get(job_id).options, settings).key()
    storage.publish_output(job_id, work, build_manifest(outputs, key, 1))
    return job_id


def test_bad_study_fails_permanently_with_the_core_message(env, tmp_path):
    settings, store, storage = env()
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    job_id = _job(store, storage, [junk])
    outcome = run_job(store, storage, settings, job_id, worker="w1")
    job = store.get(job_id)
    assert outcome["state"] == "failed" and job.state == "failed"
    assert "CT" in job.reason or "DICOM" in job.reason, job.reason
    assert job.transient_failures == 0, "a study error is not retried"


def test_redelivered_message_for_a_finished_job_does_nothing(env, phantom_files, computed_output):
    settings, store, storage = env()
    job_id = _with_outputs(settings, store, storage, phantom_files, computed_output)
    assert run_job(store, storage, settings, job_id, worker="w1")["state"] == "done"
    before = store.get(job_id)
    again = run_job(store, storage, settings, job_id, worker="w2")
    after = store.get(job_id)
    assert again == {"job_id": job_id, "skipped": "done"}
    assert (after.attempt, after.worker, after.finished_at) == (before.attempt, before.worker, before.finished_at)


def test_export_retries_only_what_failed_and_never_resends(env, phantom_files, computed_output, tmp_path):
    good = DemoPacs(tmp_path / "good").start()
    late_port = free_port()
    late = f"LATE@127.0.0.1:{late_port}"
    try:
        settings, store, storage = env(peers=[str(good.peer), late])
        job_id = _with_outputs(settings, store, storage, phantom_files, computed_output,
                               export=[str(good.peer), late])
        with pytest.raises(TransientFailure, match="LATE"):
            run_job(store, storage, settings, job_id, worker="w1", sleep=lambda s: None)
        job = store.get(job_id)
        assert job.state == "queued" and job.transient_failures == 1 and "export failed" in job.reason
        assert len(good.received) == 2
        late_pacs = DemoPacs(tmp_path / "late", port=late_port).start()
        try:
            assert run_job(store, storage, settings, job_id, worker="w1")["state"] == "done"
            assert len(good.received) == 2, "already sent: not sent again"
            assert len(late_pacs.received) == 2
        finally:
            late_pacs.stop()
        records = store.exports_of(job_id)
        assert {(r.destination, r.state) for r in records} == {(str(good.peer), "sent"), (late, "sent")}
        assert all(r.attempts == 1 for r in records if r.destination == str(good.peer))
        assert all(r.attempts == 2 for r in records if r.destination == late), \
            "1 failed try (no association: retried by the task, not in it) + 1 success"
        sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in good.received}
        expected = {str(pydicom.dcmread(computed_output / n, stop_before_pixels=True).SOPInstanceUID)
                    for n in ("rtdose.dcm", "doserate_pm.dcm")}
        assert sent == expected
    finally:
        good.stop()


def test_transient_failures_are_bounded_then_failed(env, phantom_files, computed_output):
    dead = f"DEAD@127.0.0.1:{free_port()}"
    settings, store, storage = env(max_retries=1)
    job_id = _with_outputs(settings, store, storage, phantom_files, computed_output, export=[dead])
    with pytest.raises(TransientFailure) as info:
        run_job(store, storage, settings, job_id, worker="w1", sleep=lambda s: None)
    assert info.value.delay_s == pytest.approx(settings.retry_backoff_s)
    outcome = run_job(store, storage, settings, job_id, worker="w1", sleep=lambda s: None)
    job = store.get(job_id)
    assert outcome["state"] == "failed" and job.state == "failed"
    assert job.reason.startswith("gave up after 2 transient failures") and "DEAD" in job.reason
    assert storage.output_manifest(job_id) is not None, "the computed dose is kept for REST"


def test_unknown_sender_is_a_permanent_export_failure(env, phantom_files, computed_output):
    settings, store, storage = env()
    job_id = _with_outputs(settings, store, storage, phantom_files, computed_output, export=["sender"],
                           calling_aet="NOBODY")
    outcome = run_job(store, storage, settings, job_id, worker="w1")
    assert outcome["state"] == "failed"
    assert "SPECTDOSE_PEERS" in store.get(job_id).reason


class _StowReceiver(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append((self.path, dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_stow_rs_export_sends_valid_dicom_parts(env, phantom_files, computed_output):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StowReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _StowReceiver.requests = []
        settings, store, storage = env(stow_url=f"http://127.0.0.1:{server.server_port}/dicomweb",
                                       stow_token="stow-secret")
        job_id = _with_outputs(settings, store, storage, phantom_files, computed_output)
        assert run_job(store, storage, settings, job_id, worker="w1")["state"] == "done"
        (path, headers, body), = _StowReceiver.requests
        assert path == "/dicomweb/studies"
        assert headers["Authorization"] == "Bearer stow-secret"
        ctype = headers["Content-Type"]
        assert ctype.startswith('multipart/related; type="application/dicom"')
        boundary = ctype.split("boundary=")[1].encode()
        parts = [p for p in body.split(b"--" + boundary) if p.strip() not in (b"", b"--")]
        classes = sorted(str(pydicom.dcmread(io.BytesIO(p.split(b"\r\n\r\n", 1)[1][:-2])).SOPClassUID) for p in parts)
        assert classes == sorted([RTDoseStorage, ParametricMapStorage])
    finally:
        server.shutdown()


def test_celery_is_configured_for_lost_workers(tmp_path):
    settings = make_settings(tmp_path, visibility_timeout_s=20000, task_time_limit_s=9000, task_soft_time_limit_s=8000)
    app = make_celery(settings)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 20000 > conf.task_time_limit == 9000
    assert conf.task_soft_time_limit == 8000
    assert {q.name for q in conf.task_queues} == {"gpu", "cpu"}
    from worker.tasks import process_job

    assert process_job.acks_late and process_job.reject_on_worker_lost
    assert process_job.name == "spectdose.process_job"


# ------------------------------------------------------------------ what a finished job shows (issue 7)


def test_finished_job_shows_method_provenance_and_every_warning_and_logs_each(env, phantom_files, computed_output,
                                                                             caplog):
    from service.schemas import job_out

    settings, store, storage = env()
    job_id = _with_outputs(settings, store, storage, phantom_files, computed_output)
    summary_path = storage.job_output(job_id) / "summary.json"
    summary = json.loads(summary_path.read_text())
    added = ["ASSUMED (time_outside_model_range): the model is used outside its range",
             "SPECT and CT do not share a frame of reference: registered"]
    summary["warnings"] = list(summary["warnings"]) + added
    summary_path.write_text(json.dumps(summary))
    with caplog.at_level("INFO", logger="spectdose.worker"):
        assert run_job(store, storage, settings, job_id, worker="w1")["state"] == "done"
    out = job_out(store.get(job_id), store.exports_of(job_id), "http://x")
    assert out.warnings == summary["warnings"] and out.warnings[-2:] == added
    assert out.method == summary["method"] == "dvk"
    assert out.provenance["software"] == summary["software"]
    rtdose = pydicom.dcmread(computed_output / "rtdose.dcm", stop_before_pixels=True)
    assert out.provenance["outputs"]["rtdose"] == {"sop_instance_uid": str(rtdose.SOPInstanceUID),
                                                   "series_instance_uid": str(rtdose.SeriesInstanceUID)}
    logged = [r.getMessage() for r in caplog.records if "result warning" in r.getMessage()]
    assert logged == [f"job {job_id}: result warning: {w}" for w in summary["warnings"]]
    ds = pydicom.dcmread(phantom_files[0], stop_before_pixels=True)
    assert not any(str(ds.PatientID) in m or str(ds.PatientName) in m for m in logged)


def _study_job(store, storage, files, *, fingerprint: str, options: dict, study: str = "1.2.826.0.1.99") -> str:
    job_id = uuid.uuid4().hex
    storage.publish_input(job_id, list(files))
    store.create_job(job_id, source="rest", submitted_by="token:x", options=options, export=[], queue="cpu",
                     n_files=len(files), study_instance_uid=study, fingerprint=fingerprint)
    store.mark_queued(job_id)
    return job_id


def test_a_changed_input_option_or_version_replaces_the_earlier_result_an_identical_one_does_not(
        env, phantom_files, computed_output):
    from worker.execute import find_replaced

    settings, store, storage = env()

    def done_job(fingerprint, options, *, version=None):
        job_id = _study_job(store, storage, phantom_files, fingerprint=fingerprint, options=options)
        work = storage.new_work_dir(job_id, 1)
        outputs = {}
        for kind, name in {"rtdose": "rtdose.dcm", "doserate": "doserate_pm.dcm", "summary_json": "summary.json"}.items():
            shutil.copy(computed_output / name, work / name)
            outputs[kind] = work / name
        key = json.loads(dose_options(options, settings).key())
        if version:
            key["version"] = version
        storage.publish_output(job_id, work, build_manifest(outputs, json.dumps(key, sort_keys=True), 1))
        attempt = store.claim(job_id, "w1", lease_s=60, max_attempts=3)  # finished as by that software
        assert store.finish(job_id, attempt, {k: p.name for k, p in outputs.items()})
        return job_id

    def replaced(fingerprint, options):
        job = store.get(_study_job(store, storage, phantom_files, fingerprint=fingerprint, options=options))
        return find_replaced(store, storage, job, dose_options(options, settings).key())

    first = done_job("f1", {"method": "dvk"})
    series = str(pydicom.dcmread(computed_output / "rtdose.dcm", stop_before_pixels=True).SeriesInstanceUID)
    assert replaced("f1", {"method": "dvk"}) == {}, "identical input and options: the same objects, no replacement"
    by_option = replaced("f1", {"method": "dvk", "time_model": "physical"})
    assert by_option["job_id"] == first and by_option["series_instance_uid"] == series
    assert by_option["reason"] == "options changed (time_model)"
    assert replaced("f2", {"method": "dvk"})["reason"].startswith("input changed")
    done_job("f3", {"method": "dvk"}, version="0.0.1")  # the newest result of the study, by older software
    from spectdose import __version__

    assert replaced("f3", {"method": "dvk"})["reason"] == f"software version changed (0.0.1 -> {__version__})"
    assert find_replaced(store, storage, store.get(_study_job(store, storage, phantom_files, fingerprint="f1",
                                                              options={"method": "dvk"}, study="1.2.3.other")),
                         "{}") == {}, "another study replaces nothing"


def test_recomputation_is_a_new_series_that_records_what_it_replaces(env, phantom_files, computed_output,
                                                                    kernel_cache_dir):
    settings, store, storage = env(kernel_cache_dir=kernel_cache_dir)
    first = _study_job(store, storage, phantom_files, fingerprint="same", options={"method": "dvk"})
    work = storage.new_work_dir(first, 1)
    outputs = {}
    for kind, name in {"rtdose": "rtdose.dcm", "doserate": "doserate_pm.dcm", "summary_json": "summary.json"}.items():
        shutil.copy(computed_output / name, work / name)
        outputs[kind] = work / name
    storage.publish_output(first, work, build_manifest(outputs, dose_options({"method": "dvk"}, settings).key(), 1))
    assert run_job(store, storage, settings, first, worker="w1")["state"] == "done"
    second = _study_job(store, storage, phantom_files, fingerprint="same",
                        options={"method": "dvk", "time_model": "physical"})
    outcome = run_job(store, storage, settings, second, worker="w1")
    assert outcome["state"] == "done", outcome
    old = store.get(first).result["outputs"]
    new = store.get(second).result["outputs"]
    assert new["rtdose"]["sop_instance_uid"] != old["rtdose"]["sop_instance_uid"]
    assert new["rtdose"]["series_instance_uid"] != old["rtdose"]["series_instance_uid"]
    replaces = store.get(second).replaces
    assert replaces["job_id"] == first and replaces["series_instance_uid"] == old["rtdose"]["series_instance_uid"]
    assert replaces["reason"] == "options changed (time_model)"
    ds = pydicom.dcmread(storage.job_output(second) / "rtdose.dcm", stop_before_pixels=True)
    assert "CORRECTED" in ds.SeriesDescription, "the new series says it corrects an earlier one"
    assert f"replaces {old['rtdose']['series_instance_uid']} (options changed (time_model))" in ds.ImageComments

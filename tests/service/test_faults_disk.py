"""A full disk (issue 8, item 3): one free-space guard for REST and DICOM, ENOSPC named as
the server's retryable fault (never "damaged archive"), no wedged job, recovery when space
returns; and the retention policy that keeps the disk from filling with patient data.

ENOSPC is injected (monkeypatch) where the real one would surface, so the tests need no
tmpfs and run in seconds.
"""

from __future__ import annotations

import datetime as dt
import errno
import io
import types
import uuid
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

import spectdose.dicom.archive
from service.celery_app import make_celery
from service.db import Job
from service.dicom_node import DicomNode
from service.dicom_node import handlers as node_handlers
from service.jobs import JobStore
from service.localredis import free_port
from service.main import create_app, purge_by_settings
from service.queue import Enqueuer, sweep_once
from service.storage import Storage, atomic_write_bytes
from worker.execute import TransientFailure, run_job

from .support import AUTH, make_settings


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture()
def settings(tmp_path, redis_url):
    return make_settings(tmp_path / "data", redis_url=redis_url, min_free_disk_mb=100, disk_retry_after_s=120)


def _post(client, body: bytes):
    return client.post("/studies", content=body, headers={**AUTH, "Content-Type": "application/zip"})


def _nothing_stored(client, settings) -> None:
    assert not any((settings.data_dir / "uploads").iterdir())
    assert not any((settings.data_dir / "jobs").iterdir())
    assert client.get("/jobs", headers=AUTH).json()["total"] == 0


# ------------------------------------------------------------------ REST


def test_rest_below_the_free_space_floor_is_507_with_retry_after(client, settings, study_zip, monkeypatch):
    monkeypatch.setattr(Storage, "free_bytes", lambda self: 2 * 2**20)  # 2 MiB free, 100 MiB kept
    r = _post(client, study_zip)
    assert r.status_code == 507, r.text
    assert r.headers["Retry-After"] == "120"
    assert "ENOSPC" in r.json()["detail"] and "retry in 120 s" in r.json()["detail"]
    _nothing_stored(client, settings)
    monkeypatch.undo()  # space returns
    assert _post(client, study_zip).status_code == 202


@pytest.mark.parametrize("where", ["unzip", "publish"])
def test_rest_enospc_is_507_never_a_damaged_archive(client, settings, study_zip, monkeypatch, where):
    if where == "unzip":
        real_open = open

        def full_disk_open(path, mode="r", *a, **k):
            if "w" in mode:
                _enospc()
            return real_open(path, mode, *a, **k)

        monkeypatch.setattr(spectdose.dicom.archive, "open", full_disk_open, raising=False)
    else:
        monkeypatch.setattr(Storage, "publish_input", _enospc)
    r = _post(client, study_zip)
    assert r.status_code == 507, r.text
    detail = r.json()["detail"]
    assert "ENOSPC" in detail and "damaged" not in detail
    assert r.headers["Retry-After"] == "120"
    _nothing_stored(client, settings)
    refused = client.app.state.ctx.store.audit_events(action="upload_rejected")
    assert refused[0].detail["status"] == 507


# ------------------------------------------------------------------ DICOM


def test_dicom_c_store_answers_out_of_resources_then_recovers(tmp_path, redis_url, phantom_files, monkeypatch):
    settings = make_settings(tmp_path / "data", redis_url=redis_url, dicom_port=free_port(),
                             allowed_calling_aets=["MODALITY"])
    store = JobStore(settings.db_url)
    node = DicomNode(settings, store, Storage(settings.data_dir), Enqueuer(make_celery(settings), store))
    node.start()
    try:
        import pydicom

        ct = next(p for p in phantom_files if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT")
        ds = pydicom.dcmread(ct)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title="SPECTDOSE")
        assert assoc.is_established
        monkeypatch.setattr(node_handlers, "atomic_write_bytes", _enospc)
        assert assoc.send_c_store(ds).Status == 0xA700, "Refused: Out of Resources"
        monkeypatch.setattr(Storage, "free_bytes", lambda self: 0)
        monkeypatch.setattr(node_handlers, "atomic_write_bytes", atomic_write_bytes)
        assert assoc.send_c_store(ds).Status == 0xA700, "below the floor: refused before writing"
        monkeypatch.undo()  # space returns
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    finally:
        node.stop()


# ------------------------------------------------------------------ worker


@pytest.fixture()
def worker_env(tmp_path):
    settings = make_settings(tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}",
                             disk_retry_after_s=120, max_retries=3, lease_s=30, heartbeat_s=5)
    store, storage = JobStore(settings.db_url), Storage(settings.data_dir)
    return settings, store, storage


def _queued_job(store, storage) -> str:
    job_id = uuid.uuid4().hex
    src = storage.uploads / f"{job_id}.dcm"
    atomic_write_bytes(src, b"input")
    storage.publish_input(job_id, [src])
    store.create_job(job_id, source="rest", submitted_by="token:x", options={"method": "dvk"}, export=[],
                     queue="cpu", n_files=1)
    store.mark_queued(job_id)
    return job_id


def _fake_pipeline(input_dir, work, options, progress=None, **_kw):
    """Stands in for spectdose.pipeline.run once space returns (the physics is tested elsewhere)."""
    (Path(work) / "summary.txt").write_text("dose summary\n")
    return types.SimpleNamespace(outputs={"summary_txt": Path(work) / "summary.txt"})


def test_worker_enospc_waits_with_a_named_reason_then_finishes(worker_env, monkeypatch):
    settings, store, storage = worker_env
    job_id = _queued_job(store, storage)
    monkeypatch.setattr("spectdose.pipeline.run", _enospc)
    with pytest.raises(TransientFailure) as info:
        run_job(store, storage, settings, job_id, worker="w1")
    assert info.value.delay_s == 120, "a full disk is waited out, not retried at once"
    job = store.get(job_id)
    assert job.state == "queued" and "ENOSPC" in job.reason and "damaged" not in job.reason
    assert sorted(p.name for p in storage.job_dir(job_id).iterdir()) == ["input"], "no work folder left"
    monkeypatch.setattr("spectdose.pipeline.run", _fake_pipeline)  # space returns
    assert run_job(store, storage, settings, job_id, worker="w1")["state"] == "done"
    assert sorted(p.name for p in storage.job_dir(job_id).iterdir()) == ["input", "output"]


def test_job_store_on_a_full_disk_does_not_wedge_the_job(worker_env, monkeypatch):
    """SQLite says "database or disk is full" while recording the failure: the job is not left
    running for good; once its lease lapses the sweeper requeues it and it finishes."""
    settings, store, storage = worker_env
    job_id = _queued_job(store, storage)
    monkeypatch.setattr("spectdose.pipeline.run", _enospc)
    monkeypatch.setattr(JobStore, "retry_later", lambda *a, **k: (_ for _ in ()).throw(
        OperationalError("UPDATE jobs", {}, Exception("database or disk is full"))))
    with pytest.raises(TransientFailure) as info:
        run_job(store, storage, settings, job_id, worker="w1")
    assert info.value.delay_s == 120
    assert store.get(job_id).state == "running"
    monkeypatch.undo()  # space returns
    monkeypatch.setattr("spectdose.pipeline.run", _fake_pipeline)
    enqueuer = Enqueuer(make_celery(settings), store)  # no broker here: the requeue is what counts
    later = store.get(job_id).heartbeat_at + dt.timedelta(seconds=settings.lease_s + 1)
    sweep_once(store, enqueuer, lease_s=settings.lease_s, visibility_timeout_s=settings.visibility_timeout_s, now=later)
    with store.session() as s:  # the lease really lapsed (the sweeper compared with "later")
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=later - dt.timedelta(days=1)))
    sweep_once(store, enqueuer, lease_s=settings.lease_s, visibility_timeout_s=settings.visibility_timeout_s)
    assert store.get(job_id).state == "queued"
    assert run_job(store, storage, settings, job_id, worker="w2")["state"] == "done"


def test_failed_job_leaves_no_empty_work_folder(worker_env, monkeypatch):
    from spectdose.errors import InputError

    settings, store, storage = worker_env
    job_id = _queued_job(store, storage)

    def refuse(*_a, **_k):
        raise InputError("no SPECT series in the study")

    monkeypatch.setattr("spectdose.pipeline.run", refuse)
    assert run_job(store, storage, settings, job_id, worker="w1")["state"] == "failed"
    assert sorted(p.name for p in storage.job_dir(job_id).iterdir()) == ["input"]


# ------------------------------------------------------------------ retention


def _finished(store, storage, *, days_ago: float, size: int = 1000, state: str = "done") -> str:
    job_id = _queued_job(store, storage)
    atomic_write_bytes(storage.job_output(job_id) / "rtdose.dcm", b"x" * size)
    when = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=days_ago)
    with store.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(state=state, finished_at=when))
    return job_id


def test_retention_purges_inputs_by_age_and_folders_by_count_and_size(worker_env):
    settings, store, storage = worker_env
    old = _finished(store, storage, days_ago=10)
    failed = _finished(store, storage, days_ago=9, state="failed")
    recent = _finished(store, storage, days_ago=1)
    waiting = _queued_job(store, storage)  # never touched, however old
    incoming = storage.incoming_dir("1.2.3.4")
    atomic_write_bytes(incoming / "CT_1.dcm", b"phi")
    import os

    os.utime(incoming / "CT_1.dcm", (0, 0))
    counts = storage.purge(store, inputs_days=7)
    assert counts["inputs"] == 2 and counts["incoming"] == 1
    assert not storage.job_input(old).exists() and not storage.job_input(failed).exists()
    assert storage.job_output(old).exists(), "outputs stay until their own rule removes them"
    assert storage.job_input(recent).exists() and storage.job_input(waiting).exists()
    assert not incoming.exists()
    assert storage.purge(store, max_jobs=2)["jobs"] == 1 and not storage.job_dir(old).exists()
    big = _finished(store, storage, days_ago=0.5, size=3 * 2**20)
    assert storage.purge(store, max_bytes=3 * 2**20 + 500)["jobs"] == 2, "oldest finished folders go first"
    assert not storage.job_dir(failed).exists() and not storage.job_dir(recent).exists()
    assert storage.job_dir(big).exists() and storage.job_dir(waiting).exists(), "the newest and the unfinished stay"
    assert storage.purge(store, jobs_days=0.1)["jobs"] == 1 and not storage.job_dir(big).exists()
    assert storage.job_dir(waiting).exists()
    events = store.audit_events(action="purged")
    assert {e.actor for e in events} == {"retention"} and len(events) == 7


def test_retention_settings_drive_the_purge(tmp_path, redis_url):
    settings = make_settings(tmp_path / "data", redis_url=redis_url, retain_inputs_days=7, retain_max_jobs=1)
    with TestClient(create_app(settings, sweeper=False)) as c:
        ctx = c.app.state.ctx
        a = _finished(ctx.store, ctx.storage, days_ago=30)
        b = _finished(ctx.store, ctx.storage, days_ago=2)
        counts = purge_by_settings(ctx)
    assert counts["inputs"] == 1 and counts["jobs"] == 1
    assert not ctx.storage.job_dir(a).exists() and ctx.storage.job_input(b).exists()


def test_zip_io_helpers_still_refuse_real_damage(tmp_path):
    """The ENOSPC pass-through does not turn a damaged member into a server error."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.dcm", bytes(range(256)) * 20)
    data = bytearray(buf.getvalue())
    data[100:120] = b"\0" * 20  # the member's bytes no longer match its CRC
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    members = spectdose.dicom.archive.unpack_zip(tmp_path / "bad.zip", tmp_path / "out", max_bytes=10**6, max_members=10)
    assert members and members[0].problem and "damaged" in members[0].problem

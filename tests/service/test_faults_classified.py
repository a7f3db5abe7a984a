"""Failures are classified (issue 19, items 6 and case 9): a deterministic input error fails once
with a specific message (a failed job with its reason, a refused region set, exit 2 on the CLI);
only transient faults (disk, network, broker, job store, memory) are retried.

The case of the issue: a SEG whose segments share one label was retried 4 times as transient
(147 s) and reported as ``ValueError: zip() argument 2 ...``: the labels collapsed into one
region in the per-label mask table, and the outputs zipped regions with rows.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from service.jobs import JobStore
from service.storage import Storage
from worker.execute import TransientFailure, is_transient, run_job, run_region_set

from .support import make_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def env(tmp_path, redis_url):
    settings = make_settings(tmp_path / "data", redis_url=redis_url, export_retries=1, max_retries=3)
    return settings, JobStore(settings.db_url), Storage(settings.data_dir)


def _job(store, storage, files) -> str:
    job_id = uuid.uuid4().hex
    storage.publish_input(job_id, list(files))
    store.create_job(job_id, source="rest", submitted_by="token:x", options={"method": "dvk"}, export=[],
                     queue="cpu", n_files=len(files))
    store.mark_queued(job_id)
    return job_id


@pytest.fixture(scope="module")
def shared_label_seg(phantom_dir, tmp_path_factory) -> Path:
    """The virtual patient's SEG with its second segment relabelled as its first."""
    ds = pydicom.dcmread(phantom_dir / "truth" / "seg.dcm")
    assert len(ds.SegmentSequence) >= 2
    ds.SegmentSequence[1].SegmentLabel = ds.SegmentSequence[0].SegmentLabel
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    target = tmp_path_factory.mktemp("seg") / "shared_label_seg.dcm"
    ds.save_as(target)
    return target


def test_a_seg_sharing_one_label_is_refused_once_and_the_dose_kept(env, phantom_files, shared_label_seg):
    settings, store, storage = env
    job_id = _job(store, storage, [*phantom_files, shared_label_seg])
    outcome = run_job(store, storage, settings, job_id, worker="w1")  # no TransientFailure: not retried
    job = store.get(job_id)
    assert outcome["state"] == "done" and job.attempt == 1 and job.transient_failures == 0
    refused = [w for w in job.result["region_warnings"] if w.startswith("REGIONS NOT REPORTED")]
    assert refused and "share the label" in refused[0] and "zip()" not in refused[0], job.result["region_warnings"]
    assert "rtdose" in job.result["outputs"], "a region problem never discards the dose"


def test_regions_after_the_dose_sharing_a_label_fail_once_with_the_reason(env, phantom_files, computed_output,
                                                                         shared_label_seg):
    from .test_regions_service import _done_job

    settings, store, storage = env
    job_id = _done_job(settings, store, storage, phantom_files, computed_output)
    folder = storage.job_dir(job_id) / "regions"
    folder.mkdir()
    rs_id = uuid.uuid4().hex
    (folder / f"{rs_id}.dcm").write_bytes(shared_label_seg.read_bytes())
    rec, _ = store.add_region_set(job_id, region_set_id=rs_id, source="rest", submitted_by="token:x", kind="SEG",
                                  sop_instance_uid="1.2.3", digest="d" * 64)
    outcome = run_region_set(store, storage, settings, rec.id, worker="w1")  # raises TransientFailure if retried
    assert outcome["state"] == "failed" and "share the label" in outcome["reason"], outcome
    assert store.region_set(rec.id).state == "failed"
    assert store.get(job_id).state == "done", "the result is untouched"


def test_rest_refuses_it_with_422_and_stores_nothing(env, phantom_files, computed_output, shared_label_seg):
    from fastapi.testclient import TestClient

    from service.main import create_app

    from .support import AUTH
    from .test_regions_service import _done_job

    settings, store, storage = env
    job_id = _done_job(settings, store, storage, phantom_files, computed_output)
    with TestClient(create_app(settings, sweeper=False)) as c:
        r = c.post(f"/jobs/{job_id}/regions", content=shared_label_seg.read_bytes(),
                   headers={**AUTH, "Content-Type": "application/dicom"})
        assert r.status_code == 422 and "share the label" in r.json()["detail"], r.text
        assert c.get(f"/jobs/{job_id}/regions", headers=AUTH).json()["region_sets"] == []
    assert not (storage.job_dir(job_id) / "regions").exists() or not any((storage.job_dir(job_id) / "regions").iterdir())


def test_the_cli_refuses_it_with_exit_2(computed_output, shared_label_seg, tmp_path):
    r = subprocess.run([sys.executable, "-m", "spectdose.cli", "regions", str(computed_output), "--regions",
                        str(shared_label_seg), "-o", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "share the label" in r.stderr and "Traceback" not in r.stderr and "internal error" not in r.stderr


def test_deterministic_errors_fail_once_transient_ones_are_retried(env, phantom_files, monkeypatch):
    import spectdose.pipeline

    settings, store, storage = env

    def zip_bug(*_a, **_k):
        raise ValueError("zip() argument 2 is shorter than argument 1")

    monkeypatch.setattr(spectdose.pipeline, "run", zip_bug)
    job_id = _job(store, storage, phantom_files)
    outcome = run_job(store, storage, settings, job_id, worker="w1")
    job = store.get(job_id)
    assert outcome["state"] == "failed" and job.state == "failed"
    assert job.attempt == 1 and job.transient_failures == 0, "failed once, never retried"
    assert "ValueError" in job.reason and "not retried" in job.reason
    assert not list(storage.job_dir(job_id).glob("work-*")), "no work folder left behind"

    def disk_hiccup(*_a, **_k):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spectdose.pipeline, "run", disk_hiccup)
    job_id = _job(store, storage, phantom_files)
    with pytest.raises(TransientFailure):
        run_job(store, storage, settings, job_id, worker="w1")
    assert store.get(job_id).state == "queued" and store.get(job_id).transient_failures == 1


def test_what_counts_as_transient():
    import redis
    import sqlalchemy.exc

    from spectdose.errors import InputError

    transient = [OSError(28, "No space left on device"), ConnectionRefusedError(), TimeoutError(), MemoryError(),
                 redis.exceptions.ConnectionError("gone"),
                 sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("database is locked")),
                 RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")]
    deterministic = [ValueError("zip() argument 2 is shorter than argument 1"), KeyError("SegmentLabel"),
                     IndexError("list index out of range"), TypeError("bad operand"), ZeroDivisionError(),
                     InputError("no SPECT"), RuntimeError("shape mismatch")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in deterministic] == [False] * len(deterministic)

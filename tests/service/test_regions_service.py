"""Regions in the service (issue 11): every DICOM result goes back and is known as ours on return;
a region set sent with the study is the job's regions; one sent after the dose (REST or DICOM push)
makes a new version of the region outputs on the stored dose, sent as new objects.

The worker functions are called directly (the Celery round trip is in test_e2e.py); results go to
real C-STORE SCPs on loopback; the DICOM node is real and driven by pynetdicom.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt

from service.celery_app import make_celery
from service.config import DicomPeer
from service.demo import DemoPacs
from service.dicom_node import DicomNode
from service.export import push_files
from service.jobs import JobStore, content_fingerprint
from service.localredis import LocalRedis, free_port
from service.main import create_app
from service.queue import Enqueuer
from service.storage import Storage
from worker.execute import build_manifest, dose_options, run_job, run_region_set

from .support import AUTH, make_settings, wait_for

RT_DOSE, PMAP = "1.2.840.10008.5.1.4.1.1.481.2", "1.2.840.10008.5.1.4.1.1.30"
SEG, RTSTRUCT, SR3D = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.88.34"


class AllClassesPacs:
    """A C-STORE SCP accepting every storage class, keeping the arrival order."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.received = folder, free_port(), []
        self._lock = threading.Lock()

    @property
    def peer(self) -> DicomPeer:
        return DicomPeer("ALLPACS", "127.0.0.1", self.port)

    def _on_store(self, event) -> int:
        ds = event.dataset
        path = self.folder / f"{len(self.received):03d}_{ds.SOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        with self._lock:
            self.received.append(path)
        return 0x0000

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title="ALLPACS")
        classes = {cx.abstract_syntax for cx in StoragePresentationContexts} | {PMAP}  # the default list lacks it
        for uid in sorted(classes):
            ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc):
        self._server.shutdown()

    def classes(self) -> list[str]:
        return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in self.received]


@pytest.fixture()
def env(tmp_path, redis_url):
    def build(**kw):
        kw = {"redis_url": redis_url, **kw}
        settings = make_settings(tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}",
                                 export_retries=1, **kw)
        return settings, JobStore(settings.db_url), Storage(settings.data_dir)

    return build


def _job(store, storage, files, *, export=(), calling_aet=None, study_uid=None) -> str:
    job_id = uuid.uuid4().hex
    storage.publish_input(job_id, list(files))
    store.create_job(job_id, source="dicom" if calling_aet else "rest", submitted_by=calling_aet or "token:x",
                     options={"method": "dvk"}, export=list(export), queue="cpu", n_files=len(files),
                     calling_aet=calling_aet, study_instance_uid=study_uid)
    store.mark_queued(job_id)
    return job_id


def _done_job(settings, store, storage, files, computed_output: Path, **kw) -> str:
    """A finished job whose outputs are the session's pipeline run (every file of it), exported by run_job."""
    study_uid = str(pydicom.dcmread(computed_output / "rtdose.dcm", stop_before_pixels=True).StudyInstanceUID)
    job_id = _job(store, storage, files, study_uid=study_uid, **kw)
    work = storage.new_work_dir(job_id, 1)
    outputs = {}
    for path in sorted(computed_output.iterdir()):
        if path.is_file():
            shutil.copy(path, work / path.name)
            kind = {"doserate_pm.dcm": "doserate", "summary.json": "summary_json", "summary.txt": "summary_txt",
                    "regions.csv": "regions_csv", "dvh.csv": "dvh_csv", "regions_rtstruct.dcm": "regions_rtstruct"
                    }.get(path.name, path.stem)
            outputs[kind] = work / path.name
    key = dose_options(store.get(job_id).options, settings).key()
    manifest = build_manifest(outputs, key, 1)
    storage.publish_output(job_id, work, manifest)
    store.record_outputs(job_id, [{"sop_instance_uid": e["sop_instance_uid"], "kind": kind,
                                   "sop_class_uid": e["sop_class_uid"], "series_instance_uid": e["series_instance_uid"]}
                                  for kind, e in manifest["files"].items() if "sop_instance_uid" in e])
    assert run_job(store, storage, settings, job_id, worker="w1")["state"] == "done"
    return job_id


def _other_frame(seg: Path, target: Path) -> Path:
    ds = pydicom.dcmread(seg)
    ds.FrameOfReferenceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target)
    return target


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def truth_seg(phantom_dir) -> Path:
    """The virtual patient's organ and lesion SEG, on its CT: a clinic's contours."""
    return phantom_dir / "truth" / "seg.dcm"


# ------------------------------------------------------------------ 1. every DICOM result goes back


def test_every_dicom_output_goes_back_dose_first_and_is_ours_when_it_returns(env, phantom_files, computed_output,
                                                                             tmp_path):
    with AllClassesPacs(tmp_path / "pacs") as pacs:
        demo = DemoPacs(tmp_path / "demo", sop_classes=(RT_DOSE, PMAP)).start()  # only RT Dose and Parametric Map
        try:
            settings, store, storage = env(peers=[str(pacs.peer), str(demo.peer)], dicom_port=free_port(),
                                           allowed_calling_aets=["ALLPACS"])
            job_id = _done_job(settings, store, storage, phantom_files, computed_output,
                               export=[str(pacs.peer), str(demo.peer)])
        finally:
            demo.stop()
        ours = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in computed_output.glob("*.dcm")}
        assert len(ours) >= 5  # RT Dose with DVHs, map, automatic-lesion SEG, RT Structure Set, SR (and later ones)
        sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pacs.received}
        assert sent == ours
        classes = pacs.classes()
        assert [c for c in classes if c in (RT_DOSE, PMAP, SEG, RTSTRUCT, SR3D)] == [RT_DOSE, PMAP, SEG, RTSTRUCT, SR3D]
        assert classes[:5] == [RT_DOSE, PMAP, SEG, RTSTRUCT, SR3D], "the dose first, then what references it"
        study = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in pacs.received}
        assert study == {store.get(job_id).study_instance_uid}
        # A PACS that does not take a class: the rest is sent, the job is done, the refusal is on record.
        assert len(demo.received) == 2
        job = store.get(job_id)
        kinds = set(job.result["outputs"])
        assert job.state == "done" and kinds >= {"rtdose", "doserate", "autoseg", "regions_rtstruct", "sr"}
        refused = [e for e in store.exports_of(job_id) if e.destination == str(demo.peer) and e.state == "failed"]
        assert {e.kind for e in refused} == kinds - {"rtdose", "doserate"}
        assert all("does not accept SOP Class" in e.last_error for e in refused)

        # The PACS routes all of it back to the node: each object is recognised as ours, no job, no region set.
        enqueuer = Enqueuer(make_celery(settings), store)
        node = DicomNode(settings, store, storage, enqueuer)
        node.start()
        try:
            node_peer = DicomPeer(settings.ae_title, "127.0.0.1", settings.dicom_port)
            assert push_files(node_peer, list(pacs.received), calling_aet="ALLPACS") == len(ours)
            returned = wait_for(lambda: store.audit_events(action="own_output_returned"), 10, what="the audit")
            assert returned[0].detail["instances"] == len(ours)
            time.sleep(settings.study_quiet_s * 3)
        finally:
            node.stop()
        assert [j.id for j in store.list_jobs()[0]] == [job_id] and store.incoming() == []
        assert store.region_sets_of(job_id) == []


# ------------------------------------------------------------------ 2. regions with the study


def test_a_seg_sent_with_the_study_is_the_jobs_regions(env, phantom_files, truth_seg):
    settings, store, storage = env()
    job_id = _job(store, storage, [*phantom_files, truth_seg])
    assert run_job(store, storage, settings, job_id, worker="w1")["state"] == "done"
    out = storage.job_output(job_id)
    import json

    summary = json.loads((out / "summary.json").read_text())
    seg_uid = str(pydicom.dcmread(truth_seg, stop_before_pixels=True).SOPInstanceUID)
    assert summary["regions_source"]["kind"] == "SEG" and summary["regions_source"]["sop_instance_uid"] == seg_uid
    assert not (out / "autoseg.dcm").exists(), "no automatic lesions when the study brings its regions"
    sr = pydicom.dcmread(out / "sr.dcm")
    assert seg_uid in str(sr), "the SR measures the segments of the SEG that came with the study"
    job = store.get(job_id)
    assert any("sent with the study is used" in w for w in job.result["region_warnings"])
    assert "sent with the study is used" in (out / "summary.txt").read_text(), "the text summary says it too"
    assert {"sr", "rtdose", "regions_rtstruct"} <= set(job.result["outputs"])


def test_a_seg_on_another_frame_of_reference_is_refused_and_the_dose_kept(env, phantom_files, truth_seg, tmp_path):
    settings, store, storage = env()
    wrong = _other_frame(truth_seg, tmp_path / "wrong.dcm")
    job_id = _job(store, storage, [*phantom_files, wrong])
    assert run_job(store, storage, settings, job_id, worker="w1")["state"] == "done"
    job = store.get(job_id)
    assert "rtdose" in job.result["outputs"], "the dose is computed all the same"
    refused = [w for w in job.result["region_warnings"] if w.startswith("REGIONS NOT REPORTED")]
    assert refused and "frame of reference" in refused[0], job.result["region_warnings"]


# ------------------------------------------------------------------ 3. regions after the dose, REST


@pytest.fixture()
def gateway(env, tmp_path):
    settings, store, storage = env()
    with TestClient(create_app(settings, sweeper=False)) as client:
        ctx = client.app.state.ctx
        yield settings, ctx.store, ctx.storage, client


def test_rest_regions_after_the_dose_make_a_new_version_without_touching_the_result(
        gateway, phantom_files, computed_output, truth_seg, tmp_path):
    settings, store, storage, client = gateway
    with AllClassesPacs(tmp_path / "pacs") as pacs:
        job_id = _done_job(settings, store, storage, phantom_files, computed_output, export=[str(pacs.peer)])
        first_sent = len(pacs.received)
        before = _sha(storage.job_output(job_id))
        dicom = {"Content-Type": "application/dicom", **AUTH}
        body = truth_seg.read_bytes()

        # refusals, each specific, nothing stored
        assert client.post(f"/jobs/{'0' * 32}/regions", content=body, headers=dicom).status_code == 404
        queued = _job(store, storage, phantom_files)
        r = client.post(f"/jobs/{queued}/regions", content=body, headers=dicom)
        assert r.status_code == 409 and "queued" in r.json()["detail"]
        r = client.post(f"/jobs/{job_id}/regions", content=b"not DICOM" * 50, headers=dicom)
        assert r.status_code == 400 and "not a readable DICOM" in r.json()["detail"]
        r = client.post(f"/jobs/{job_id}/regions", content=phantom_files[0].read_bytes(), headers=dicom)
        assert r.status_code == 415 and "SEG or RT Structure Set" in r.json()["detail"]
        r = client.post(f"/jobs/{job_id}/regions", content=_other_frame(truth_seg, tmp_path / "w.dcm").read_bytes(),
                        headers=dicom)
        assert r.status_code == 422 and "frame of reference" in r.json()["detail"]
        assert store.region_sets_of(job_id) == []

        r = client.post(f"/jobs/{job_id}/regions", content=body, headers=dicom)
        assert r.status_code == 202, r.text
        out = r.json()
        assert out["version"] == 1 and out["state"] == "queued" and r.headers["location"].endswith("/regions/1")
        again = client.post(f"/jobs/{job_id}/regions", content=body, headers=dicom)
        assert again.status_code == 200 and again.json()["region_set_id"] == out["region_set_id"]

        assert run_region_set(store, storage, settings, out["region_set_id"], worker="w1")["state"] == "done"
        version = client.get(f"/jobs/{job_id}/regions/1", headers=AUTH).json()
        assert version["state"] == "done" and version["kind"] == "SEG"
        n_regions = len(version["regions"])
        assert n_regions >= 5 and all(row["mean_gy"] > 0 for row in version["regions"])
        assert set(version["outputs"]) == {"rtdose", "regions_rtstruct", "sr"}

    # the result is as it was; the version is a folder beside it, new objects with new UIDs
    assert _sha(storage.job_output(job_id)) == before
    folder = storage.job_dir(job_id) / "regions" / "v1"
    old = store.get(job_id).result["outputs"]
    new = version["outputs"]
    assert new["sr"]["sop_instance_uid"] != old["sr"]["sop_instance_uid"]
    assert new["rtdose"]["sop_instance_uid"] != old["rtdose"]["sop_instance_uid"]
    rd = pydicom.dcmread(folder / "rtdose.dcm")
    assert len(rd.DVHSequence) == n_regions and str(rd.SeriesInstanceUID) == old["rtdose"]["series_instance_uid"]
    # sent where the job's results went: the new objects only, dose first
    sent = pacs.received[first_sent:]
    assert [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sent] == [
        new[k]["sop_instance_uid"] for k in ("rtdose", "regions_rtstruct", "sr")]
    assert {e["state"] for e in version["exports"]} == {"sent"} and len(version["exports"]) == 3
    listed = client.get(f"/jobs/{job_id}", headers=AUTH).json()["exports"]
    assert {e["sop_instance_uid"] for e in listed} >= {v["sop_instance_uid"] for v in new.values()}
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", str(folder / "sr.dcm")], capture_output=True, text=True).stderr
        assert "Error" not in report, report


# ------------------------------------------------------------------ 3. regions after the dose, DICOM push


def test_dicom_pushed_region_sets_after_the_dose(env, phantom_files, computed_output, truth_seg, tmp_path):
    settings, store, storage = env(dicom_port=free_port(), allowed_calling_aets=["VIEWER"])
    job_id = _done_job(settings, store, storage, phantom_files, computed_output)
    wrong = _other_frame(truth_seg, tmp_path / "wrong.dcm")
    stranger = pydicom.dcmread(truth_seg)
    stranger.StudyInstanceUID, stranger.SOPInstanceUID = generate_uid(), generate_uid()
    stranger.file_meta.MediaStorageSOPInstanceUID = stranger.SOPInstanceUID
    stranger.save_as(tmp_path / "stranger.dcm")
    node = DicomNode(settings, store, storage, Enqueuer(make_celery(settings), store))
    node.start()
    try:
        peer = DicomPeer(settings.ae_title, "127.0.0.1", settings.dicom_port)
        assert push_files(peer, [truth_seg, wrong, tmp_path / "stranger.dcm"], calling_aet="VIEWER") == 3
        sets = wait_for(lambda: len(s := store.region_sets_of(job_id)) == 2 and s, 20, what="the region sets")
        ignored = wait_for(lambda: [i for i in store.incoming() if i.state == "ignored"], 20, what="the stranger")
    finally:
        node.stop()
    good, refused = sorted(sets, key=lambda r: r.state != "queued")
    assert good.state == "queued" and good.source == "dicom" and good.submitted_by == "VIEWER"
    assert refused.state == "failed" and "frame of reference" in refused.reason
    assert "no job of this study" in ignored[0].note
    assert [j.id for j in store.list_jobs()[0]] == [job_id], "no dose recomputed"
    assert run_region_set(store, storage, settings, good.id, worker="w1")["state"] == "done"
    assert store.region_set(good.id).result["folder"] == f"regions/v{good.version}"


def test_region_sets_travel_with_the_study_into_the_jobs_input(gateway, phantom_dir, phantom_files, truth_seg,
                                                              tmp_path):
    """REST upload and DICOM push alike: the SEG is stored with the images (the worker takes it as the regions)."""
    settings, store, storage, client = gateway
    import zipfile

    body = tmp_path / "study.zip"
    with zipfile.ZipFile(body, "w") as zf:
        for p in [*phantom_files, truth_seg]:
            zf.write(p, p.relative_to(phantom_dir).as_posix())
    r = client.post("/studies", content=body.read_bytes(), headers={"Content-Type": "application/zip", **AUTH})
    assert r.status_code == 202, r.text
    seg_uid = str(pydicom.dcmread(truth_seg, stop_before_pixels=True).SOPInstanceUID)

    def region_uids(folder: Path) -> list[str]:
        from spectdose.dicom.region_inputs import find_region_inputs

        return [x.sop_instance_uid for x in find_region_inputs(folder)]

    assert region_uids(storage.job_input(r.json()["job_id"])) == [seg_uid]

    node_settings = make_settings(tmp_path / "node", database_url=settings.database_url, redis_url=settings.redis_url,
                                  dicom_port=free_port(), allowed_calling_aets=["MODALITY"])
    node = DicomNode(node_settings, store, Storage(node_settings.data_dir), Enqueuer(make_celery(node_settings), store))
    node.start()
    try:
        peer = DicomPeer(node_settings.ae_title, "127.0.0.1", node_settings.dicom_port)
        assert push_files(peer, [*phantom_files, truth_seg], calling_aet="MODALITY") == len(phantom_files) + 1
        job = wait_for(lambda: [j for j in store.list_jobs(source="dicom")[0]], 20, what="the pushed job")[0]
    finally:
        node.stop()
    node_storage = Storage(node_settings.data_dir)
    assert region_uids(node_storage.job_input(job.id)) == [seg_uid]

    assert job.fingerprint == content_fingerprint(sorted(p for p in node_storage.job_input(job.id).iterdir()
                                                         if not p.name.startswith("SEG_"))), "the images' fingerprint"


def test_region_set_records_number_versions_and_keep_one_per_content(db_url):
    """SQLite and PostgreSQL: versions 1, 2 per job; the same file is one version (a failed one may be retried)."""
    store = JobStore(db_url)
    store.create_job("b" * 32, source="rest", submitted_by="token:x", options={}, export=[], queue="cpu", n_files=1)
    first, created = store.add_region_set("b" * 32, region_set_id="1" * 32, source="rest", submitted_by="token:x",
                                          kind="SEG", sop_instance_uid="1.2.3", digest="d1")
    again, created_again = store.add_region_set("b" * 32, region_set_id="2" * 32, source="dicom",
                                                submitted_by="PACS", kind="SEG", sop_instance_uid="1.2.3", digest="d1")
    assert (first.version, created, again.id, created_again) == (1, True, "1" * 32, False)
    other, _ = store.add_region_set("b" * 32, region_set_id="3" * 32, source="rest", submitted_by="token:x",
                                    kind="RTSTRUCT", sop_instance_uid="1.2.4", digest="d2")
    assert other.version == 2 and not store.region_set_applied("b" * 32, "1.2.4"), "stored, not yet published"
    assert store.claim_region_set(other.id) == 1 and store.fail_region_set(other.id, "export failed")
    assert store.region_set_applied("b" * 32, "1.2.4"), "a refused set is not taken again from the same burst"
    assert store.claim_region_set(other.id) is None, "a failed set is not run again"
    retried, created = store.add_region_set("b" * 32, region_set_id="4" * 32, source="rest", submitted_by="token:x",
                                            kind="RTSTRUCT", sop_instance_uid="1.2.4", digest="d2")
    assert created and retried.version == 3
    assert store.mark_region_set_queued(first.id) and store.claim_region_set(first.id) == 1
    assert store.finish_region_set(first.id, {"version": 1}) and store.region_set(first.id).state == "done"
    assert [r.version for r in store.region_sets_of("b" * 32)] == [1, 2, 3]
    store.close()


def test_a_region_set_stored_while_the_queue_was_down_is_queued_when_polled(env, phantom_files, computed_output,
                                                                            truth_seg, tmp_path):
    port = free_port()
    settings, store, storage = env(redis_url=f"redis://127.0.0.1:{port}/0")  # the broker is down
    job_id = _done_job(settings, store, storage, phantom_files, computed_output)
    with TestClient(create_app(settings, sweeper=False)) as client:
        r = client.post(f"/jobs/{job_id}/regions", content=truth_seg.read_bytes(),
                        headers={"Content-Type": "application/dicom", **AUTH})
        assert r.status_code == 503 and "send the same file again" in r.json()["detail"]
        rec = store.region_sets_of(job_id)[0]
        assert rec.state == "received" and (storage.job_dir(job_id) / "regions" / f"{rec.id}.dcm").is_file()
        redis = LocalRedis(port, tmp_path / "redis").start()  # the broker is back
        try:
            time.sleep(5.5)
            polled = client.get(r.headers["location"], headers=AUTH).json()
            assert polled["state"] == "queued" and polled["region_set_id"] == rec.id
            import redis as redis_client

            with redis_client.Redis.from_url(settings.redis_url) as conn:
                assert conn.llen("cpu") == 1, "one message for the worker"
        finally:
            redis.stop()


def test_a_pushed_region_set_waits_out_a_broker_outage(env, phantom_files, computed_output, truth_seg, tmp_path):
    port = free_port()
    settings, store, storage = env(redis_url=f"redis://127.0.0.1:{port}/0", dicom_port=free_port(),
                                   allowed_calling_aets=["VIEWER"])  # the broker is down
    job_id = _done_job(settings, store, storage, phantom_files, computed_output)
    node = DicomNode(settings, store, storage, Enqueuer(make_celery(settings), store))
    node.start()
    redis = None
    try:
        peer = DicomPeer(settings.ae_title, "127.0.0.1", settings.dicom_port)
        assert push_files(peer, [truth_seg], calling_aet="VIEWER") == 1
        stored = wait_for(lambda: store.region_sets_of(job_id), 30, what="the stored region set")[0]
        assert stored.state == "received" and [i.state for i in store.incoming()] in (["receiving"], ["dispatching"])
        redis = LocalRedis(port, tmp_path / "redis").start()  # the broker is back: the next pass publishes it
        wait_for(lambda: store.region_sets_of(job_id)[0].state == "queued", 30, what="the region set queued")
        wait_for(lambda: [i.state for i in store.incoming()] == ["dispatched"], 10, what="the burst dispatched")
    finally:
        node.stop()
        if redis is not None:
            redis.stop()
    assert [r.id for r in store.region_sets_of(job_id)] == [stored.id], "one region set, published once stored"

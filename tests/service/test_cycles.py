"""Therapy cycles through the service: time points arriving by REST, grouped, re-integrated, exported.

The real gateway (TestClient, real Redis, SQLite job store) takes the studies; the worker
runs in-process: every message the gateway or the worker put on the Redis queue is taken
off in order and handed to the function its task name names (``worker.execute.run_job`` for
a dose job, ``worker.cycle_tasks.run_cycle_job`` for a cycle job), so publishing, the
worker's cycle hook and the cycle job are the production code paths; only Celery's
consumer loop is left out (test_e2e_cycles.py runs the real worker).

One small virtual patient (seed 8) at 4, 24 and 96 h with the ideal camera (seconds, not
minutes); the DICOM SEG of its VOIs travels with the first time point of a cycle, so the cycle
has kidney, marrow and lesion regions. Copies of it (new UIDs, dates moved, another PatientID,
or more activity) make the other patient and the second cycle.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
import threading
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from service.celery_app import TASK_NAME, make_celery
from service.config import DicomPeer
from service.cycles import (
    CYCLE_TASK_NAME,
    KIDNEY_ABSORBED_LIMIT_GY,
    KIDNEY_BED_LIMIT_GY,
    patient_key,
)
from service.jobs import JobStore
from service.localredis import free_port
from service.main import create_app
from service.storage import Storage
from worker.cycle_tasks import run_cycle_job
from worker.execute import run_job

from .support import AUTH, make_settings, zip_folder

SEED = 8
TIME_POINTS_H = (4, 24, 96)
LABELS = ("tp004h", "tp024h", "tp096h")
# The single-study job of a 4 h or 24 h time point: Hanscheid's model is refused there, so a site
# imaging cycles asks for the dose rate only (time_model=none, or SPECTDOSE_DEFAULT_TIME_MODEL=none):
# each time point gives its dose-rate map, the cycle the absorbed dose.
TP_OPTIONS = {"time_model": "none", "export": "PACS"}


# ------------------------------------------------------------------ helpers


class Pacs:
    """A C-STORE SCP for every storage class: what the service sends, by SOP Instance UID."""

    def __init__(self):
        self.port = free_port()
        self.received: dict[str, pydicom.Dataset] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    def of_kind(self, modality: str) -> dict[str, pydicom.Dataset]:
        with self._lock:
            return {uid: ds for uid, ds in self.received.items() if ds.Modality == modality}

    def stop(self) -> None:
        self._server.shutdown()


def _shift(value: str, days: int, vr: str) -> str:
    if not value:
        return value
    day = dt.datetime.strptime(value[:8], "%Y%m%d") + dt.timedelta(days=days)
    return day.strftime("%Y%m%d") + (value[8:] if vr == "DT" else "")


def variant(study: Path, dest: Path, *, patient_id: str | None = None, days: int = 0,
            activity_factor: float = 1.0, with_seg: bool = False, move_administration: bool = True,
            flip_ct: bool = False, uncalibrated: bool = False) -> Path:
    """A copy of a phantom time point as another visit: new UIDs (references kept consistent),
    dates moved by ``days`` (the administration's too unless not ``move_administration``),
    optionally another PatientID, ``activity_factor`` x the activity, the CT mirrored front to
    back (a CT that cannot be registered), or a SPECT without its Bq/ml mapping (uncalibrated)."""
    files = sorted((study / "dicom").rglob("*.dcm")) + ([study / "truth" / "seg.dcm"] if with_seg else [])
    datasets = [pydicom.dcmread(p) for p in files]
    mapping: dict[str, str] = {}
    for ds in datasets:
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if kw in ds:
                mapping.setdefault(str(ds.data_element(kw).value), str(generate_uid()))

    def rewrite(ds, elem) -> None:
        if elem.VR == "UI" and isinstance(elem.value, str) and elem.value in mapping:
            elem.value = mapping[elem.value]
        elif elem.VR in ("DA", "DT") and days and isinstance(elem.value, str):
            if move_administration or not elem.keyword.startswith("Radiopharmaceutical"):
                elem.value = _shift(elem.value, days, elem.VR)
        elif elem.keyword == "RealWorldValueSlope" and activity_factor != 1.0:
            elem.value = float(elem.value) * activity_factor
        elif elem.keyword == "RadionuclideTotalDose" and activity_factor != 1.0:
            elem.value = f"{float(elem.value) * activity_factor:.6g}"

    dest.mkdir(parents=True)
    for i, ds in enumerate(datasets):
        ds.walk(rewrite)
        if patient_id is not None:
            ds.PatientID = patient_id
        if flip_ct and ds.Modality == "CT":
            ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1, :]).tobytes()
        if uncalibrated and ds.Modality == "NM":
            del ds.RealWorldValueMappingSequence
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dest / f"{i:05d}.dcm", enforce_file_format=True)
    return dest


class Service:
    """The gateway under test, its job store and data, and the in-process worker."""

    def __init__(self, root: Path, redis_url: str, pacs: Pacs):
        self.settings = make_settings(root / "data", redis_url=redis_url, peers=[str(DicomPeer("PACS", "127.0.0.1",
                                                                                               pacs.port))])
        self.client = TestClient(create_app(self.settings, sweeper=False))
        self.client.__enter__()
        self.store = JobStore(self.settings.db_url)
        self.storage = Storage(self.settings.data_dir)
        self.ran: list[tuple[str, str]] = []
        self.zips = root / "zips"
        self.zips.mkdir()

    def submit(self, folder: Path, **params) -> str:
        body = zip_folder(folder, self.zips / f"{len(list(self.zips.iterdir()))}.zip").read_bytes()
        rsp = self.client.post("/studies", params={**TP_OPTIONS, **params}, content=body,
                               headers={**AUTH, "Content-Type": "application/zip"})
        assert rsp.status_code == 202, rsp.text
        return rsp.json()["job_id"]

    def drain(self) -> list[tuple[str, str]]:
        """Run every queued task in order (a dose job's hook may queue a cycle job: run that too)."""
        import redis

        queue = self.settings.job_queue
        ran = []
        with redis.Redis.from_url(self.settings.redis_url) as r:
            while (raw := r.rpop(queue)) is not None:  # kombu LPUSHes and (B)RPOPs: first in, first out
                msg = json.loads(raw)
                body = msg["body"]
                if msg.get("properties", {}).get("body_encoding") == "base64":
                    body = base64.b64decode(body)
                task, arg = msg["headers"]["task"], json.loads(body)[0][0]
                if task == TASK_NAME:
                    out = run_job(self.store, self.storage, self.settings, arg, worker="test-worker")
                elif task == CYCLE_TASK_NAME:
                    out = run_cycle_job(self.store, self.storage, self.settings, arg, worker="test-worker")
                else:
                    raise AssertionError(f"unexpected task {task}")
                assert "skipped" not in out, out
                ran.append((task, arg))
        self.ran += ran
        return ran

    def get(self, path: str, **params):
        rsp = self.client.get(path, params=params, headers=AUTH)
        assert rsp.status_code == 200, (path, rsp.status_code, rsp.text)
        return rsp.json()

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self.store.close()


@pytest.fixture(scope="module")
def cycle_dir(tmp_path_factory, kernel_cache_dir) -> Path:
    from spectdose.phantoms.cycle import generate_cycle

    out = tmp_path_factory.mktemp("svc-cycle")
    generate_cycle(out, SEED, "small", TIME_POINTS_H, truth_engine="dvk", kernel_cache_dir=kernel_cache_dir,
                   camera="ideal", seg="all")
    return out


@pytest.fixture(scope="module")
def patient_id(cycle_dir) -> str:
    nm = next((cycle_dir / LABELS[0] / "dicom" / "NM").glob("*.dcm"))
    return str(pydicom.dcmread(nm, stop_before_pixels=True).PatientID)


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_server):
    import redis

    with redis.Redis.from_url(redis_server.url) as r:
        r.flushdb()
    pacs = Pacs()
    svc = Service(tmp_path_factory.mktemp("svc"), redis_server.url, pacs)
    svc.pacs = pacs
    yield svc
    svc.close()
    pacs.stop()


@pytest.fixture(scope="module")
def first_cycle(service, cycle_dir, tmp_path_factory):
    """Three time points by REST, one after the other; what the service showed after each."""
    studies = tmp_path_factory.mktemp("first")
    seen: dict = {"jobs": [], "after": []}
    for k, label in enumerate(LABELS):
        folder = variant(cycle_dir / label, studies / label, with_seg=(k == 0))
        job_id = service.submit(folder)
        ran = service.drain()
        seen["jobs"].append(job_id)
        cycles = service.get("/cycles", job_id=job_id)["cycles"]
        assert len(cycles) == 1, cycles
        cycle_id = cycles[0]["cycle_id"]
        rtdose = service.client.get(f"/cycles/{cycle_id}/rtdose", headers=AUTH)
        seen["after"].append({"ran": ran, "cycle": cycles[0], "rtdose_status": rtdose.status_code,
                              "rtdose": pydicom.dcmread(io.BytesIO(rtdose.content))
                              if rtdose.status_code == 200 else None,
                              "pacs_rtdose": dict(service.pacs.of_kind("RTDOSE"))})
    seen["cycle_id"] = cycle_id
    return seen


# ------------------------------------------------------------------ tests


def test_each_time_point_is_computed_and_the_cycle_reintegrated_as_time_points_arrive(service, first_cycle):
    jobs, after = first_cycle["jobs"], first_cycle["after"]
    for job_id in jobs:
        job = service.get(f"/jobs/{job_id}")
        assert job["state"] == "done", job  # each time point's own dose-rate result
    # After time point 1: a cycle of one time point, nothing to integrate yet.
    assert [t for t, _ in after[0]["ran"]] == [TASK_NAME]
    assert after[0]["cycle"]["state"] == "collecting" and after[0]["cycle"]["results"] == []
    assert after[0]["rtdose_status"] == 409
    # After time points 2 and 3: a cycle job each, over the time points then held.
    assert [t for t, _ in after[1]["ran"]] == [TASK_NAME, CYCLE_TASK_NAME]
    assert [t for t, _ in after[2]["ran"]] == [TASK_NAME, CYCLE_TASK_NAME]
    final = after[2]["cycle"]
    assert final["state"] == "integrated" and final["joined"] == 3
    assert [tp["job_id"] for tp in final["time_points"]] == jobs
    assert [tp["state"] for tp in final["time_points"]] == ["joined"] * 3
    assert [round(tp["hours_after_administration"]) for tp in final["time_points"]] == list(TIME_POINTS_H)
    newest, older = final["results"]
    assert newest["state"] == older["state"] == "done"
    assert older["used"] == jobs[:2] and newest["used"] == jobs
    assert older["superseded_by"] == newest["result_id"] and not newest["superseded"]
    assert final["newest_result_id"] == newest["result_id"]
    # Each result is its own RT Dose series naming the time points (studies) it integrated.
    first, second = after[1]["rtdose"], after[2]["rtdose"]
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    studies = [tp["study_instance_uid"] for tp in final["time_points"]]
    assert all(uid in second.DerivationDescription for uid in studies)
    assert studies[2] not in first.DerivationDescription and studies[1] in first.DerivationDescription
    assert str(second.SeriesInstanceUID) == newest["rtdose"]["series_instance_uid"]
    # Sent to the PACS: each cycle RT Dose when it was the newest; the time points (time model none)
    # sent their dose-rate maps and no single-time-point RT Dose to be misread as the cycle's dose.
    assert str(first.SOPInstanceUID) in after[1]["pacs_rtdose"]
    pacs = after[2]["pacs_rtdose"]
    assert set(pacs) == {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}, "the two cycle RT Doses only"
    for job_id in jobs:
        job = service.get(f"/jobs/{job_id}")
        assert "doserate" in job["outputs"] and "rtdose" not in job["outputs"], job["outputs"]
        assert any("dose rate only (time model none)" in w for w in job["warnings"])
    # The regions of the SEG sent with time point 1: kidneys with BED, lesions.
    regions = {r["region"]: r for r in newest["regions"]}
    assert {"kidney_left", "kidney_right", "lumbar_vertebrae", "lesion_1"} <= set(regions)
    assert regions["kidney_left"]["bed_gy"] > regions["kidney_left"]["absorbed_dose_gy"] > 0


def test_a_study_of_another_patient_is_not_joined_and_is_computed_on_its_own(service, first_cycle, cycle_dir,
                                                                           tmp_path):
    cycle_id = first_cycle["cycle_id"]
    other = variant(cycle_dir / LABELS[2], tmp_path / "other", patient_id="OTHER-PATIENT-1", days=1)
    job_id = service.submit(other, cycle_id=cycle_id)
    ran = service.drain()
    assert [t for t, _ in ran] == [TASK_NAME], "no cycle job for a study that did not join"
    assert service.get(f"/jobs/{job_id}")["state"] == "done"
    cycle = service.get(f"/cycles/{cycle_id}")
    tp = next(t for t in cycle["time_points"] if t["job_id"] == job_id)
    assert tp["state"] == "rejected"
    assert "another patient" in tp["reason"] and "PatientID" in tp["reason"]
    assert "OTHER-PATIENT-1" not in tp["reason"], "the reason names the field, never the ID"
    assert cycle["joined"] == 3 and cycle["newest_result_id"] == first_cycle["after"][2]["cycle"]["newest_result_id"]


def test_cumulative_sums_two_cycles_and_flags_the_kidney_limits(service, first_cycle, cycle_dir, patient_id,
                                                                tmp_path, caplog):
    # Cycle 2, eight weeks later: 24 h and 96 h, ten times the activity (the kidneys' dose with it).
    caplog.set_level(logging.INFO)
    jobs = [service.submit(variant(cycle_dir / label, tmp_path / label, days=56, activity_factor=10.0,
                                   with_seg=(label == LABELS[1])))  # its regions, on its first CT
            for label in LABELS[1:]]
    ran = service.drain()
    assert [t for t, _ in ran].count(CYCLE_TASK_NAME) == 1
    second = service.get("/cycles", job_id=jobs[0])["cycles"][0]
    assert second["cycle_id"] != first_cycle["cycle_id"] and second["state"] == "integrated"

    out = service.get(f"/patients/{patient_id}/cumulative")
    assert out["cycles_included"] == 2
    assert [c["cycle_id"] for c in out["cycles"]] == [first_cycle["cycle_id"], second["cycle_id"]]
    per_cycle = {c["cycle_id"]: {r["region"]: r for r in c["results"][0]["regions"]}
                 for c in (service.get(f"/cycles/{first_cycle['cycle_id']}"), second)}
    kidney = next(r for r in out["regions"] if r["region"] == "kidney_left")
    assert kidney["kind"] == "kidney" and kidney["cycles"] == 2
    one, two = (per_cycle[c]["kidney_left"] for c in per_cycle)
    assert kidney["absorbed_dose_gy"] == pytest.approx(one["absorbed_dose_gy"] + two["absorbed_dose_gy"], rel=1e-6)
    assert kidney["bed_gy"] == pytest.approx(one["bed_gy"] + two["bed_gy"], rel=1e-6)
    assert one["absorbed_dose_gy"] < KIDNEY_ABSORBED_LIMIT_GY <= kidney["absorbed_dose_gy"]
    assert kidney["exceeds"] == {"absorbed_dose_gy": True, "bed_gy": kidney["bed_gy"] >= KIDNEY_BED_LIMIT_GY}
    assert kidney["exceeds"]["bed_gy"], kidney
    assert any(f.startswith("kidney_left: cumulative absorbed dose") for f in out["flags"])
    assert out["kidney_limits"]["absorbed_dose_gy"] == 23.0 and out["kidney_limits"]["bed_gy"] == 28.0
    marrow = next(r for r in out["regions"] if r["region"] == "lumbar_vertebrae")
    assert marrow["kind"] == "red_marrow" and "exceeds" not in marrow
    assert any(r["kind"] == "lesion" and r["cycles"] == 2 for r in out["regions"])
    # The PatientID is the key of the route, never written to the logs or the tables.
    service_logs = [r for r in caplog.records if not r.name.startswith("httpx")]  # httpx: the test's own client
    assert service_logs and not [r for r in service_logs if patient_id in r.getMessage()]
    assert patient_key(patient_id) != patient_id
    assert service.client.get("/patients/NOBODY/cumulative", headers=AUTH).status_code == 404


def test_studies_that_cannot_join_get_a_reason_and_keep_their_own_result(service, first_cycle, cycle_dir, tmp_path):
    cycle_id = first_cycle["cycle_id"]
    tp2 = first_cycle["jobs"][1]
    duplicate = variant(cycle_dir / LABELS[1], tmp_path / "dup")  # the 24 h session again, as another study
    early = variant(cycle_dir / LABELS[0], tmp_path / "early", days=-2)  # a session before this administration
    uncalibrated = variant(cycle_dir / LABELS[2], tmp_path / "uncal", days=2, move_administration=False,
                           uncalibrated=True)
    jobs = {"duplicate": service.submit(duplicate, cycle_id=cycle_id),
            "early": service.submit(early, cycle_id=cycle_id),
            "uncalibrated": service.submit(uncalibrated, cycle_id=cycle_id, normalised="true")}
    ran = service.drain()
    assert [t for t, _ in ran] == [TASK_NAME] * 3, "no cycle job: nothing joined"
    for job_id in jobs.values():
        assert service.get(f"/jobs/{job_id}")["state"] == "done", "each is still computed on its own"
    cycle = service.get(f"/cycles/{cycle_id}")
    reasons = {what: next(t for t in cycle["time_points"] if t["job_id"] == job_id) for what, job_id in jobs.items()}
    assert all(tp["state"] == "rejected" for tp in reasons.values()), reasons
    assert "duplicate time point" in reasons["duplicate"]["reason"] and tp2 in reasons["duplicate"]["reason"]
    assert "before the cycle's administration" in reasons["early"]["reason"]
    assert "not calibrated to Bq/ml" in reasons["uncalibrated"]["reason"]
    assert cycle["joined"] == 3 and len(cycle["results"]) == 2


def test_a_time_point_failing_registration_is_left_out_with_its_metric(service, first_cycle, cycle_dir, tmp_path):
    cycle_id = first_cycle["cycle_id"]
    # A fourth session a day after the third, its CT mirrored front to back: it cannot be registered.
    bad = variant(cycle_dir / LABELS[2], tmp_path / "bad", days=1, move_administration=False, flip_ct=True)
    job_id = service.submit(bad, cycle_id=cycle_id)
    ran = service.drain()
    assert [t for t, _ in ran] == [TASK_NAME, CYCLE_TASK_NAME]
    cycle = service.get(f"/cycles/{cycle_id}")
    tp = next(t for t in cycle["time_points"] if t["job_id"] == job_id)
    assert tp["state"] == "rejected" and "registration" in tp["reason"], tp
    assert "CT correlation r = " in tp["reason"] and "needs >= 0.8" in tp["reason"]
    newest = cycle["results"][0]
    assert newest["state"] == "done" and newest["time_points"] == first_cycle["jobs"] + [job_id]
    assert newest["used"] == first_cycle["jobs"], "integrated without the time point that failed"
    assert newest["excluded"] == [{"job_id": job_id, "reason": tp["reason"]}]


def test_routes_need_the_token_and_refuse_bad_ids(service):
    for path in ("/cycles", "/cycles/x", "/cycles/x/rtdose", "/patients/x/cumulative"):
        assert service.client.get(path).status_code == 401, path
    assert service.client.get("/cycles/unknown-cycle", headers=AUTH).status_code == 404
    rsp = service.client.post("/studies", params={"cycle_id": "bad id!"}, content=b"x",
                              headers={**AUTH, "Content-Type": "application/zip"})
    assert rsp.status_code == 422 and "cycle_id" in rsp.text


def test_the_worker_registers_the_cycle_task(service):
    app = make_celery(service.settings)
    app.loader.import_default_modules()
    assert {TASK_NAME, CYCLE_TASK_NAME} <= set(app.tasks)


# ------------------------------------------------------------------ the cycle tables on SQLite and PostgreSQL


def _finished_job(store, storage, tmp_path, *, patient_id: str, administration: dt.datetime, hours: float,
                  units: str = "Bq/ml", name: str = "VP^X", issuer: str | None = None, birth: str = "",
                  activity_mbq: float | None = None, cycle_id: str | None = None,
                  issuer_universal_id: tuple[str, str] | None = None) -> str:
    """A done dose job as the worker leaves it (input NM header, summary.json), without computing a dose."""
    from pydicom.dataset import FileMetaDataset

    job_id = uuid.uuid4().hex
    series, study = str(generate_uid()), str(generate_uid())
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.20"  # NM Image Storage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = str(generate_uid())
    ds.Modality, ds.PatientID, ds.PatientName, ds.PatientBirthDate = "NM", patient_id, name, birth
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    if issuer_universal_id is not None:  # the issuer given only in the qualifiers (PS3.3 C.7.1.1)
        item = pydicom.Dataset()
        item.UniversalEntityID, item.UniversalEntityIDType = issuer_universal_id
        ds.IssuerOfPatientIDQualifiersSequence = [item]
    ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
    src = tmp_path / f"{job_id}.dcm"
    ds.save_as(src, enforce_file_format=True)
    storage.publish_input(job_id, [src])
    store.create_job(job_id, source="rest", submitted_by="token:x", options={"method": "dvk"}, export=[],
                     queue="cpu", n_files=1, study_instance_uid=study)
    if cycle_id is not None:
        from service.cycles import note_cycle_request

        note_cycle_request(store, job_id, cycle_id)
    attempt = store.claim(job_id, "w", lease_s=60, max_attempts=3)
    work = storage.new_work_dir(job_id, attempt)
    acquisition = administration + dt.timedelta(hours=hours)
    (work / "summary.json").write_text(json.dumps({
        "series": {"spect": {"series_instance_uid": series}},
        "activity": {"units": units, "injected_activity_mbq": activity_mbq},
        "time": {"administration": administration.isoformat(), "acquisition": acquisition.isoformat(),
                 "hours_since_administration": hours}}))
    storage.publish_output(job_id, work, {"files": {"summary_json": {"file": "summary.json"}}})
    assert store.finish(job_id, attempt, {"summary_json": "summary.json"})
    return job_id


def test_grouping_results_and_superseding_in_the_job_store(db_url, tmp_path):
    from service import cycles

    settings = make_settings(tmp_path / "data", database_url=db_url)
    store, storage = JobStore(settings.db_url), Storage(settings.data_dir)
    published: list[str] = []

    def publish(result_id: str) -> bool:
        published.append(result_id)
        return True

    def offer(**kw) -> tuple[str, str | None]:
        job_id = _finished_job(store, storage, tmp_path, **kw)
        return job_id, cycles.time_point_done(store, storage, settings, job_id, publish=publish)

    t0 = dt.datetime(2026, 3, 2, 9, 30)
    try:
        a, none = offer(patient_id="P1", administration=t0, hours=4.0)
        assert none is None and published == [], "one time point: nothing to integrate"
        b, r1 = offer(patient_id="P1", administration=t0 + dt.timedelta(seconds=60), hours=24.0)
        assert published == [r1]
        cycle_id = cycles.cycles_of_job(store, a)[0]["cycle_id"]
        assert cycles.cycles_of_job(store, b)[0]["cycle_id"] == cycle_id
        assert cycles.time_point_done(store, storage, settings, b, publish=publish) is None, "offered once"
        dup, _ = offer(patient_id="P1", administration=t0, hours=24.2)
        later, _ = offer(patient_id="P1", administration=t0 + dt.timedelta(days=56), hours=4.0)
        other, _ = offer(patient_id="P2", administration=t0, hours=96.0)
        uncal, _ = offer(patient_id="P1", administration=t0, hours=48.0, units="counts")
        view = cycles.cycle_view(store, cycle_id)
        states = {tp["job_id"]: (tp["state"], tp["reason"] or "") for tp in view["time_points"]}
        assert states[a][0] == states[b][0] == "joined" and view["joined"] == 2
        assert states[dup][0] == "rejected" and "duplicate time point" in states[dup][1]
        assert later not in states and other not in states, "another administration, another patient: own cycles"
        assert cycles.cycles_of_job(store, later)[0]["cycle_id"] not in (cycle_id,)
        assert cycles.cycles_of_job(store, other)[0]["cycle_id"] not in (cycle_id,)
        assert states[uncal][0] == "rejected" and "not calibrated to Bq/ml" in states[uncal][1]
        c, r2 = offer(patient_id="P1", administration=t0, hours=96.0)
        assert published == [r1, r2]
        # r2 (newer) finishes first; r1 finishing later is superseded at once and is not the one to send.
        for rid in (r2, r1):
            row = cycles.claim_result(store, rid, "w", lease_s=60)
            assert row is not None and cycles.claim_result(store, rid, "w2", lease_s=60) is None, "claimed once"
            assert cycles.is_newest(store, rid) == (rid == r2)
            assert cycles.finish_result(store, rid, row.attempt, outputs={}, result={"regions": []},
                                        used=list(row.time_points))
        assert cycles.get_result(store, r1).superseded_by == r2 and cycles.get_result(store, r2).superseded_by is None
        assert cycles.newest_result(store, cycle_id).id == r2
        view = cycles.cycle_view(store, cycle_id)
        assert view["state"] == "integrated" and [r["result_id"] for r in view["results"]] == [r2, r1]
        summed = cycles.cumulative(store, "P1")
        assert summed["cycles_included"] == 1 and len(summed["cycles"]) == 2  # and the later administration's
        assert cycles.cumulative(store, "NOBODY") is None
    finally:
        store.close()

"""End to end on loopback with real peers: `spectdose serve` (local Redis started by it,
gateway, DICOM node, Celery worker), dcmtk storescu/storescp, Orthanc, and an HTTP client.

One ``serve`` process is shared by the module; each test pushes its own copy of the
virtual patient (fresh UIDs where tests must not see each other as duplicates), so the
module runs the full pipeline only a handful of times.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from service.localredis import free_port, redis_answers

from .support import AUTH, TOKEN, running, wait_for, zip_folder

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")
ORTHANC = Path("/usr/sbin/Orthanc")
ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 300


def _need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/bootstrap.sh --test-tools installs them)")


def reuid(files: list[Path], dest: Path) -> list[Path]:
    """Copy a study with new Study/Series/SOP/Frame-of-Reference UIDs (another patient visit)."""
    mapping: dict[str, str] = {}

    def new(uid) -> str:
        return mapping.setdefault(str(uid), generate_uid())

    out = []
    dest.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(files):
        ds = pydicom.dcmread(p)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if kw in ds:
                setattr(ds, kw, new(getattr(ds, kw)))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for item in ds.get("ReferencedImageSequence", []) or []:
            if "ReferencedSOPInstanceUID" in item:
                item.ReferencedSOPInstanceUID = new(item.ReferencedSOPInstanceUID)
        target = dest / f"{i:05d}.dcm"
        ds.save_as(target)
        out.append(target)
    return out


class Service:
    """A running ``spectdose serve`` and the peers around it."""

    def __init__(self, root: Path):
        self.root = root
        self.data_dir = root / "data"
        self.http_port, self.dicom_port, self.redis_port = free_port(), free_port(), free_port()
        self.modality_port, self.archive_port, self.orthanc_dicom_port = free_port(), free_port(), free_port()
        self.modality_dir, self.archive_dir = root / "modality-scp", root / "archive-scp"
        self.log = root / "serve.log"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.http = httpx.Client(base_url=self.url, headers=AUTH, timeout=30)

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "service.cli", "serve", "--http-port", str(self.http_port),
            "--dicom-port", str(self.dicom_port), "--ae-title", "SPECTDOSE", "--data-dir", str(self.data_dir),
            "--redis-url", self.redis_url, "--quiet-s", "2",
            "--export", "sender", "--export", f"ARCHIVE@127.0.0.1:{self.archive_port}",
            "--peer", f"MODALITY@127.0.0.1:{self.modality_port}",
            "--peer", f"ORTHANC@127.0.0.1:{self.orthanc_dicom_port}",
        ]

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/jobs/{job_id}").json()

    def wait_done(self, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> dict:
        job = wait_for(lambda: (j := self.job(job_id))["state"] in ("done", "failed") and j, timeout_s, 0.5,
                       what=f"job {job_id} to finish")
        assert job["state"] == "done", job
        return job

    def jobs(self, **params) -> list[dict]:
        return self.http.get("/jobs", params=params).json()["jobs"]

    def tail(self) -> str:
        return self.log.read_text()[-6000:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def service(tmp_path_factory, phantom_files):
    _need(STORESCU, STORESCP, Path("/usr/bin/redis-server"))
    svc = Service(tmp_path_factory.mktemp("e2e"))
    for d in (svc.modality_dir, svc.archive_dir):
        d.mkdir()
    assert not redis_answers(svc.redis_url), "the test wants serve to start its own Redis"
    env = {**os.environ, "SPECTDOSE_API_TOKENS": TOKEN, "SPECTDOSE_LOG_LEVEL": "INFO"}
    with running([str(STORESCP), "-aet", "MODALITY", "-od", str(svc.modality_dir), str(svc.modality_port)]), \
            running([str(STORESCP), "-aet", "ARCHIVE", "-od", str(svc.archive_dir), str(svc.archive_port)]), \
            open(svc.log, "w") as log, \
            running(svc.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT) as proc:
        try:
            wait_for(lambda: proc.poll() is None and _up(svc.url), 60, what="serve to answer /health")
            wait_for(lambda: (svc.data_dir / "run" / "worker.pid").exists(), 30, what="the worker")
            yield svc
        except BaseException:
            print(svc.tail())
            raise
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print(svc.tail())
                raise
    assert not redis_answers(svc.redis_url), "serve stopped the Redis it started"
    svc.http.close()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _dicom_files(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()) if p.is_file()]


def _sop_uids(job_dir: Path) -> dict[str, str]:
    manifest = json.loads((job_dir / "output" / ".complete.json").read_text())
    return {k: v["sop_instance_uid"] for k, v in manifest["files"].items() if "sop_instance_uid" in v}


# ------------------------------------------------------------------ REST


def test_rest_submission_with_an_http_client(service, phantom_dir, tmp_path):
    body = zip_folder(phantom_dir / "dicom", tmp_path / "study.zip").read_bytes()
    assert service.http.post("/studies", content=body, headers={"Authorization": "Bearer nope",
                                                                "Content-Type": "application/zip"}).status_code == 401
    r = service.http.post("/studies", content=body, headers={"Content-Type": "application/zip"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert service.http.get(r.headers["location"]).json()["job_id"] == job_id
    seen = set()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = service.job(job_id)
        seen.add((job["state"], job["stage"]))
        if job["state"] in ("done", "failed"):
            break
        time.sleep(0.2)
    assert job["state"] == "done", job
    assert any(state == "running" and stage not in (None, "starting") for state, stage in seen), seen
    rtdose = service.http.get(f"/jobs/{job_id}/rtdose")
    assert rtdose.status_code == 200 and rtdose.headers["content-type"] == "application/dicom"
    (tmp_path / "rd.dcm").write_bytes(rtdose.content)
    ds = pydicom.dcmread(tmp_path / "rd.dcm")
    assert ds.Modality == "RTDOSE" and ds.DoseUnits == "GY"
    assert ds.StudyInstanceUID == job["study_instance_uid"]
    pm = service.http.get(f"/jobs/{job_id}/doserate")
    assert pm.status_code == 200 and len(pm.content) > 1000
    summary = service.http.get(f"/jobs/{job_id}/summary").json()
    assert summary["dose"]["max_gy"] > 0
    assert job["method"] == summary["method"] == "dvk", "the service's default engine is the CLI's"
    assert job["warnings"] == summary["warnings"] and job["provenance"]["software"] == summary["software"]
    log = service.log.read_text()
    assert all(f"job {job_id}: result warning: {w}" in log for w in job["warnings"])
    assert "Absorbed dose" in service.http.get(f"/jobs/{job_id}/summary", params={"format": "text"}).text
    assert job_id in [j["job_id"] for j in service.jobs(state="done", source="rest")]
    assert 'spectdose_jobs{state="done"}' in httpx.get(f"{service.url}/metrics").text

    # regions after the dose: the clinic's SEG, through the Celery worker, a new version beside the result
    r = service.http.post(f"/jobs/{job_id}/regions", content=(phantom_dir / "truth" / "seg.dcm").read_bytes(),
                          headers={"Content-Type": "application/dicom"})
    assert r.status_code == 202, r.text
    version = wait_for(lambda: (v := service.http.get(r.headers["location"]).json())["state"] in ("done", "failed")
                       and v, 120, 0.5, what="the region set version")
    assert version["state"] == "done" and version["version"] == 1, version
    assert version["regions"] and set(version["outputs"]) >= {"sr", "rtdose"}
    assert (service.data_dir / "jobs" / job_id / "regions" / "v1" / "sr.dcm").is_file()
    assert service.http.get(f"/jobs/{job_id}/rtdose").content == rtdose.content, "the result is untouched"


# ------------------------------------------------------------------ DIMSE: storescu -> node -> storescp


def test_storescu_push_comes_back_as_dicom_to_sender_and_archive(service, phantom_dir, phantom_files):
    r = subprocess.run([str(STORESCU), "-aet", "MODALITY", "-aec", "SPECTDOSE", "+sd", "+r", "127.0.0.1",
                        str(service.dicom_port), str(phantom_dir / "dicom")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    job = wait_for(lambda: service.jobs(calling_aet="MODALITY"), 30, what="the job of the pushed study")[0]
    job = service.wait_done(job["job_id"])
    assert job["source"] == "dicom" and job["files"] == len(phantom_files)
    expected = _sop_uids(service.data_dir / "jobs" / job["job_id"])
    for folder in (service.modality_dir, service.archive_dir):
        got = wait_for(lambda f=folder: len(_dicom_files(f)) >= len(expected) and _dicom_files(f), 30,
                       what=f"results in {folder}")
        assert {str(d.SOPInstanceUID) for d in got} == set(expected.values())
        assert {d.Modality for d in got} >= {"RTDOSE", "SEG", "RTSTRUCT", "SR"}
        assert {str(d.StudyInstanceUID) for d in got} == {job["study_instance_uid"]}
    assert {(e["destination"], e["state"]) for e in job["exports"]} == {
        (f"MODALITY@127.0.0.1:{service.modality_port}", "sent"), (f"ARCHIVE@127.0.0.1:{service.archive_port}", "sent")}
    rest = [j for j in service.jobs(source="rest", state="done")]
    if rest:  # same input and options as the REST job: the same output UIDs (a PACS replaces, never duplicates)
        assert _sop_uids(service.data_dir / "jobs" / rest[-1]["job_id"]) == expected


# ------------------------------------------------------------------ Orthanc auto-forwarding, no loop


def test_orthanc_autoforward_gets_results_back_without_a_loop(service, phantom_files, tmp_path):
    _need(ORTHANC)
    files = reuid(phantom_files, tmp_path / "study")
    http_port = free_port()
    (tmp_path / "forward.lua").write_text(
        "function OnStableStudy(studyId, tags, metadata)\n"
        "  RestApiPost('/modalities/spectdose/store', studyId)\n"  # the whole study, over C-STORE
        "end\n")
    config = {
        "Name": "spectdose-e2e", "StorageDirectory": str(tmp_path / "storage"),
        "IndexDirectory": str(tmp_path / "index"), "HttpPort": http_port, "DicomPort": service.orthanc_dicom_port,
        "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "StableAge": 2,
        "DicomModalities": {"spectdose": ["SPECTDOSE", "127.0.0.1", service.dicom_port]},
        "LuaScripts": [str(tmp_path / "forward.lua")], "Plugins": [], "DicomAlwaysAllowStore": True,
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    orthanc_url = f"http://127.0.0.1:{http_port}"
    with open(tmp_path / "orthanc.log", "w") as log, \
            running([str(ORTHANC), "--verbose", str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT):
        wait_for(lambda: _orthanc_up(orthanc_url), 30, what="Orthanc")
        for p in files:
            assert httpx.post(f"{orthanc_url}/instances", content=p.read_bytes(), timeout=30).status_code == 200
        job = wait_for(lambda: service.jobs(calling_aet="ORTHANC"), 60, what="Orthanc's forwarded study")[0]
        job = service.wait_done(job["job_id"])
        study_uid = job["study_instance_uid"]

        def orthanc_modalities():
            found = httpx.post(f"{orthanc_url}/tools/find", json={"Level": "Series", "Query": {
                "StudyInstanceUID": study_uid}, "Expand": True}).json()
            return {s["MainDicomTags"].get("Modality") for s in found}

        mods = wait_for(lambda: {"RTDOSE", "SR", "SEG", "RTSTRUCT", "DOC"} <= (m := orthanc_modalities()) and m, 60,
                        what="the results stored in Orthanc")
        assert {"CT", "NM", "RTDOSE"} <= mods
        _results_in_the_source_study(orthanc_url, study_uid, job, files)
        # Orthanc now sees a changed study, waits StableAge and forwards all of it again,
        # our results included: recognised, and no second job.
        wait_for(lambda: [i for i in _incoming(service) if i == "duplicate"], 60, what="the re-forwarded study")
        time.sleep(3)
        assert [j["job_id"] for j in service.jobs(calling_aet="ORTHANC")] == [job["job_id"]]
        sent = [e for e in job["exports"] if e["destination"].startswith("ORTHANC@")]
        assert {e["sop_instance_uid"] for e in sent} == set(_sop_uids(service.data_dir / "jobs" / job["job_id"]).values())
        assert all(e["state"] == "sent" for e in sent)


def _results_in_the_source_study(orthanc_url: str, study_uid: str, job: dict, files: list[Path]) -> None:
    """In Orthanc: the SR, the RT Dose with its DVHs, the automatic-lesion SEG and the PDF report are in the patient and
    study of the pushed CT and SPECT (Orthanc's own patient/study resources, checked over its REST API)."""
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    studies = httpx.post(f"{orthanc_url}/tools/find", json={"Level": "Study", "Query": {
        "StudyInstanceUID": study_uid}}, timeout=30).json()
    assert len(studies) == 1, "one study in the PACS: results and source together"
    study = httpx.get(f"{orthanc_url}/studies/{studies[0]}", timeout=30).json()
    patient = httpx.get(f"{orthanc_url}/patients/{study['ParentPatient']}", timeout=30).json()
    assert patient["MainDicomTags"]["PatientID"] == str(source.PatientID)
    assert len(httpx.get(f"{orthanc_url}/patients", timeout=30).json()) == 1, "no second patient"
    outputs = job["provenance"]["outputs"]
    for kind in ("sr", "rtdose", "autoseg", "report_pdf"):
        found = httpx.post(f"{orthanc_url}/tools/lookup", content=outputs[kind]["sop_instance_uid"], timeout=30).json()
        instance = next(f for f in found if f["Type"] == "Instance")
        meta = httpx.get(f"{orthanc_url}/instances/{instance['ID']}", timeout=30).json()
        series = httpx.get(f"{orthanc_url}/series/{meta['ParentSeries']}", timeout=30).json()
        assert series["ParentStudy"] == studies[0], f"{kind} in the source study"
        ds = pydicom.dcmread(io.BytesIO(httpx.get(f"{orthanc_url}/instances/{instance['ID']}/file",
                                                   timeout=30).content))
        assert (str(ds.StudyInstanceUID), str(ds.PatientID)) == (study_uid, str(source.PatientID))
        if kind == "rtdose":
            assert len(ds.DVHSequence) >= 1 and "ReferencedStructureSetSequence" in ds, "the RT DVH module"
        if kind == "autoseg":
            assert ds.Modality == "SEG" and ds.ContentLabel == "AUTOHOTSPOTS"
        if kind == "sr":
            assert ds.Modality == "SR" and ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        if kind == "report_pdf":
            assert ds.Modality == "DOC" and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
            assert bytes(ds.EncapsulatedDocument).startswith(b"%PDF-")


def _orthanc_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/system", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _incoming(service: Service) -> list[str]:
    from service.jobs import JobStore

    store = JobStore(f"sqlite:///{service.data_dir / 'jobs.sqlite'}")
    try:
        return [i.state for i in store.incoming() if i.calling_aet == "ORTHANC"]
    finally:
        store.close()


# ------------------------------------------------------------------ recomputation reaches a real PACS


def _orthanc_sops(orthanc_url: str, study_uid: str, modality: str = "*") -> set[str]:
    """SOP Instance UIDs Orthanc holds in the study (of one modality, or all)."""
    found = httpx.post(f"{orthanc_url}/tools/find", json={"Level": "Series", "Query": {
        "StudyInstanceUID": study_uid, "Modality": modality}}, timeout=30).json()
    sops = set()
    for series in found:
        for inst in httpx.get(f"{orthanc_url}/series/{series}/instances", timeout=30).json():
            sops.add(inst["MainDicomTags"]["SOPInstanceUID"])
    return sops


def _earlier_administration(files: list[Path], dest: Path, hours: float) -> list[Path]:
    """The same instances (same SOP Instance UIDs), the NM administration time corrected."""
    import datetime as dt

    dest.mkdir()
    out = []
    for p in files:
        ds = pydicom.dcmread(p)
        if ds.Modality == "NM":
            rp = ds.RadiopharmaceuticalInformationSequence[0]
            t = dt.datetime.strptime(str(rp.RadiopharmaceuticalStartDateTime)[:14], "%Y%m%d%H%M%S")
            t -= dt.timedelta(hours=hours)
            rp.RadiopharmaceuticalStartDateTime = t.strftime("%Y%m%d%H%M%S")
            rp.RadiopharmaceuticalStartTime = t.strftime("%H%M%S")
        ds.save_as(dest / p.name)
        out.append(dest / p.name)
    return out


def test_recomputation_reaches_orthanc_as_new_instances_an_identical_retry_does_not(service, phantom_files,
                                                                                      tmp_path):
    """Orthanc with default settings: what a changed option or input computes is a new object next to the
    old one (new SOP Instance UIDs, both stored, the new series naming the old); an identical retry or
    recomputation gives the same UIDs, so Orthanc holds no extra instance."""
    _need(ORTHANC)
    files = reuid(phantom_files, tmp_path / "study")
    http_port = free_port()
    config = {"Name": "spectdose-pacs", "StorageDirectory": str(tmp_path / "storage"),
              "IndexDirectory": str(tmp_path / "index"), "HttpPort": http_port,
              "DicomPort": service.orthanc_dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": []}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    orthanc_url = f"http://127.0.0.1:{http_port}"
    study_zip = zip_folder(tmp_path / "study", tmp_path / "study.zip").read_bytes()
    changed_dir = tmp_path / "changed"
    _earlier_administration(files, changed_dir, hours=6)
    changed_zip = zip_folder(changed_dir, tmp_path / "changed.zip").read_bytes()

    def submit(body: bytes, expect: int, **params) -> str:
        r = service.http.post("/studies", content=body, headers={"Content-Type": "application/zip"},
                              params={"export": "ORTHANC", **params})
        assert r.status_code == expect, r.text
        return r.json()["job_id"]

    def outputs(job: dict) -> dict[str, str]:
        return {k: v["sop_instance_uid"] for k, v in job["provenance"]["outputs"].items()}

    with open(tmp_path / "orthanc.log", "w") as log, \
            running([str(ORTHANC), str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT):
        wait_for(lambda: _orthanc_up(orthanc_url), 30, what="Orthanc")
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

        first = service.wait_done(submit(study_zip, 202))
        assert first["method"] == "dvk" and first["replaces"] is None
        assert {e["state"] for e in first["exports"]} == {"sent"} and len(first["exports"]) == len(outputs(first))
        ours = set(outputs(first).values())
        held = _orthanc_sops(orthanc_url, study_uid)
        assert held == ours and _orthanc_sops(orthanc_url, study_uid, "RTDOSE") == {outputs(first)["rtdose"]}

        # the client retries the upload: the same job; recomputing it: the same objects, nothing new in Orthanc
        assert submit(study_zip, 200) == first["job_id"]
        retry = service.wait_done(submit(study_zip, 202, recompute="true"))
        assert retry["job_id"] != first["job_id"] and outputs(retry) == outputs(first)
        assert retry["replaces"] is None and {e["state"] for e in retry["exports"]} == {"sent"}
        assert _orthanc_sops(orthanc_url, study_uid) == held, "no new instance in the PACS"

        # another option: new objects next to the old ones, naming what they replace
        physical = service.wait_done(submit(study_zip, 202, time_model="physical"))
        # every object that carries the dose is new; the automatic lesions (from the activity alone) are the same
        dosed = ("rtdose", "doserate", "sr")
        assert not {outputs(physical)[k] for k in dosed} & ours
        assert outputs(physical)["autoseg"] == outputs(first)["autoseg"]
        assert physical["replaces"]["series_instance_uid"] == first["provenance"]["outputs"]["rtdose"][
            "series_instance_uid"]
        assert physical["replaces"]["reason"] == "options changed (time_model)"
        assert _orthanc_sops(orthanc_url, study_uid) == held | set(outputs(physical).values()), "both present"

        # the same instances with a corrected administration time: computed again, a third RT Dose
        corrected = service.wait_done(submit(changed_zip, 202))
        assert corrected["replaces"]["reason"].startswith("input changed")
        assert not {outputs(corrected)[k] for k in dosed} & (ours | set(outputs(physical).values()))
        assert _orthanc_sops(orthanc_url, study_uid) == held | set(outputs(physical).values()) | set(
            outputs(corrected).values())
        assert _orthanc_sops(orthanc_url, study_uid, "RTDOSE") == {outputs(j)["rtdose"] for j in
                                                                   (first, physical, corrected)}
        rd = httpx.get(f"{orthanc_url}/instances/{_orthanc_id(orthanc_url, outputs(corrected)['rtdose'])}/file",
                       timeout=30)
        (tmp_path / "corrected.dcm").write_bytes(rd.content)
        ds = pydicom.dcmread(tmp_path / "corrected.dcm", stop_before_pixels=True)
        assert "CORRECTED" in ds.SeriesDescription
        assert f"replaces {physical['provenance']['outputs']['rtdose']['series_instance_uid']}" in ds.ImageComments
        first_max = service.http.get(f"/jobs/{first['job_id']}/summary").json()["dose"]["max_gy"]
        corrected_max = service.http.get(f"/jobs/{corrected['job_id']}/summary").json()["dose"]["max_gy"]
        assert corrected_max != pytest.approx(first_max, rel=1e-3), "6 h earlier: another dose"


def _orthanc_id(orthanc_url: str, sop_uid: str) -> str:
    found = httpx.post(f"{orthanc_url}/tools/lookup", content=sop_uid, timeout=30).json()
    return next(f["ID"] for f in found if f["Type"] == "Instance")


# ------------------------------------------------------------------ a worker killed mid-job


def test_worker_killed_mid_job_is_restarted_and_finishes_once(service, phantom_files, tmp_path):
    files = reuid(phantom_files, tmp_path / "study")
    body = zip_folder(tmp_path / "study", tmp_path / "study.zip").read_bytes()
    r = service.http.post("/studies", content=body, headers={"Content-Type": "application/zip"},
                          params={"export": "MODALITY"})
    job_id = r.json()["job_id"]
    wait_for(lambda: service.job(job_id)["state"] == "running", 60, 0.05, what="the job to start")
    pid = int((service.data_dir / "run" / "worker.pid").read_text())
    os.killpg(pid, signal.SIGKILL)  # the worker and its pool child, mid-job
    job = service.wait_done(job_id)
    assert job["attempt"] == 2, "one interrupted attempt, one that finished"
    assert len(files) == job["files"]
    new_pid = int((service.data_dir / "run" / "worker.pid").read_text())
    assert new_pid != pid
    job_dir = service.data_dir / "jobs" / job_id
    assert sorted(p.name for p in job_dir.iterdir()) == ["input", "output"], "no leftover work folder"
    n_objects = len(job["provenance"]["outputs"])
    assert [e["state"] for e in job["exports"]] == ["sent"] * n_objects and all(e["attempts"] == 1 for e in job["exports"])
    # The killed worker's message is still unacknowledged in Redis and comes back one day
    # (visibility timeout); delivering it now must change nothing.
    from service.celery_app import make_celery
    from service.config import Settings

    broker = (service.data_dir / "redis" / "url").read_text().strip()  # serve's Redis has a generated password
    app = make_celery(Settings(environment="development", redis_url=broker, data_dir=tmp_path))
    app.send_task("spectdose.process_job", args=[job_id], queue="cpu")
    import redis

    with redis.Redis.from_url(broker) as r:
        wait_for(lambda: r.llen("cpu") == 0, 30, 0.1, what="the duplicate message to be consumed")
    time.sleep(1.0)
    again = service.job(job_id)
    assert (again["state"], again["attempt"], again["finished_at"]) == ("done", 2, job["finished_at"])
    assert len(again["exports"]) == n_objects


# ------------------------------------------------------------------ the README's main command


def test_serve_demo_brings_everything_up_and_shows_the_results(tmp_path, phantom_dir):
    _need(Path("/usr/bin/redis-server"))
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data / "demo" / "virtual-patient")  # the session's patient: not made twice
    cmd = [sys.executable, "-m", "service.cli", "serve", "--data-dir", str(data), "--http-port", str(free_port()),
           "--dicom-port", str(free_port()), "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--quiet-s", "2",
           "--demo", "--exit-after-demo"]
    env = {k: v for k, v in os.environ.items() if k != "SPECTDOSE_API_TOKENS"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out, running(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT) as proc:
        try:
            rc = proc.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
    text = log.read_text()
    assert rc == 0, text[-6000:]
    assert "API authentication OFF (local demo)" in text and "(started here)" in text
    assert "results came back to DEMO_PACS@127.0.0.1" in text
    paths = [Path(line.split("[demo]", 1)[1].strip()) for line in text.splitlines()
             if line.startswith("[demo]") and line.strip().endswith(".dcm")]
    # every result object: RT Dose (with DVHs), dose-rate map, automatic-lesion SEG, their RT Structure Set,
    # the TID 1500 SR and the PDF report
    assert {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in paths} >= {"RTDOSE", "SEG", "RTSTRUCT", "SR",
                                                                                    "DOC"}
    assert len(paths) == 6 and all(p.parent == data / "demo-pacs" for p in paths)


# ------------------------------------------------------------------ logs


def test_logs_carry_no_patient_names_or_ids(service, phantom_files):
    """Gateway, node and worker all log to this file: UIDs, AE titles and counts only."""
    text = service.log.read_text()
    assert "spectdose serve:" in text, "the log is the service's"
    ds = pydicom.dcmread(phantom_files[0], stop_before_pixels=True)
    for value in (str(ds.PatientName), str(ds.PatientName).replace("^", " "), str(ds.PatientID)):
        if len(value) >= 3:
            assert value not in text, f"patient attribute {value!r} in the service log"

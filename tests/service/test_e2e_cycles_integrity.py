"""Issue 19, cases 1-4, end to end: `spectdose serve` (its own Redis, gateway, DICOM node, Celery worker).

One small virtual patient (seed 8) imaged 24 h and 72 h after an administration, and copies of
it as other studies (new UIDs, dates moved, another name or issuer). In order:

- case 3: the worker's process group SIGKILLed while it integrates the cycle: the restarted worker
  takes the cycle result back, it finishes once (attempt 2), its RT Dose is sent once;
- case 1: another person's two studies under the same PatientID (another name and birth date,
  another administration) are held as identity conflicts, never counted; the same ID from another
  issuer is another patient; a conflict is resolved over REST and audited;
- case 2: the patient's two studies sent again with ``cycle_id=dup8&recompute=true`` are refused
  for dup8 naming the existing cycle; the cumulative dose is unchanged;
- case 4: a study pushed as an association aborted after 30 of its instances and a second one with
  the other 35 is refused as incomplete (nothing sent back), the same 35 over REST are 422, and the
  whole study sent again is computed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from service import cycles
from service.config import DicomPeer
from service.jobs import JobStore
from service.localredis import free_port
from service.storage import Storage

from .support import AUTH, TOKEN, push_study, running, wait_for, zip_folder
from .test_cycles import Pacs, variant

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
LABELS = ("tp024h", "tp072h")
TIMEOUT_S = 420


class CountingPacs(Pacs):
    """The sender's C-STORE SCP, counting every C-STORE it answers (a result sent twice counts 2)."""

    def __init__(self):
        self.stores: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        super().__init__()

    def _on_store(self, event) -> int:
        with self._count_lock:
            self.stores[str(event.request.AffectedSOPInstanceUID)] += 1
        return super()._on_store(event)

    def studies(self) -> set[str]:
        with self._lock:
            return {str(ds.StudyInstanceUID) for ds in self.received.values()}


def _restamp(folder: Path, **attrs) -> Path:
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        if ds.Modality in ("CT", "NM"):
            for keyword, value in attrs.items():
                setattr(ds, keyword, value)
            ds.save_as(path, enforce_file_format=True)
    return folder


class Serve:
    def __init__(self, root: Path, pacs: CountingPacs):
        self.root, self.data = root, root / "data"
        self.http_port, self.dicom_port, self.redis_port = free_port(), free_port(), free_port()
        self.log = root / "serve.log"
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", headers=AUTH, timeout=60)
        self.node = DicomPeer("SPECTDOSE", "127.0.0.1", self.dicom_port)
        self.cmd = [sys.executable, "-m", "service.cli", "serve", "--http-port", str(self.http_port), "--dicom-port",
                    str(self.dicom_port), "--ae-title", "SPECTDOSE", "--data-dir", str(self.data), "--redis-url",
                    f"redis://127.0.0.1:{self.redis_port}/0", "--quiet-s", "2", "--export", "sender",
                    "--peer", f"MODALITY@127.0.0.1:{pacs.port}"]
        # A site imaging cycles (dose-rate maps per study); short leases so a lost worker shows in seconds.
        self.env = {**os.environ, "SPECTDOSE_API_TOKENS": TOKEN, "SPECTDOSE_LOG_LEVEL": "INFO",
                    "SPECTDOSE_DEFAULT_TIME_MODEL": "none", "SPECTDOSE_HEARTBEAT_S": "2", "SPECTDOSE_LEASE_S": "20",
                    "SPECTDOSE_SWEEP_INTERVAL_S": "2", "SPECTDOSE_RECONCILE_INTERVAL_S": "5"}
        self.zips = root / "zips"
        self.zips.mkdir()

    def post(self, folder: Path, **params) -> httpx.Response:
        body = zip_folder(folder, self.zips / f"{len(list(self.zips.iterdir()))}.zip").read_bytes()
        return self.http.post("/studies", params={"time_model": "none", "export": "MODALITY", **params}, content=body,
                              headers={"Content-Type": "application/zip"})

    def submit(self, folder: Path, **params) -> str:
        rsp = self.post(folder, **params)
        assert rsp.status_code == 202, rsp.text
        return rsp.json()["job_id"]

    def finished(self, job_id: str) -> dict:
        return wait_for(lambda: (j := self.http.get(f"/jobs/{job_id}").json())["state"] in ("done", "failed") and j,
                        TIMEOUT_S, 0.5, what=f"job {job_id}")

    def cycle_of(self, job_id: str) -> dict | None:
        found = self.http.get("/cycles", params={"job_id": job_id}).json()["cycles"]
        return found[0] if found else None

    def offered(self, job_id: str) -> dict:
        """The job's time point, once the worker has offered its finished job to a cycle."""
        def look():
            cycle = self.cycle_of(job_id)
            tp = next((t for t in (cycle or {}).get("time_points", []) if t["job_id"] == job_id), None)
            return tp is not None and tp["state"] != "pending" and (tp | {"cycle_id": cycle["cycle_id"]})
        return wait_for(look, 60, 0.5, what=f"job {job_id} offered to a cycle")


@pytest.fixture(scope="module")
def studies(tmp_path_factory, kernel_cache_dir) -> dict[str, Path]:
    from spectdose.phantoms.cycle import generate_cycle

    root = tmp_path_factory.mktemp("integrity")
    generate_cycle(root / "cyc8", 8, "small", (24, 72), truth_engine="dvk", kernel_cache_dir=kernel_cache_dir,
                   camera="ideal", seg="all")
    out = {}
    for k, label in enumerate(LABELS):
        out[f"a{k}"] = variant(root / "cyc8" / label, root / f"a{k}", with_seg=(k == 0))
        # Another person under the same PatientID, eight weeks later (another administration); the
        # phantom's own studies leave PatientBirthDate empty, so only the name is compared.
        out[f"b{k}"] = _restamp(variant(root / "cyc8" / label, root / f"b{k}", days=56),
                                PatientName="OTHER^PERSON", PatientBirthDate="19710707")
    out["c0"] = _restamp(variant(root / "cyc8" / LABELS[0], root / "c0", days=28), IssuerOfPatientID="OTHER-HOSPITAL")
    out["d1"] = variant(root / "cyc8" / LABELS[1], root / "d1", days=84)
    return out


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    if not Path("/usr/bin/redis-server").exists():
        pytest.skip("needs redis-server (scripts/bootstrap.sh --test-tools)")
    pacs = CountingPacs()
    svc = Serve(tmp_path_factory.mktemp("serve"), pacs)
    svc.pacs = pacs
    try:
        with open(svc.log, "w") as log, running(svc.cmd, cwd=ROOT, env=svc.env, stdout=log,
                                                stderr=subprocess.STDOUT) as proc:
            try:
                wait_for(lambda: proc.poll() is None and _up(svc.http), 90, what="serve to answer /health")
                wait_for(lambda: (svc.data / "run" / "worker.pid").exists(), 60, what="the worker")
                yield svc
            except BaseException:
                print(svc.log.read_text()[-8000:])
                raise
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=90)
    finally:
        svc.http.close()
        pacs.stop()


@pytest.fixture(scope="module")
def first_cycle(serve, studies) -> dict:
    """Case 3: the patient's cycle, its integration interrupted by a SIGKILL of the worker."""
    jobs = [serve.submit(studies["a0"]), serve.submit(studies["a1"])]
    for job_id in jobs:
        assert serve.finished(job_id)["state"] == "done"

    def integrating():
        cycle = serve.cycle_of(jobs[1])
        results = (cycle or {}).get("results") or []
        return results and results[0]["state"] in ("running", "done") and results[0]
    result = wait_for(integrating, TIMEOUT_S, 0.05, what="the cycle integration to start")
    assert result["state"] == "running", "the integration finished before it could be interrupted"
    pid = int((serve.data / "run" / "worker.pid").read_text())
    os.killpg(pid, signal.SIGKILL)  # the worker and its pool child, mid-integration

    def final():
        cycle = serve.cycle_of(jobs[1])
        return cycle["state"] in ("integrated", "failed") and cycle
    cycle = wait_for(final, TIMEOUT_S, 0.5, what="the cycle result after the worker was killed")
    return {"jobs": jobs, "cycle": cycle, "killed_pid": pid}


def test_case3_a_cycle_integration_killed_mid_way_is_rerun_once_and_sent_once(serve, first_cycle):
    cycle = first_cycle["cycle"]
    assert cycle["state"] == "integrated", cycle
    (result,) = cycle["results"]
    assert result["state"] == "done" and result["attempt"] == 2, "one interrupted attempt, one that finished"
    assert result["used"] == first_cycle["jobs"]
    assert int((serve.data / "run" / "worker.pid").read_text()) != first_cycle["killed_pid"]
    uid = result["rtdose"]["sop_instance_uid"]
    wait_for(lambda: serve.pacs.stores[uid] >= 1, 30, what="the cycle RT Dose at the sender")
    assert serve.pacs.stores[uid] == 1, "sent exactly once"
    result_dir = cycles.result_dir(Storage(serve.data), cycle["cycle_id"], result["result_id"])
    assert sorted(p.name for p in result_dir.iterdir()) == ["output"], "no leftover work folder"
    store = JobStore(f"sqlite:///{serve.data / 'jobs.sqlite'}")
    try:
        events = [e.action for e in store.audit_events() if e.detail.get("result_id") == result["result_id"]]
    finally:
        store.close()
    assert events.count("cycle_result_done") == 1 and events.count("cycle_result_created") == 1


def test_case1_another_patient_under_the_same_id_is_held_and_not_counted(serve, first_cycle, studies):
    pid = str(pydicom.dcmread(next(studies["a0"].glob("*.dcm")), stop_before_pixels=True).PatientID)
    before = serve.http.get(f"/patients/{pid}/cumulative").json()
    kidney_before = next(r for r in before["regions"] if r["region"] == "kidney_left")["absorbed_dose_gy"]
    held = [serve.submit(studies["b0"]), serve.submit(studies["b1"])]
    other_issuer = serve.submit(studies["c0"])
    for job_id in (*held, other_issuer):
        assert serve.finished(job_id)["state"] == "done", "each study is computed on its own"
    for job_id in held:
        tp = serve.offered(job_id)
        assert tp["state"] == "conflict", tp
        # The patient's own studies carry no birth date (type 2, empty): the name is what differs.
        assert "identity conflict" in tp["reason"] and "but PatientName differs" in tp["reason"], tp["reason"]
        assert "OTHER" not in tp["reason"] and pid not in tp["reason"], "field names, never values"
    assert serve.cycle_of(held[1])["results"] == [], "nothing integrated from held studies"
    listed = serve.http.get("/cycles").json()["conflicts"]
    assert {c["job_id"] for c in listed} == set(held)
    own = serve.offered(other_issuer)
    assert own["state"] == "joined" and own["cycle_id"] != first_cycle["cycle"]["cycle_id"]

    after = serve.http.get(f"/patients/{pid}/cumulative").json()
    assert [c["cycle_id"] for c in after["cycles"]] == [first_cycle["cycle"]["cycle_id"]]
    assert next(r for r in after["regions"] if r["region"] == "kidney_left")["absorbed_dose_gy"] == kidney_before
    assert {h["job_id"] for h in after["held_conflicts"]} == set(held)
    other = serve.http.get(f"/patients/{pid}/cumulative", params={"issuer": "OTHER-HOSPITAL"}).json()
    assert [c["cycle_id"] for c in other["cycles"]] == [own["cycle_id"]]

    # Resolved explicitly, over REST: the first is another person; bad decisions and repeats are refused.
    cycle_b = serve.offered(held[0])["cycle_id"]
    url = f"/cycles/{cycle_b}/conflicts/{held[0]}/resolve"
    assert serve.http.post(url, json={"decision": "maybe"}).status_code == 422
    assert httpx.post(serve.http.base_url.join(url), json={"decision": "other_patient"}).status_code == 401
    rsp = serve.http.post(url, json={"decision": "other_patient"})
    assert rsp.status_code == 200 and rsp.json()["state"] == "rejected", rsp.text
    assert serve.http.post(url, json={"decision": "same_patient"}).status_code == 409
    assert serve.http.post(f"/cycles/{cycle_b}/conflicts/{'0' * 32}/resolve",
                           json={"decision": "other_patient"}).status_code == 404
    store = JobStore(f"sqlite:///{serve.data / 'jobs.sqlite'}")
    try:
        conflicts = store.audit_events(action="cycle_identity_conflict")
        resolved = store.audit_events(action="cycle_conflict_resolved")
    finally:
        store.close()
    assert {e.job_id for e in conflicts} == set(held)
    assert all(e.detail["fields"] == ["PatientName"] for e in conflicts)
    assert [(e.job_id, e.detail["decision"]) for e in resolved] == [(held[0], "other_patient")]
    assert resolved[0].actor.startswith("token:")
    log = serve.log.read_text()
    assert "OTHER^PERSON" not in log and pid not in log, "no patient name or ID in the service log"


def test_case2_the_same_administration_sent_again_with_a_new_cycle_id_is_refused_naming_the_cycle(
        serve, first_cycle, studies):
    pid = str(pydicom.dcmread(next(studies["a0"].glob("*.dcm")), stop_before_pixels=True).PatientID)
    before = serve.http.get(f"/patients/{pid}/cumulative").json()
    again = [serve.submit(studies[k], cycle_id="dup8", recompute="true") for k in ("a0", "a1")]
    for job_id in again:
        assert serve.finished(job_id)["state"] == "done"
        tp = serve.offered(job_id)
        assert tp["state"] == "rejected" and tp["cycle_id"] == "dup8", tp
        assert f"already belongs to cycle {first_cycle['cycle']['cycle_id']}" in tp["reason"]
    dup = serve.http.get("/cycles/dup8").json()
    assert dup["joined"] == 0 and dup["results"] == [] and dup["state"] == "collecting"
    after = serve.http.get(f"/patients/{pid}/cumulative").json()
    assert after["cycles_included"] == before["cycles_included"] == 1
    assert after["regions"] == before["regions"], "counted once"


def test_case4_a_study_cut_by_an_aborted_association_is_refused_until_whole(serve, studies, tmp_path):
    files = sorted(studies["d1"].glob("*.dcm"))
    datasets = [pydicom.dcmread(p) for p in files]
    study_uid = str(datasets[0].StudyInstanceUID)
    assert len(files) == 65 and sum(ds.Modality == "CT" for ds in datasets) == 64
    ae = AE(ae_title="MODALITY")
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", serve.dicom_port, ae_title="SPECTDOSE")
    assert assoc.is_established
    for ds in datasets[:30]:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.abort()  # the sender gives up half-way ...
    assert push_study(serve.node, files[30:], calling_aet="MODALITY") == 35  # ... and sends the rest later

    def job_of_study():
        jobs = serve.http.get("/jobs", params={"study_instance_uid": study_uid}).json()["jobs"]
        return jobs and jobs[0]["state"] in ("done", "failed") and jobs[0]
    job = wait_for(job_of_study, TIMEOUT_S, 0.5, what="the job of the pieced-together study")
    assert job["state"] == "failed", job
    assert job["reason"].startswith("incomplete study:") and "does not reach the SPECT's axial extent" in job["reason"]
    assert job["files"] == 35 and not job.get("outputs"), "nothing computed"
    # The same 35 instances over REST: refused, nothing stored.
    part = tmp_path / "part"
    part.mkdir()
    for p in files[30:]:
        (part / p.name).write_bytes(p.read_bytes())
    rsp = serve.post(part)
    assert rsp.status_code == 422 and "incomplete study" in rsp.json()["detail"], rsp.text
    assert study_uid not in serve.pacs.studies(), "nothing sent from the incomplete study"
    # The whole study sent again: every instance of the study is there now, and it is computed.
    assert push_study(serve.node, files, calling_aet="MODALITY") == 65

    def whole():
        jobs = serve.http.get("/jobs", params={"study_instance_uid": study_uid}).json()["jobs"]
        return len(jobs) == 2 and jobs[0]["state"] in ("done", "failed") and jobs[0]
    done = wait_for(whole, TIMEOUT_S, 0.5, what="the job of the whole study")
    assert done["state"] == "done" and done["files"] == 65, done
    wait_for(lambda: study_uid in serve.pacs.studies(), 60, what="its results at the sender")


def _up(http: httpx.Client) -> bool:
    try:
        return http.get("/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False

"""``spectdose serve --demo``: push a virtual patient to the node and show where results land.

The demo plays the hospital's two sides on loopback: a *modality* pushes a small virtual
patient (written by :mod:`spectdose.phantoms.anatomy`) to our DICOM node over C-STORE, and a
*PACS* (a real C-STORE SCP, ``DEMO_PACS``) receives the RT Dose and the dose-rate map
that the service sends back. The same job is visible over REST.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import httpx
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    EncapsulatedPDFStorage,
    ParametricMapStorage,
    RTDoseStorage,
    RTStructureSetStorage,
    SegmentationStorage,
)

from .config import DicomPeer, Settings
from .export import push_files
from .localredis import free_port
from .storage import atomic_write_bytes, safe_component

__all__ = ["DemoPacs", "run_demo", "DEMO_SCU_AET", "DEMO_PACS_AET"]

log = logging.getLogger("spectdose.service.demo")

DEMO_SCU_AET = "DEMO_MODALITY"
DEMO_PACS_AET = "DEMO_PACS"


# Every class the service sends back: the dose objects, the region objects and the PDF report.
RESULT_SOP_CLASSES = (RTDoseStorage, ParametricMapStorage, SegmentationStorage, RTStructureSetStorage,
                      Comprehensive3DSRStorage, EncapsulatedPDFStorage)


class DemoPacs:
    """A C-STORE SCP that files what it receives under ``folder/<modality>_<SOP UID>.dcm``;
    ``sop_classes`` narrows what it accepts (a PACS that refuses some classes)."""

    def __init__(self, folder: Path, port: int | None = None, sop_classes=RESULT_SOP_CLASSES):
        self.folder = Path(folder)
        self.port = port or free_port()
        self.sop_classes = tuple(sop_classes)
        self.received: list[Path] = []
        self._lock = threading.Lock()
        self._server = None

    @property
    def peer(self) -> DicomPeer:
        return DicomPeer(DEMO_PACS_AET, "127.0.0.1", self.port)

    def _on_store(self, event) -> int:
        ds = event.dataset
        path = self.folder / f"{ds.Modality}_{safe_component(str(ds.SOPInstanceUID))}.dcm"
        atomic_write_bytes(path, event.encoded_dataset())
        with self._lock:
            self.received.append(path)
        return 0x0000

    def start(self) -> DemoPacs:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=DEMO_PACS_AET)
        for uid in self.sop_classes:
            ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


# Scanned 93 h after administration, inside the single-time-point model's 48-168 h: the demo
# must compute a dose with the default (Hanscheid) model, which refuses times outside that range.
DEMO_SEED = 8


def run_demo(settings: Settings, pacs: DemoPacs, *, http_url: str, say=print, timeout_s: float = 1800) -> int:
    """Generate, push, wait for the result to come back; print every place to look. Returns 0 if done."""
    from spectdose.phantoms import generate

    study = settings.data_dir / "demo" / f"virtual-patient-seed{DEMO_SEED}"
    files = sorted((study / "dicom").rglob("*.dcm")) if (study / "dicom").exists() else []
    if not files:
        say(f"[demo] 1/4 writing a small virtual patient (seed {DEMO_SEED}) to {study} (about a minute) ...")
        generate(study, DEMO_SEED, size="small")
        files = sorted((study / "dicom").rglob("*.dcm"))
    node = DicomPeer(settings.ae_title, "127.0.0.1", settings.dicom_port)
    say(f"[demo] 2/4 pushing {len(files)} instances from {DEMO_SCU_AET} to {node} (C-STORE) ...")
    stored = push_files(node, files, calling_aet=DEMO_SCU_AET)
    say(f"[demo]     {stored}/{len(files)} stored; the study is complete after {settings.study_quiet_s:.0f} s "
        "without new instances")
    say("[demo] 3/4 waiting for the job (GET /jobs?calling_aet=" + DEMO_SCU_AET + ") ...")
    headers = {"Authorization": f"Bearer {settings.api_tokens[0]}"} if settings.auth_enabled else {}
    deadline = time.monotonic() + timeout_s
    job, last = None, None
    with httpx.Client(base_url=http_url, headers=headers, timeout=10) as client:
        while time.monotonic() < deadline:
            jobs = client.get("/jobs", params={"calling_aet": DEMO_SCU_AET, "limit": 1}).json()["jobs"]
            job = jobs[0] if jobs else None
            if job:
                now = (job["state"], job["stage"])
                if now != last:
                    say(f"[demo]     job {job['job_id']}: {job['state']}"
                        + (f", {job['stage']} {100 * job['progress']:.0f} %" if job["state"] == "running" else ""))
                    last = now
                if job["state"] in ("done", "failed"):
                    break
            time.sleep(1.0)
    if not job or job["state"] != "done":
        say(f"[demo] the job did not finish: {job['reason'] if job else 'no job was created'}")
        return 1
    say(f"[demo] 4/4 results came back to {pacs.peer} by C-STORE:")
    for path in sorted(pacs.received):
        say(f"[demo]     {path}")
    say(f"[demo] and over REST: {http_url}/jobs/{job['job_id']} (rtdose, doserate, report, summary); "
        f"in a browser: {http_url}/ui/jobs/{job['job_id']}"
        + (" (log in with the API token)" if settings.auth_enabled else ""))
    summary = settings.data_dir / "jobs" / job["job_id"] / "output" / "summary.txt"
    if summary.exists():
        say(summary.read_text().rstrip())
    return 0

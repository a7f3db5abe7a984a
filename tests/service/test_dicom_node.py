"""The DICOM node on loopback, driven by real SCUs (dcmtk echoscu/storescu and pynetdicom)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, RTDoseStorage

from service.celery_app import make_celery
from service.dicom_node import DicomNode
from service.jobs import JobStore
from service.localredis import free_port
from service.queue import Enqueuer
from service.storage import Storage

from .support import make_settings, wait_for

ECHOSCU = Path("/usr/bin/echoscu")
STORESCU = Path("/usr/bin/storescu")
pytestmark = pytest.mark.skipif(not STORESCU.exists(), reason="dcmtk is not installed (apt-get install dcmtk)")


class _Node:
    """A DICOM node plus handles to its store, restartable on the same data directory."""

    def __init__(self, settings):
        self.settings = settings
        self.store = JobStore(settings.db_url)
        self.storage = Storage(settings.data_dir)
        self.enqueuer = Enqueuer(make_celery(settings), self.store)
        self.node = None

    def start(self):
        self.node = DicomNode(self.settings, self.store, self.storage, self.enqueuer)
        self.node.start()
        return self

    def stop(self):
        if self.node is not None:
            self.node.stop()
            self.node = None

    @property
    def port(self):
        return self.settings.dicom_port

    def jobs(self):
        return self.store.list_jobs()[0]


@pytest.fixture()
def make_node(tmp_path, redis_url):
    nodes = []

    def factory(**kw):
        args = dict(redis_url=redis_url, dicom_port=free_port(), study_quiet_s=1.0, export=["sender"],
                    allowed_calling_aets=["MODALITY", "ECHOSCU", "PACS"])  # closed by default: the test's SCUs
        args.update(kw)
        node = _Node(make_settings(tmp_path / "data", **args)).start()
        nodes.append(node)
        return node

    yield factory
    for n in nodes:
        n.stop()


def _echo(port: int, calling: str = "ECHOSCU") -> int:
    return subprocess.run([str(ECHOSCU), "-aet", calling, "-aec", "SPECTDOSE", "127.0.0.1", str(port)],
                          capture_output=True, timeout=30).returncode


def _storescu(port: int, paths: list[Path], calling: str = "MODALITY") -> subprocess.CompletedProcess:
    return subprocess.run([str(STORESCU), "-aet", calling, "-aec", "SPECTDOSE", "127.0.0.1", str(port),
                           *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_c_echo(make_node):
    node = make_node()
    assert _echo(node.port) == 0


def test_pushed_study_becomes_one_job_and_a_repeat_is_a_duplicate(make_node, phantom_files):
    node = make_node()
    result = _storescu(node.port, phantom_files)
    assert result.returncode == 0, result.stderr
    job = wait_for(lambda: [j for j in node.jobs() if j.state != "received"], 15, what="the queued job")[0]
    assert job.source == "dicom" and job.calling_aet == "MODALITY" and job.state == "queued"
    assert job.n_files == len(phantom_files)
    assert job.export == ["sender"]
    stored = sorted(p.name for p in (node.settings.data_dir / "jobs" / job.id / "input").iterdir())
    sops = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in phantom_files)
    assert sorted(name.split("_", 1)[1][:-4] for name in stored) == sops
    # the same study again (a resend, or a PACS routing it back): no second job
    assert _storescu(node.port, phantom_files).returncode == 0
    wait_for(lambda: [i for i in node.store.incoming() if i.state == "duplicate"], 15, what="duplicate burst")
    assert [j.id for j in node.jobs()] == [job.id]
    events = [e.action for e in node.store.audit_events()]
    assert events.count("instances_received") == 2 and "study_duplicate" in events


def test_calling_ae_allow_list(make_node):
    node = make_node(allowed_calling_aets=["MODALITY"])
    assert _echo(node.port, "MODALITY") == 0
    assert _echo(node.port, "INTRUDER") != 0
    refused = node.store.audit_events(action="association_refused")
    assert [e.actor for e in refused] == ["INTRUDER"]


def test_association_refused_when_disk_nearly_full(make_node, phantom_files):
    node = make_node(min_free_disk_mb=10**12)  # more than any disk: "nearly full"
    assert _echo(node.port) != 0
    assert _storescu(node.port, phantom_files[:2]).returncode != 0
    assert "disk nearly full" in node.store.audit_events(action="association_refused")[0].detail["why"]
    assert not any(node.storage.incoming_root.iterdir())


def _scu(calling="MODALITY"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(RTDoseStorage, ExplicitVRLittleEndian)
    return ae


def test_instances_of_an_aborted_association_are_never_used(make_node, phantom_files):
    node = make_node()
    cts = [p for p in phantom_files if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"][:5]
    assoc = _scu().associate("127.0.0.1", node.port, ae_title="SPECTDOSE")
    assert assoc.is_established
    for p in cts:
        assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0x0000
    assoc.abort()
    time.sleep(node.settings.study_quiet_s * 3)
    assert node.store.incoming() == [] and node.jobs() == []
    assert not any(node.storage.incoming_root.iterdir()) and not any(node.storage.staging.iterdir())
    assert node.store.audit_events(action="association_aborted")[0].detail["discarded"] == 5


def _rtdose(study_uid: str, manufacturer: str, sop_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = RTDoseStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "RTDOSE"
    ds.Manufacturer = manufacturer
    ds.PatientName = "Virtual^Patient"
    return ds


def test_our_own_results_coming_back_never_start_a_job(make_node):
    node = make_node()
    study = generate_uid()
    known = generate_uid()
    node.store.create_job("a" * 32, source="dicom", submitted_by="PACS", options={}, export=[], queue="cpu", n_files=1)
    node.store.record_outputs("a" * 32, [{"sop_instance_uid": known, "kind": "rtdose",
                                          "sop_class_uid": RTDoseStorage, "series_instance_uid": "1.2"}])
    assoc = _scu("PACS").associate("127.0.0.1", node.port, ae_title="SPECTDOSE")
    assert assoc.send_c_store(_rtdose(study, "spectdose")).Status == 0x0000
    assert assoc.send_c_store(_rtdose(study, "Renamed by a PACS", sop_uid=known)).Status == 0x0000
    assert assoc.send_c_store(_rtdose(study, "Another TPS")).Status == 0x0000, "foreign RT Dose: accepted, unused"
    assoc.release()
    returned = wait_for(lambda: node.store.audit_events(action="own_output_returned"), 10, what="audit")
    assert returned[0].detail["instances"] == 2
    time.sleep(node.settings.study_quiet_s * 3)
    assert [j.id for j in node.jobs()] == ["a" * 32], "no new job"
    assert node.store.incoming() == []


def test_instance_without_study_uid_is_cannot_understand(make_node, phantom_files):
    node = make_node()
    ct = next(p for p in phantom_files if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT")
    ds = pydicom.dcmread(ct)
    del ds.StudyInstanceUID
    assoc = _scu().associate("127.0.0.1", node.port, ae_title="SPECTDOSE")
    assert assoc.send_c_store(ds).Status == 0xC000
    assoc.release()


def test_quiet_period_survives_a_restart_without_loss_or_duplicate(make_node, phantom_files):
    node = make_node(study_quiet_s=3.0)
    assert _storescu(node.port, phantom_files).returncode == 0
    wait_for(lambda: node.store.incoming(), 2, 0.05, what="the released association to be committed")
    node.stop()  # before the study was quiet long enough
    assert node.jobs() == [] and [i.state for i in node.store.incoming()] == ["receiving"]
    node.start()
    job = wait_for(lambda: node.jobs(), 20, what="the job after restart")[0]
    node.stop()
    node.start()
    time.sleep(node.settings.study_quiet_s + 1)
    assert [j.id for j in node.jobs()] == [job.id]
    assert job.n_files == len(phantom_files)


def test_study_without_spect_fails_with_a_reason(make_node, phantom_files):
    node = make_node()
    cts = [p for p in phantom_files if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"]
    assert _storescu(node.port, cts).returncode == 0
    job = wait_for(lambda: node.jobs(), 15, what="the job")[0]
    assert job.state == "failed" and "no NM" in job.reason

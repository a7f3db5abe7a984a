"""The DICOM node is closed by default (issue 8, item 5): only configured peers, only our
called AE title, and every refusal an A-ASSOCIATE-RJ with its standard reason (PS3.8
Table 9-21), never an A-ABORT the peer cannot tell from a network fault.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from service.celery_app import make_celery
from service.dicom_node import DicomNode
from service.dicom_node.handlers import calling_ae_allowed
from service.jobs import JobStore
from service.localredis import free_port
from service.queue import Enqueuer
from service.storage import Storage

from .support import make_settings

ECHOSCU = Path("/usr/bin/echoscu")


@pytest.fixture()
def node(tmp_path, redis_url):
    started = []

    def start(**kw):
        # make_settings sets nothing about calling AEs: these are the defaults (closed)
        settings = make_settings(tmp_path / f"data{len(started)}", redis_url=redis_url, dicom_port=free_port(), **kw)
        store = JobStore(settings.db_url)
        n = DicomNode(settings, store, Storage(settings.data_dir), Enqueuer(make_celery(settings), store))
        n.start()
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop()


def _associate(port: int, calling: str, called: str = "SPECTDOSE"):
    """Associate and return (accepted?, (result, source, reason) of an A-ASSOCIATE-RJ, aborted?)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    seen = {}

    def on_rejected(event):
        rsp = event.assoc.acceptor.primitive
        seen["rj"] = (rsp.result, rsp.result_source, rsp.diagnostic)

    assoc = ae.associate("127.0.0.1", port, ae_title=called,
                         evt_handlers=[(evt.EVT_REJECTED, on_rejected)])
    accepted = assoc.is_established
    if accepted:
        assoc.release()
    return accepted, seen.get("rj"), assoc.is_aborted


def test_unknown_ae_is_refused_with_associate_rj_by_default(node):
    n = node()
    accepted, rj, aborted = _associate(n.ctx.settings.dicom_port, "STRANGER")
    assert not accepted and not aborted
    assert rj == (0x01, 0x01, 0x03), "rejected-permanent, service user, calling AE title not recognised"
    refused = n.ctx.store.audit_events(action="association_refused")
    assert [e.actor for e in refused] == ["STRANGER"] and "calling AE not allowed" in refused[0].detail["why"]
    assert not any(n.ctx.storage.incoming_root.iterdir()) and not any(n.ctx.storage.staging.iterdir())


def test_dcmtk_peer_sees_a_rejection_not_an_abort(node):
    if not ECHOSCU.exists():
        pytest.skip("dcmtk is not installed")
    n = node()
    r = subprocess.run([str(ECHOSCU), "-aet", "STRANGER", "-aec", "SPECTDOSE", "127.0.0.1", str(n.ctx.settings.dicom_port)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "Association Rejected" in out and "Calling AE Title Not Recognized" in out, out
    assert "Abort" not in out


def test_configured_peers_and_allowed_aes_are_accepted(node):
    n = node(peers=["PACS@127.0.0.1:104"], allowed_calling_aets=["MODALITY", "CT1@127.0.0.1", "FAR@10.9.9.9"])
    port = n.ctx.settings.dicom_port
    assert _associate(port, "PACS")[0]
    assert _associate(port, "MODALITY")[0]
    assert _associate(port, "CT1")[0]
    assert _associate(port, "FAR")[1] == (0x01, 0x01, 0x03), "AET@HOST: the host is checked"
    assert _associate(port, "OTHER")[1] == (0x01, 0x01, 0x03)


def test_wrong_called_ae_title_is_refused(node):
    n = node(peers=["PACS@127.0.0.1:104"])
    accepted, rj, aborted = _associate(n.ctx.settings.dicom_port, "PACS", called="NOT_US")
    assert not accepted and not aborted
    assert rj == (0x01, 0x01, 0x07), "rejected-permanent, service user, called AE title not recognised"


def test_disk_nearly_full_is_a_transient_rejection(node):
    n = node(peers=["PACS@127.0.0.1:104"], min_free_disk_mb=10**12)
    accepted, rj, aborted = _associate(n.ctx.settings.dicom_port, "PACS")
    assert not accepted and not aborted
    assert rj == (0x02, 0x03, 0x02), "rejected-transient, service provider (presentation), local limit exceeded"


def test_peer_host_check_and_wildcard(tmp_path):
    s = make_settings(tmp_path, peers=["PACS@10.1.2.3:104"], check_peer_host=True)
    assert not calling_ae_allowed(s, "PACS", "127.0.0.1") and calling_ae_allowed(s, "PACS", "10.1.2.3")
    s = make_settings(tmp_path, peers=["PACS@localhost:104"], check_peer_host=True)
    assert calling_ae_allowed(s, "PACS", "127.0.0.1"), "a host name resolves to the peer's address"
    s = make_settings(tmp_path, allowed_calling_aets=["*"])
    assert calling_ae_allowed(s, "ANYONE", "192.0.2.1"), "'*' opens the node, but only when configured"
    assert not calling_ae_allowed(make_settings(tmp_path), "ANYONE", "127.0.0.1"), "closed by default"


def test_compose_node_health_check_is_an_allowed_calling_ae(tmp_path):
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    node_svc = compose["services"]["node"]
    check = node_svc["healthcheck"]["test"]
    aet = check[check.index("-aet") + 1]
    allowed = [a for a in node_svc["environment"]["SPECTDOSE_ALLOWED_CALLING_AETS"].split(",") if a and "${" not in a]
    settings = make_settings(tmp_path, allowed_calling_aets=allowed)
    assert calling_ae_allowed(settings, aet, "127.0.0.1"), "the closed node must still answer its health check"
    assert not calling_ae_allowed(settings, aet, "10.0.0.9"), "but only from inside the container"

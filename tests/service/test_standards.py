"""Standards and options at the gateway's edge (issue 7).

- POST /studies query fields are DoseOptions' public names, validated by building it; the
  job stores ``DoseOptions.to_dict()``, site policy (accepted assumptions) included.
- STOW-RS answers with the PS3.18 Store Instances Response (``application/dicom+json``;
  200 all stored, 202 stored with failures for some parts, 409 none stored), and
  dicomweb-client's ``store_instances`` works against a real server on loopback.
- A re-upload of the same content with the same options returns the existing job unless
  ``recompute=true``; a changed header under the same SOP Instance UIDs is new content.
- ``GET /jobs`` and ``GET /jobs/{id}`` show the same exports.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import uuid
import zipfile
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

from service.dicom_node.dispatch import node_options
from service.jobs import ExportItem, content_fingerprint
from service.localredis import free_port
from service.main import create_app

from .support import AUTH, TOKEN, make_settings, wait_for


def _zip(client, body: bytes, **params):
    return client.post("/studies", content=body, headers={**AUTH, "Content-Type": "application/zip"}, params=params)


def _stow_body(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return body + f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _stow(client, parts: list[bytes], **params):
    body, ctype = _stow_body(parts)
    return client.post("/studies", content=body, params=params,
                       headers={**AUTH, "Content-Type": ctype, "Accept": "application/dicom+json"})


def _sops(files: list[Path]) -> set[tuple[str, str]]:
    out = set()
    for p in files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.add((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


def _refs(body: dict, tag: str) -> set[tuple[str, str]]:
    return {(i["00081150"]["Value"][0], i["00081155"]["Value"][0]) for i in body.get(tag, {}).get("Value", [])}


# ------------------------------------------------------------------ options are DoseOptions


def test_rest_options_are_validated_and_stored_as_dose_options(client, study_zip):
    from spectdose.pipeline import PUBLIC_NAMES, DoseOptions

    params = {"method": "cnn", "time_model": "physical", "hours_after_administration": 26.5, "energy_window": 208,
              "dose_grid": "3", "accept": ["time_outside_model_range", "administration_date_from_acquisition"],
              "density_curve": "bilinear", "kernel_medium": "water", "spect_series": "1.2.3", "ct_series": "1.2.4",
              "bf16": "true", "uncertainty": "true", "sensitivity_cps_per_mbq": 9.5, "calling_aet": "NM_CAMERA",
              "normalised": "true", "map_precision": "float32"}
    r = _zip(client, study_zip, **params)
    assert r.status_code == 202, r.text
    stored = client.get(r.headers["location"], headers=AUTH).json()["options"]
    assert stored == DoseOptions.from_dict(stored).to_dict()
    assert set(stored) | {"effective_half_life_h", "administration_time", "acquisition_time"} == set(
        PUBLIC_NAMES.values()), "every public name is a REST field"
    assert stored["hours_after_administration"] == 26.5 and stored["energy_window"] == 208
    assert stored["accept"] == ["administration_date_from_acquisition", "time_outside_model_range"]
    assert stored["dose_grid"] == "3" and stored["bf16"] is True and stored["normalised"] is True
    r = _zip(client, study_zip, acquisition_time="2024-03-02T10:30:00", administration_time="2024-03-01T09:00:00",
             time_model="effective", effective_half_life_h=60)
    stored = client.get(r.headers["location"], headers=AUTH).json()["options"]
    assert (stored["acquisition_time"], stored["administration_time"]) == ("2024-03-02T10:30:00", "2024-03-01T09:00:00")
    r = _zip(client, study_zip, method="dvk-rr")
    assert r.status_code == 202, r.text
    assert client.get(r.headers["location"], headers=AUTH).json()["options"]["method"] == "dvk-rr", \
        "every method of the CLI is a REST method"


@pytest.mark.parametrize(("params", "says"), [
    ({"time_model": "effective"}, "effective_half_life_h (REST)"),
    ({"hours_after_administration": 30, "administration_time": "2024-01-01T08:00:00"}, "hours_after_administration"),
    ({"dose_grid": "0.1"}, "dose_grid (REST)"),
    ({"accept": "guess_everything"}, "unknown assumption"),
    ({"method": "auto"}, "method"),
    ({"energy_window": -5}, "energy_window"),
    ({"density_curve": "/etc/passwd"}, "density_curve must be one of"),
    ({"kernel_medium": "lead"}, "kernel_medium must be one of"),
])
def test_invalid_options_are_422_with_the_field_that_fixes_them(client, study_zip, settings, params, says):
    r = _zip(client, study_zip, **params)
    assert r.status_code == 422, r.text
    assert says in json.dumps(r.json()["detail"])
    assert not any((settings.data_dir / "jobs").iterdir()), "nothing stored for refused options"


def test_site_policy_accepts_assumptions_explicitly_never_by_default(tmp_path, redis_url, study_zip):
    plain = make_settings(tmp_path / "a", redis_url=redis_url)
    assert plain.accepted_assumptions("MODALITY") == [] and "accept" not in node_options(plain, "MODALITY")
    with TestClient(create_app(plain, sweeper=False)) as c:
        job = c.get(_zip(c, study_zip).headers["location"], headers=AUTH).json()
        assert "accept" not in job["options"] and job["options"]["method"] == "dvk"

    site = make_settings(tmp_path / "b", redis_url=redis_url, accept=["time_outside_model_range"],
                         accept_by_ae=["MODALITY:administration_date_from_acquisition"])
    assert node_options(site, "MODALITY")["accept"] == ["administration_date_from_acquisition",
                                                        "time_outside_model_range"]
    assert node_options(site, "OTHER")["accept"] == ["time_outside_model_range"]
    assert node_options(site, "OTHER")["calling_aet"] == "OTHER"
    with TestClient(create_app(site, sweeper=False)) as c:
        job = c.get(_zip(c, study_zip).headers["location"], headers=AUTH).json()
        assert job["options"]["accept"] == ["time_outside_model_range"]  # global; per-AE is for DICOM senders
    with pytest.raises(ValueError, match="unknown assumption"):
        make_settings(tmp_path / "c", accept=["dates_are_optional"])
    with pytest.raises(ValueError, match="AET:assumption"):
        make_settings(tmp_path / "c", accept_by_ae=["time_outside_model_range"])


# ------------------------------------------------------------------ STOW-RS per PS3.18


def test_stow_all_stored_is_200_with_the_referenced_sop_sequence(client, phantom_files):
    r = _stow(client, [p.read_bytes() for p in phantom_files])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    body = r.json()
    assert _refs(body, "00081199") == _sops(phantom_files)
    assert "00081198" not in body and "0008119A" not in body
    assert body["00081190"] == {"vr": "UR"}, "Retrieve URL: type 2, empty (no WADO-RS here)"
    job = client.get(r.headers["location"], headers=AUTH).json()
    assert job["job_id"] == r.headers["x-job-id"] and job["state"] == "queued"
    ds = pydicom.Dataset.from_json(body)
    assert len(ds.ReferencedSOPSequence) == len(phantom_files)


def test_stow_with_a_part_that_is_not_dicom_is_202_and_still_makes_the_job(client, phantom_files):
    r = _stow(client, [p.read_bytes() for p in phantom_files] + [b"this part is not a DICOM instance" * 10])
    assert r.status_code == 202, r.text
    body = r.json()
    assert _refs(body, "00081199") == _sops(phantom_files)
    assert [i["00081197"]["Value"][0] for i in body["0008119A"]["Value"]] == [0xC000]
    assert client.get(r.headers["location"], headers=AUTH).json()["files"] == len(phantom_files) + 1


def test_stow_of_what_is_not_a_spect_ct_study_is_409_and_stores_nothing(client, settings, phantom_files):
    nm_only = [p for p in phantom_files if pydicom.dcmread(p, stop_before_pixels=True).Modality != "CT"]
    r = _stow(client, [p.read_bytes() for p in nm_only])
    assert r.status_code == 409, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    body = r.json()
    assert "00081199" not in body and _refs(body, "00081198") == _sops(nm_only)
    assert {i["00081197"]["Value"][0] for i in body["00081198"]["Value"]} == {0x0110}
    assert "no usable CT" in r.headers["warning"] and "location" not in r.headers
    assert not any((settings.data_dir / "jobs").iterdir())


def test_zip_and_form_uploads_keep_their_json_answer(client, study_zip):
    r = _zip(client, study_zip)
    assert r.status_code == 202 and r.headers["content-type"] == "application/json"
    assert r.json()["job_id"] and r.json()["duplicate"] is False


@contextlib.contextmanager
def _serving(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, 0.05, what="uvicorn")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_dicomweb_client_store_instances_works(settings, phantom_files):
    requests = pytest.importorskip("requests")
    from dicomweb_client.api import DICOMwebClient

    app = create_app(settings, sweeper=False)
    datasets = [pydicom.dcmread(p) for p in phantom_files]
    with _serving(app) as url:
        dw = DICOMwebClient(url=url, headers=AUTH)
        answer = dw.store_instances(datasets=datasets)
        assert {(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                for i in answer.ReferencedSOPSequence} == _sops(phantom_files)
        assert "FailedSOPSequence" not in answer
        jobs = app.state.ctx.store.list_jobs()[0]
        assert len(jobs) == 1 and jobs[0].n_files == len(phantom_files) and jobs[0].source == "rest"
        # the client's retry of the same instances: the same job, not a second one
        again = dw.store_instances(datasets=datasets)
        assert len(again.ReferencedSOPSequence) == len(phantom_files)
        assert [j.id for j in app.state.ctx.store.list_jobs()[0]] == [jobs[0].id]
        with pytest.raises(requests.HTTPError) as info:
            dw.store_instances(datasets=[d for d in datasets if d.Modality != "CT"])
        assert info.value.response.status_code == 409


# ------------------------------------------------------------------ de-duplication


def _changed_header(files: list[Path], tmp: Path) -> bytes:
    """The same instances (same SOP Instance UIDs), one NM header value corrected."""
    buf = io.BytesIO()
    changed = False
    with zipfile.ZipFile(buf, "w") as zf:
        for p in files:
            ds = pydicom.dcmread(p)
            if ds.Modality == "NM" and not changed:
                ds.SeriesDescription = (ds.get("SeriesDescription") or "") + " corrected"
                changed = True
            out = tmp / p.name
            ds.save_as(out)
            zf.write(out, p.name)
    assert changed
    return buf.getvalue()


def test_reupload_of_the_same_content_returns_the_existing_job(client, study_zip, phantom_files, tmp_path, redis_url):
    import redis

    first = _zip(client, study_zip, time_model="physical")
    assert first.status_code == 202
    job_id = first.json()["job_id"]
    with redis.Redis.from_url(redis_url) as r:
        queued = r.llen("cpu")
    again = _zip(client, study_zip, time_model="physical")
    assert again.status_code == 200, again.text
    assert again.json()["job_id"] == job_id and again.json()["duplicate"] is True
    assert again.headers["location"] == first.headers["location"]
    stow = _stow(client, [p.read_bytes() for p in phantom_files], time_model="physical")
    assert stow.status_code == 200 and stow.headers["x-job-id"] == job_id, "same instances, other transport"
    assert "not computed again" in stow.headers["warning"]
    with redis.Redis.from_url(redis_url) as r:
        assert r.llen("cpu") == queued, "nothing queued for a duplicate"
    assert client.app.state.ctx.store.audit_events(action="study_duplicate")

    other_options = _zip(client, study_zip, time_model="hanscheid")
    forced = _zip(client, study_zip, time_model="physical", recompute="true")
    changed = _zip(client, _changed_header(phantom_files, tmp_path), time_model="physical")
    new_ids = {r.json()["job_id"] for r in (other_options, forced, changed)}
    assert all(r.status_code == 202 for r in (other_options, forced, changed))
    assert len(new_ids) == 3 and job_id not in new_ids
    assert client.get("/jobs", headers=AUTH).json()["total"] == 4


def test_fingerprint_is_content_not_names_or_file_meta(phantom_files, tmp_path):
    renamed = []
    for i, p in enumerate(phantom_files):
        ds = pydicom.dcmread(p)
        ds.file_meta.ImplementationVersionName = "OTHER_SENDER"  # what a DICOM receiver writes differs
        target = tmp_path / f"x{i}.dcm"
        ds.save_as(target, enforce_file_format=True)
        renamed.append(target)
    assert content_fingerprint(renamed) == content_fingerprint(phantom_files)
    ds = pydicom.dcmread(renamed[0])
    ds.InstanceNumber = int(ds.get("InstanceNumber") or 0) + 100
    ds.save_as(renamed[0], enforce_file_format=True)
    assert content_fingerprint(renamed) != content_fingerprint(phantom_files)


# ------------------------------------------------------------------ list and detail agree


def test_list_and_detail_show_the_same_job(client, study_zip):
    job_id = _zip(client, study_zip).json()["job_id"]
    store = client.app.state.ctx.store
    store.record_export(job_id, "PACS@127.0.0.1:11113", ExportItem("rtdose", "1.2.3.4"), sent=True, attempts=1)
    store.record_export(job_id, "PACS@127.0.0.1:11113", ExportItem("doserate", "1.2.3.5"), sent=False, attempts=3,
                        error="association rejected")
    detail = client.get(f"/jobs/{job_id}", headers=AUTH).json()
    listed = client.get("/jobs", headers=AUTH).json()["jobs"]
    assert [j for j in listed if j["job_id"] == job_id] == [detail]
    assert [(e["kind"], e["state"]) for e in detail["exports"]] == [("rtdose", "sent"), ("doserate", "failed")]
    assert detail["method"] == "dvk" and detail["warnings"] == [] and detail["replaces"] is None


# ------------------------------------------------------------------ DICOM node: content, not names


def test_dicom_resend_with_a_changed_header_is_computed_again(tmp_path, redis_url, phantom_files):
    import subprocess

    from service.celery_app import make_celery
    from service.dicom_node import DicomNode
    from service.jobs import JobStore
    from service.queue import Enqueuer
    from service.storage import Storage

    storescu = Path("/usr/bin/storescu")
    if not storescu.exists():
        pytest.skip("dcmtk is not installed (apt-get install dcmtk)")
    settings = make_settings(tmp_path / "data", redis_url=redis_url, dicom_port=free_port(), study_quiet_s=1.0,
                             export=["sender"], allowed_calling_aets=["MODALITY"],
                             accept_by_ae=["MODALITY:time_outside_model_range"])
    store = JobStore(settings.db_url)
    node = DicomNode(settings, store, Storage(settings.data_dir), Enqueuer(make_celery(settings), store))
    node.start()

    def push(files):
        r = subprocess.run([str(storescu), "-aet", "MODALITY", "-aec", "SPECTDOSE", "127.0.0.1",
                            str(settings.dicom_port), *map(str, files)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

    def settled(n):
        done = ("dispatched", "duplicate", "ignored")
        return wait_for(lambda: (b := [i for i in store.incoming() if i.state in done]) and len(b) >= n and b,
                        30, what=f"{n} dispatched burst(s)")

    try:
        push(phantom_files)
        first = settled(1)[0]
        assert first.state == "dispatched", (first.state, first.note)
        job = store.get(first.job_id)
        assert job.options == {"method": "dvk", "calling_aet": "MODALITY",
                                                "accept": ["time_outside_model_range"]}
        push(phantom_files)  # the same instances again: a duplicate
        assert settled(2)[1].state == "duplicate"
        changed = tmp_path / "changed"
        changed.mkdir()
        corrected = []
        for p in phantom_files:  # the same SOP Instance UIDs, one header corrected
            ds = pydicom.dcmread(p)
            if ds.Modality == "NM":
                ds.SeriesDescription = (ds.get("SeriesDescription") or "") + " corrected"
            ds.save_as(changed / p.name)
            corrected.append(changed / p.name)
        push(corrected)
        third = settled(3)[2]
        assert third.state == "dispatched" and third.job_id != first.job_id
        again = store.get(third.job_id)
        assert again.fingerprint != job.fingerprint and again.n_files == job.n_files
    finally:
        node.stop()
        store.close()


def test_an_existing_job_store_is_upgraded_in_place(db_url):
    """A job store of an earlier release: JSON held as text in *_json columns, and no result or
    replacement columns at all. Upgraded in place: its jobs read back, new ones write."""
    import datetime as dt

    import sqlalchemy

    from service.db import Base
    from service.jobs import JobStore

    engine = sqlalchemy.create_engine(db_url)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:  # turn today's table into the earlier one
        for column in ("result", "replaces"):
            conn.execute(sqlalchemy.text(f"ALTER TABLE jobs DROP COLUMN {column}"))
        for column in ("options", "export", "outputs"):
            conn.execute(sqlalchemy.text(f"ALTER TABLE jobs RENAME COLUMN {column} TO {column}_json"))
            if engine.dialect.name == "postgresql":
                conn.execute(sqlalchemy.text(f"ALTER TABLE jobs ALTER COLUMN {column}_json TYPE TEXT"))
        conn.execute(sqlalchemy.text("ALTER TABLE audit_events RENAME COLUMN detail TO detail_json"))
        if engine.dialect.name == "postgresql":
            conn.execute(sqlalchemy.text("ALTER TABLE audit_events ALTER COLUMN detail_json TYPE TEXT"))
        conn.execute(sqlalchemy.text("INSERT INTO audit_events (at, actor, action, job_id, detail_json) VALUES "
                                     "(:now, 'token:x', 'study_received', :id, '{\"files\": 1}')"),
                     {"now": dt.datetime(2026, 1, 1), "id": "a" * 32})
        conn.execute(sqlalchemy.text(
            "INSERT INTO jobs (id, state, progress, source, submitted_by, options_json, export_json, queue, n_files, "
            "input_bytes, attempt, transient_failures, outputs_json, created_at, updated_at) VALUES (:id, "
            "'done', 1.0, 'rest', 'token:x', :options, '[\"PACS\"]', 'cpu', 1, 0, 1, 0, :outputs, :now, :now)"),
            {"id": "a" * 32, "options": '{"method": "dvk", "time_model": "hanscheid"}',
             "outputs": '{"rtdose": "rtdose.dcm"}', "now": dt.datetime(2026, 1, 1)})
    engine.dispose()
    store = JobStore(db_url)
    old = store.get("a" * 32)
    assert (old.options, old.export, old.outputs, old.result, old.replaces) == (
        {"method": "dvk", "time_model": "hanscheid"}, ["PACS"], {"rtdose": "rtdose.dcm"}, None, None)
    assert store.find_duplicate("x", {"method": "dvk"}, source="rest") is None
    assert store.audit_events(action="study_received")[0].detail == {"files": 1}
    store.create_job("b" * 32, source="rest", submitted_by="token:x", options={"method": "dvk"}, export=[],
                     queue="cpu", n_files=1, fingerprint="f")
    assert store.find_duplicate("f", {"method": "dvk"}, source="rest", export=[]).id == "b" * 32
    attempt = store.claim("b" * 32, "w", lease_s=60, max_attempts=3)
    assert store.set_replaces("b" * 32, attempt, {})
    assert store.finish("b" * 32, attempt, {}, {"method": "dvk", "warnings": ["w1"]})
    assert store.get("b" * 32).result["warnings"] == ["w1"] and store.get("b" * 32).replaces == {}
    store.close()
    JobStore(db_url).close()  # a second start finds nothing left to upgrade


# ------------------------------------------------------------------ text is text (issue 19 case 7)


def test_a_name_and_a_label_with_two_dollars_are_text_on_the_rest_path(client, settings, small_study, tmp_path):
    """``A$x^{$^B`` as PatientName and SEG label: the job is done at its first attempt (it once failed
    as matplotlib mathtext and was retried 4 times as transient), and report, page and SR show it."""
    from service.jobs import JobStore
    from service.storage import Storage
    from spectdose.report import identifiers_from_header
    from tests.test_conformance import ODD_TEXT, _renamed_study
    from tests.test_report import pdf_text
    from worker.execute import run_job

    from .support import zip_folder

    dicom, seg = _renamed_study(small_study, tmp_path)
    (dicom / "seg.dcm").write_bytes(seg.read_bytes())
    r = _zip(client, zip_folder(dicom, tmp_path / "study.zip").read_bytes())
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    store, storage = JobStore(settings.db_url), Storage(settings.data_dir)
    try:
        assert run_job(store, storage, settings, job_id, worker="w1")["state"] == "done"
        job = store.get(job_id)
        assert job.attempt == 1 and job.transient_failures == 0
    finally:
        store.close()
    report = client.get(f"/jobs/{job_id}/report", headers=AUTH)
    assert report.status_code == 200
    text = pdf_text(report.content)
    assert ODD_TEXT in text.splitlines() and "A$x {$ B" in text
    assert client.post("/ui/login", data={"token": TOKEN, "next": "/ui/jobs"},
                       follow_redirects=False).status_code == 303
    page = client.get(f"/ui/jobs/{job_id}").text
    assert f"{ODD_TEXT}</td>" in page  # the region table cell, as text (html.escape leaves $ ^ { alone)
    assert "A$x {$ B" in client.get("/ui/jobs").text
    assert client.get(f"/ui/jobs/{job_id}/dvh.png").status_code == 200
    manifest = storage.output_manifest(job_id)
    sr = pydicom.dcmread(storage.job_output(job_id) / manifest["files"]["sr"]["file"])
    texts = set()
    sr.walk(lambda _ds, e: texts.add(str(e.value)) if e.keyword == "TextValue" else None)
    assert ODD_TEXT in texts
    rtdose = storage.job_output(job_id) / manifest["files"]["rtdose"]["file"]
    assert identifiers_from_header(pydicom.dcmread(rtdose, stop_before_pixels=True))["patient_name"] == "A$x {$ B"

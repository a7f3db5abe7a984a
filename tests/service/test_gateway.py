"""The REST gateway with a real Redis: auth, submission formats, bad uploads, OpenAPI, listing.

No worker runs here, so submitted jobs stay ``queued``; the pipeline runs in test_e2e.py.
"""

from __future__ import annotations

import hashlib
import io
import uuid
import zipfile
from pathlib import Path

import pydicom
import pytest
import redis
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.queue import sweep_once

from .support import AUTH, make_settings


def _queue_length(url: str) -> int:
    with redis.Redis.from_url(url) as r:
        return int(r.llen("cpu"))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _submit_zip(client, body: bytes, **params):
    return client.post("/studies", content=body, headers={**AUTH, "Content-Type": "application/zip"}, params=params)


def _multipart_related(files: list[Path], part_type="application/dicom", declared='"application/dicom"'):
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + p.read_bytes() + b"\r\n" for p in files
    ) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/related; type={declared}; boundary={boundary}"


# ------------------------------------------------------------------ monitoring and auth


def test_health_ready_metrics_need_no_token(client):
    assert client.get("/health").json()["status"] == "ok"
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "database": "ok", "broker": "ok"}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'spectdose_jobs{state="queued"} 0.0' in metrics.text
    assert 'spectdose_queue_length{queue="cpu"} 0.0' in metrics.text
    assert "spectdose_http_request_duration_seconds_bucket" in metrics.text


def test_ready_is_503_when_the_broker_is_down(tmp_path):
    settings = make_settings(tmp_path / "d", redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings, sweeper=False)) as c:
        r = c.get("/ready")
    assert r.status_code == 503 and r.json()["broker"].startswith("error")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0000000000"}, {"Authorization": "Basic x"}])
def test_missing_or_wrong_token_is_401(client, settings, headers):
    for method, path in [("get", "/jobs"), ("get", f"/jobs/{'0' * 32}"), ("post", "/studies")]:
        r = getattr(client, method)(path, headers=headers)
        assert r.status_code == 401, (method, path)
        assert r.headers["www-authenticate"] == "Bearer"
    assert not any((settings.data_dir / "jobs").iterdir())


def test_auth_can_be_disabled_in_development(tmp_path, redis_url):
    settings = make_settings(tmp_path / "d", redis_url=redis_url, environment="development", auth_enabled=False)
    with TestClient(create_app(settings, sweeper=False), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/jobs").status_code == 200


# ------------------------------------------------------------------ submission


def test_zip_submission_is_stored_durably_and_queued(client, settings, study_zip, phantom_files):
    r = _submit_zip(client, study_zip, time_model="physical")
    assert r.status_code == 202, r.text
    body = r.json()
    job_id = body["job_id"]
    assert r.headers["location"].endswith(f"/jobs/{job_id}") and body["location"] == r.headers["location"]
    assert body["state"] == "queued" and body["files"] == len(phantom_files)
    stored = settings.data_dir / "jobs" / job_id / "input"
    assert sorted(_digest(stored).values()) == sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in phantom_files)
    assert _queue_length(settings.redis_url) == 1, "the task is on the cpu queue"
    job = client.get(f"/jobs/{job_id}", headers=AUTH).json()
    assert job["state"] == "queued" and job["source"] == "rest" and job["options"]["time_model"] == "physical"
    assert job["submitted_by"].startswith("token:") and "test-token" not in job["submitted_by"]
    assert job["study_instance_uid"] == str(pydicom.dcmread(phantom_files[0], stop_before_pixels=True).StudyInstanceUID)
    assert client.get(f"/jobs/{job_id}/rtdose", headers=AUTH).status_code == 409
    assert not any((settings.data_dir / "uploads").iterdir()), "the upload spool is cleaned up"


def test_multipart_form_submission(client, phantom_files):
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in phantom_files]
    r = client.post("/studies", files=files, data={"note": "ignored form field"}, headers=AUTH)
    assert r.status_code == 202, r.text
    assert r.json()["files"] == len(phantom_files)


def test_stow_rs_submission(client, phantom_files):
    body, ctype = _multipart_related(phantom_files)
    r = client.post("/studies", content=body, headers={**AUTH, "Content-Type": ctype, "Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text  # PS3.18: every instance stored (the store response is in test_standards.py)
    assert r.headers["content-type"] == "application/dicom+json"
    assert len(r.json()["00081199"]["Value"]) == len(phantom_files)
    job = client.get(r.headers["location"], headers=AUTH).json()
    assert job["job_id"] == r.headers["x-job-id"] and job["files"] == len(phantom_files)


def test_stow_rs_metadata_parts_are_415(client, phantom_files):
    body, ctype = _multipart_related(phantom_files[:2], part_type="application/dicom+json",
                                     declared='"application/dicom+json"')
    r = client.post("/studies", content=body, headers={**AUTH, "Content-Type": ctype})
    assert r.status_code == 415 and "application/dicom" in r.json()["detail"]


def test_jobs_default_to_dvk_like_the_cli_and_auto_is_an_explicit_choice(tmp_path, redis_url, study_zip, monkeypatch):
    import spectdose.paths

    monkeypatch.setattr(spectdose.paths, "MODELS_DIR", tmp_path / "models")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "dblurdosenet.pt").write_bytes(b"weights")  # installed weights change no default
    assert Settings(environment="development").default_method == "dvk"

    def method_of(settings, **params):
        with TestClient(create_app(settings, sweeper=False)) as c:
            r = _submit_zip(c, study_zip, recompute=True, **params)
            assert r.status_code == 202, r.text
            job = c.get(f"/jobs/{r.json()['job_id']}", headers=AUTH).json()
            assert job["method"] == job["options"]["method"]
            return job["method"]

    default = make_settings(tmp_path / "data", redis_url=redis_url, default_method=Settings.model_fields[
        "default_method"].default)
    assert method_of(default) == "dvk"
    assert method_of(default, method="cnn") == "cnn"  # one field away
    auto = make_settings(tmp_path / "data", redis_url=redis_url, default_method="auto")
    assert method_of(auto) == "cnn"  # auto, chosen by the site: the CNN once weights are installed
    assert method_of(auto, method="dvk") == "dvk"


def test_broker_down_still_stores_then_the_sweeper_publishes(tmp_path, redis_url, study_zip):
    down = make_settings(tmp_path / "d", redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(down, sweeper=False)) as c:
        r = _submit_zip(c, study_zip)
        assert r.status_code == 202 and r.json()["state"] == "received"
        job_id = r.json()["job_id"]
    up = make_settings(tmp_path / "d", redis_url=redis_url)
    app = create_app(up, sweeper=False)
    ctx = app.state.ctx
    import datetime as dt

    from service.db import utcnow

    counts = sweep_once(ctx.store, ctx.enqueuer, lease_s=60, visibility_timeout_s=3600,
                        now=utcnow() + dt.timedelta(seconds=30))
    assert counts["published"] == 1
    assert ctx.store.get(job_id).state == "queued" and _queue_length(redis_url) == 1


# ------------------------------------------------------------------ bad uploads


def _rewritten(files: list[Path], tmp: Path, change) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in files:
            ds = pydicom.dcmread(p)
            if change(ds) is False:
                continue
            out = tmp / p.name
            ds.save_as(out)
            zf.write(out, p.name)
    return buf.getvalue()


def _bad_uploads(phantom_files: list[Path], tmp: Path) -> dict[str, tuple[dict, bytes, int, str]]:
    zip_headers = {"Content-Type": "application/zip"}
    text_zip = io.BytesIO()
    with zipfile.ZipFile(text_zip, "w") as zf:
        zf.writestr("readme.txt", "not an image")
        zf.writestr("notes/scan.dcm", b"\x00" * 300)
    truncated = io.BytesIO()
    with zipfile.ZipFile(truncated, "w") as zf:
        for i, p in enumerate(phantom_files):
            data = p.read_bytes()
            zf.writestr(p.name, data[: len(data) // 2] if i == 0 else data)
    ct_only_to_mr = _rewritten(phantom_files, tmp, lambda ds: setattr(ds, "Modality", "MR") or setattr(
        ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.4"))
    no_ct = _rewritten(phantom_files, tmp, lambda ds: ds.Modality != "CT" and None)
    traversal = io.BytesIO()
    with zipfile.ZipFile(traversal, "w") as zf:
        for p in phantom_files:
            zf.writestr(p.name, p.read_bytes())
        zf.writestr("../../escaped.dcm", phantom_files[0].read_bytes())
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.dcm", b"\0" * (64 * 2**20))
    return {
        "not DICOM": (zip_headers, text_zip.getvalue(), 400, "no DICOM instances"),
        "truncated": (zip_headers, truncated.getvalue(), 400, "truncated"),
        "wrong modality": (zip_headers, ct_only_to_mr, 422, "wrong modality"),
        "no CT": (zip_headers, no_ct, 422, "no usable CT"),
        "traversal zip": (zip_headers, traversal.getvalue(), 400, "outside the archive"),
        "zip bomb": (zip_headers, bomb.getvalue(), 413, "zip bomb"),
        "not a zip": (zip_headers, b"PK\x03\x04 this is not really a zip", 400, "not a readable zip"),
        "plain text": ({"Content-Type": "text/plain"}, b"hello", 415, "unsupported Content-Type"),
        "empty": (zip_headers, b"", 400, "empty request body"),
    }


def test_bad_uploads_get_a_reason_and_lose_nothing(client, settings, study_zip, phantom_files, tmp_path):
    good = _submit_zip(client, study_zip)
    assert good.status_code == 202
    good_id = good.json()["job_id"]
    before = _digest(settings.data_dir / "jobs" / good_id / "input")
    for name, (headers, body, status, reason) in _bad_uploads(phantom_files, tmp_path).items():
        r = client.post("/studies", content=body, headers={**AUTH, **headers})
        assert r.status_code == status, (name, r.text)
        assert reason in r.json()["detail"], (name, r.json())
    assert not (tmp_path / "escaped.dcm").exists() and not (settings.data_dir.parent / "escaped.dcm").exists()
    jobs = client.get("/jobs", headers=AUTH).json()
    assert [j["job_id"] for j in jobs["jobs"]] == [good_id], "no job for any bad upload"
    assert _digest(settings.data_dir / "jobs" / good_id / "input") == before, "the stored study is intact"
    assert sorted(p.name for p in (settings.data_dir / "jobs").iterdir()) == [good_id]
    assert not any((settings.data_dir / "uploads").iterdir())
    rejected = client.app.state.ctx.store.audit_events(action="upload_rejected")
    assert len(rejected) == len(_bad_uploads(phantom_files, tmp_path))


def test_oversize_upload_is_413_before_and_while_reading(tmp_path, redis_url, study_zip):
    settings = make_settings(tmp_path / "d", redis_url=redis_url, max_upload_mb=0.01)
    with TestClient(create_app(settings, sweeper=False)) as c:
        r = _submit_zip(c, study_zip)
        assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced while spooling
            for i in range(0, len(study_zip), 4096):
                yield study_zip[i: i + 4096]

        r = c.post("/studies", content=chunks(), headers={**AUTH, "Content-Type": "application/zip"})
        assert r.status_code == 413
        assert not any((settings.data_dir / "jobs").iterdir())


def test_invalid_options_are_422(client, study_zip):
    r = _submit_zip(client, study_zip, time_model="effective")
    assert r.status_code == 422 and "effective_half_life_h" in r.json()["detail"]
    r = _submit_zip(client, study_zip, export="NOT_A_PEER")
    assert r.status_code == 422 and "not a configured peer" in r.json()["detail"]
    r = _submit_zip(client, study_zip, export="PACS")
    assert r.status_code == 202


# ------------------------------------------------------------------ reading jobs


def test_list_filters_and_unknown_jobs(client, study_zip):
    ids = [_submit_zip(client, study_zip, recompute=True).json()["job_id"] for _ in range(3)]
    listing = client.get("/jobs", params={"limit": 2}, headers=AUTH).json()
    assert listing["total"] == 3 and len(listing["jobs"]) == 2
    assert listing["jobs"][0]["job_id"] == ids[-1], "newest first"
    assert client.get("/jobs", params={"state": "done"}, headers=AUTH).json()["total"] == 0
    assert client.get("/jobs", params={"source": "dicom"}, headers=AUTH).json()["total"] == 0
    assert client.get("/jobs", params={"state": "bogus"}, headers=AUTH).status_code == 422
    assert client.get(f"/jobs/{'f' * 32}", headers=AUTH).status_code == 404
    assert client.get("/jobs/../../etc/passwd", headers=AUTH).status_code == 404
    assert client.get(f"/jobs/{'f' * 32}/rtdose", headers=AUTH).status_code == 404


# ------------------------------------------------------------------ OpenAPI


def test_openapi_documents_every_route_and_response(client):
    spec = client.get("/openapi.json", headers=AUTH).json()  # behind the token in production
    paths = spec["paths"]
    assert set(paths) == {"/studies", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/rtdose", "/jobs/{job_id}/doserate",
                          "/jobs/{job_id}/uncertainty", "/jobs/{job_id}/summary", "/jobs/{job_id}/report",
                          "/jobs/{job_id}/regions", "/jobs/{job_id}/regions/{version}", "/cycles", "/cycles/{cycle_id}",
                          "/cycles/{cycle_id}/rtdose", "/cycles/{cycle_id}/integrate",
                          "/cycles/{cycle_id}/conflicts/{job_id}/resolve",
                          "/patients/{patient_id}/cumulative", "/health", "/ready", "/metrics"}
    post = paths["/studies"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/zip", "multipart/form-data",
                                                   'multipart/related; type="application/dicom"'}
    assert {"200", "202", "400", "401", "409", "413", "415", "422"} <= set(post["responses"])
    assert "Location" in post["responses"]["202"]["headers"] and "Location" in post["responses"]["200"]["headers"]
    assert post["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/SubmitOut")
    assert "application/dicom+json" in post["responses"]["409"]["content"]
    from spectdose.pipeline import PUBLIC_NAMES

    fields = {p["name"] for p in post["parameters"] if p["in"] == "query"}
    assert set(PUBLIC_NAMES.values()) | {"export", "recompute", "cycle_id"} == fields, "every DoseOptions public name"
    for path, ops in paths.items():
        for op in ops.values():
            protected = path not in ("/health", "/ready", "/metrics")
            assert ("security" in op) == protected, path
            if protected:
                assert "401" in op["responses"], path
    job = spec["components"]["schemas"]["JobOut"]["properties"]
    assert job["state"]["enum"] == ["received", "queued", "running", "done", "failed"]
    assert {"stage", "progress", "reason", "method", "warnings", "provenance", "replaces"} <= set(job)
    assert "application/dicom" in paths["/jobs/{job_id}/rtdose"]["get"]["responses"]["200"]["content"]
    assert {"404", "409"} <= set(paths["/jobs/{job_id}/rtdose"]["get"]["responses"])


def test_a_result_is_sent_in_the_lossless_transfer_syntax_the_client_asks_for(client, settings, tmp_path):
    """Issue 20: a 16-bit RT Dose is 68 MB stored (as plastimatch reads it) and about 5 MB as JPEG-LS;
    a client that names JPEG-LS (or Deflate) in Accept gets the same instance re-encoded losslessly,
    one that names nothing the stored file, one that names only a syntax the object cannot take 406."""
    import numpy as np

    from service.jobs import JobStore
    from service.storage import Storage
    from spectdose.dicom.export import read_rtdose, write_rtdose

    from ..test_export import DESCRIPTION, dose_pattern_gy, make_study

    study = make_study()
    work_src = tmp_path / "src"
    work_src.mkdir()
    written = write_rtdose(work_src / "rtdose.dcm", dose_pattern_gy(study), study, method="DVK",
                           description=DESCRIPTION, bits=16)
    store, storage = JobStore(settings.db_url), Storage(settings.data_dir)
    job_id = uuid.uuid4().hex
    store.create_job(job_id, source="rest", submitted_by="token:x", options={"method": "dvk"}, export=[],
                     queue="cpu", n_files=1, study_instance_uid=str(pydicom.uid.generate_uid()))
    attempt = store.claim(job_id, "w", lease_s=60, max_attempts=3)
    work = storage.new_work_dir(job_id, attempt)
    (work / "rtdose.dcm").write_bytes(written.read_bytes())
    storage.publish_output(job_id, work, {"files": {"rtdose": {"file": "rtdose.dcm"}}})
    assert store.finish(job_id, attempt, {"rtdose": "rtdose.dcm"})
    url = f"/jobs/{job_id}/rtdose"

    plain = client.get(url, headers=AUTH)
    assert plain.status_code == 200 and plain.content == written.read_bytes()
    for uid in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.1.99"):
        r = client.get(url, headers={**AUTH, "Accept": f"application/dicom; transfer-syntax={uid}"})
        assert r.status_code == 200 and f"transfer-syntax={uid}" in r.headers["content-type"], r.text[:200]
        got = tmp_path / f"{uid}.dcm"
        got.write_bytes(r.content)
        ds = pydicom.dcmread(got)
        assert str(ds.file_meta.TransferSyntaxUID) == uid and len(r.content) < len(plain.content)
        assert ds.SOPInstanceUID == pydicom.dcmread(written, stop_before_pixels=True).SOPInstanceUID
        assert np.array_equal(read_rtdose(got).array, read_rtdose(written).array), "lossless"
    refused = client.get(url, headers={**AUTH, "Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50"})
    assert refused.status_code == 406 and "1.2.840.10008.1.2.4.80" in refused.json()["detail"]
    either = client.get(url, headers={**AUTH, "Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50, "
                                                        "application/dicom"})
    assert either.status_code == 200 and either.content == plain.content
    store.close()

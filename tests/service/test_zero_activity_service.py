"""Issue 10 through the service: a study whose SPECT holds no activity, uploaded by REST.

Without the assumption the job fails with a reason that names ``accept=no_activity_gives_zero_dose``;
with it (REST ``accept``, or the site's SPECTDOSE_ACCEPT) the job finishes and its RT Dose is
all zero. The gateway stores the job, ``run_job`` is the worker (called directly, as in test_worker.py).
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

from service.jobs import JobStore
from service.main import create_app
from service.storage import Storage
from worker.execute import run_job

from ..dicom_factory import copy_with_zero_activity
from .support import AUTH, make_settings, zip_folder

NAME = "no_activity_gives_zero_dose"


@pytest.fixture(scope="module")
def zero_zip(phantom_dir, tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("zero-study")
    copy_with_zero_activity(phantom_dir / "dicom", root / "dicom")
    return zip_folder(root / "dicom", root / "study.zip").read_bytes()


def _submit(client: TestClient, body: bytes, **params) -> str:
    r = client.post(
        "/studies", content=body, params=params, headers={**AUTH, "Content-Type": "application/zip"}
    )
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def _work(settings, job_id: str) -> dict:
    """Run the job as the worker does; the outcome ('done' or 'failed')."""
    return run_job(
        JobStore(settings.db_url), Storage(settings.data_dir), settings, job_id, worker="w1"
    )


def test_no_activity_fails_naming_the_flag_then_gives_an_all_zero_rtdose(
    client, settings, zero_zip
):
    refused = _submit(client, zero_zip)
    assert _work(settings, refused)["state"] == "failed"
    job = client.get(f"/jobs/{refused}", headers=AUTH).json()
    assert job["state"] == "failed" and "pixel data are all zero" in job["reason"]
    assert f"accept={NAME} (REST)" in job["reason"], job["reason"]
    assert client.get(f"/jobs/{refused}/rtdose", headers=AUTH).status_code == 404, (
        "no RT Dose for a refused study"
    )

    accepted = _submit(client, zero_zip, accept=NAME)
    assert _work(settings, accepted)["state"] == "done"
    job = client.get(f"/jobs/{accepted}", headers=AUTH).json()
    assert job["state"] == "done" and job["options"]["accept"] == [NAME]
    assert any(f"accepted as no activity by {NAME}" in w for w in job["warnings"]), job["warnings"]
    r = client.get(f"/jobs/{accepted}/rtdose", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    rtdose = pydicom.dcmread(io.BytesIO(r.content))
    assert (
        rtdose.Modality == "RTDOSE" and rtdose.pixel_array.size and not np.any(rtdose.pixel_array)
    )
    rate = pydicom.dcmread(
        io.BytesIO(client.get(f"/jobs/{accepted}/doserate", headers=AUTH).content)
    )
    assert not np.any(rate.pixel_array)


def test_the_site_setting_accepts_it_for_every_job(tmp_path, redis_url, zero_zip):
    """SPECTDOSE_ACCEPT: the job stores the assumption without the request naming it."""
    settings = make_settings(tmp_path / "data", redis_url=redis_url, accept=[NAME])
    with TestClient(create_app(settings, sweeper=False)) as client:
        job_id = _submit(client, zero_zip)
        assert client.get(f"/jobs/{job_id}", headers=AUTH).json()["options"]["accept"] == [NAME]

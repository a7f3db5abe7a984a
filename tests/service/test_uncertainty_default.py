"""SPECTDOSE_DEFAULT_UNCERTAINTY: CNN jobs get the calibrated 1-sigma map once its ensemble is installed.

The choice is made when a job is created (REST without ``uncertainty``, or a DICOM push, which
cannot ask) and stored in its options, so the worker, the job's JSON and a repeat of the job
all see the same one. One end-to-end job: a study pushed by C-STORE, computed by the worker,
its sigma map served at GET /jobs/{id}/uncertainty and sent back to the sender.
"""

from __future__ import annotations

import subprocess
import types
from pathlib import Path

import pydicom
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from service.config import Settings
from service.dicom_node.dispatch import node_options
from service.main import create_app
from service.routes.studies import submit_params

from ..tiny_models import install_tiny_cnn
from .support import AUTH, make_settings, wait_for

STORESCU = Path("/usr/bin/storescu")


def _tiny_models(folder: Path, *, ensemble: bool) -> Path:
    """An installed tiny CNN (dblurdosenet.pt) and, if asked, its two-member ensemble beside it."""
    return install_tiny_cnn(folder, ensemble=ensemble).parent


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Three installations: the CNN with its ensemble, the CNN alone, nothing."""
    return {
        "ensemble": _tiny_models(tmp_path_factory.mktemp("models-ensemble"), ensemble=True),
        "weights": _tiny_models(tmp_path_factory.mktemp("models-weights"), ensemble=False),
        "none": tmp_path_factory.mktemp("models-none"),
    }


@pytest.fixture()
def install(monkeypatch, model_dirs):
    """Point the default models folder at one of the installations."""
    import spectdose.paths

    def choose(which: str) -> Path:
        monkeypatch.setattr(spectdose.paths, "MODELS_DIR", model_dirs[which])
        return model_dirs[which]

    return choose


def _settings(tmp_path: Path, **kw) -> Settings:
    return make_settings(tmp_path / "data", **kw)


# ------------------------------------------------------------------ the setting


def test_the_ensemble_the_setting_looks_for_is_the_one_the_pipeline_loads(install):
    from spectdose.paths import default_model_path, ensemble_path
    from spectdose.pipeline import DoseOptions

    install("ensemble")
    assert DoseOptions(method="cnn").resolved_ensemble_path() == ensemble_path(default_model_path())
    assert ensemble_path(default_model_path()).is_file()


@pytest.mark.parametrize(
    ("setting", "installed", "cnn", "dvk"),
    [
        ("auto", "ensemble", True, False),
        # no ensemble: the CNN job runs without the map, no error
        ("auto", "weights", False, False),
        ("auto", "none", False, False),
        ("on", "ensemble", True, False),
        # asked for: the job fails naming the missing ensemble
        ("on", "weights", True, False),
        ("off", "ensemble", False, False),
    ],
)
def test_default_uncertainty_per_method_and_installation(
    tmp_path, install, setting, installed, cnn, dvk
):
    install(installed)
    s = _settings(tmp_path, default_uncertainty=setting)
    assert (s.resolved_uncertainty("cnn"), s.resolved_uncertainty("dvk")) == (cnn, dvk)


def test_auto_engine_and_auto_uncertainty_read_the_same_installation(tmp_path, install):
    s = _settings(tmp_path, default_method="auto")
    install("ensemble")
    assert s.resolved_method == "cnn" and s.resolved_uncertainty(s.resolved_method) is True
    install("weights")
    assert s.resolved_method == "cnn" and s.resolved_uncertainty(s.resolved_method) is False
    install("none")
    assert s.resolved_method == "dvk" and s.resolved_uncertainty(s.resolved_method) is False


def test_the_setting_comes_from_the_environment_and_defaults_to_auto(tmp_path, monkeypatch):
    assert Settings.model_fields["default_uncertainty"].default == "auto"
    assert Settings.model_fields["default_method"].default == "dvk", (
        "the engine's default is not changed here"
    )
    monkeypatch.setenv("SPECTDOSE_DEFAULT_UNCERTAINTY", "off")
    assert Settings(environment="development", data_dir=tmp_path).default_uncertainty == "off"
    monkeypatch.setenv("SPECTDOSE_DEFAULT_UNCERTAINTY", "maybe")
    with pytest.raises(ValueError, match="default_uncertainty"):
        Settings(environment="development", data_dir=tmp_path)


# ------------------------------------------------------------------ REST and DICOM jobs


def _rest_options(settings: Settings, **params) -> dict:
    """The options POST /studies would store for these query fields (the dependency, called directly)."""
    return submit_params(types.SimpleNamespace(settings=settings), **params).options


def test_rest_jobs_take_the_default_unless_they_say(tmp_path, install):
    install("ensemble")
    auto = _settings(tmp_path)
    assert _rest_options(auto, method="cnn").get("uncertainty") is True
    assert "uncertainty" not in _rest_options(auto, method="cnn", uncertainty=False), (
        "explicit false wins"
    )
    assert "uncertainty" not in _rest_options(auto), (
        "a DVK job (the default engine) gets none, and no error"
    )
    # explicit true with DVK: still refused, naming the fix
    with pytest.raises(HTTPException) as refused:
        _rest_options(auto, uncertainty=True)
    assert refused.value.status_code == 422 and "method (REST)" in refused.value.detail
    off = _settings(tmp_path, default_uncertainty="off")
    assert "uncertainty" not in _rest_options(off, method="cnn")
    assert _rest_options(off, method="cnn", uncertainty=True)["uncertainty"] is True, (
        "explicit true wins"
    )
    install("weights")
    assert "uncertainty" not in _rest_options(auto, method="cnn"), (
        "no ensemble installed: none, no error"
    )
    assert (
        _rest_options(_settings(tmp_path, default_uncertainty="on"), method="cnn")["uncertainty"]
        is True
    )


def test_the_omitted_rest_field_and_the_stored_choice_show_in_the_job(tmp_path, install, study_zip):
    install("ensemble")
    # broker down: the job is stored (state received) with its options
    with TestClient(create_app(_settings(tmp_path), sweeper=False)) as client:

        def job_options(**params) -> dict:
            r = client.post(
                "/studies",
                content=study_zip,
                params=params,
                headers={**AUTH, "Content-Type": "application/zip"},
            )
            assert r.status_code == 202, r.text
            return client.get(r.headers["location"], headers=AUTH).json()["options"]

        assert job_options(method="cnn")["uncertainty"] is True
        assert "uncertainty" not in job_options(method="cnn", uncertainty="false")


def test_dicom_jobs_take_the_default(tmp_path, install):
    install("ensemble")
    assert (
        node_options(_settings(tmp_path, default_method="cnn"), "MODALITY")["uncertainty"] is True
    )
    assert "uncertainty" not in node_options(_settings(tmp_path), "MODALITY"), (
        "DVK (the default engine): none"
    )
    assert "uncertainty" not in node_options(
        _settings(tmp_path, default_method="cnn", default_uncertainty="off"), "MODALITY"
    )
    install("weights")
    assert "uncertainty" not in node_options(_settings(tmp_path, default_method="cnn"), "MODALITY")


def test_a_job_without_the_map_gives_a_404_that_says_so(tmp_path):
    """A finished CNN job without the map (no ensemble installed): GET /jobs/{id}/uncertainty is 404."""
    from service.jobs import JobStore
    from service.storage import Storage
    from worker.execute import build_manifest

    settings = _settings(tmp_path)
    store, storage = JobStore(settings.db_url), Storage(settings.data_dir)
    job_id = "0" * 31 + "1"
    store.create_job(
        job_id,
        source="rest",
        submitted_by="token:x",
        options={"method": "cnn"},
        export=[],
        queue="cpu",
        n_files=0,
    )
    work = storage.new_work_dir(job_id, 1)
    (work / "summary.json").write_text("{}")
    storage.publish_output(
        job_id, work, build_manifest({"summary_json": work / "summary.json"}, "k", 1)
    )
    with TestClient(create_app(settings, sweeper=False)) as client:
        r = client.get(f"/jobs/{job_id}/uncertainty", headers=AUTH)
    assert r.status_code == 404 and "doserate_sigma" in r.json()["detail"] and "without the uncertainty map" in r.json()["detail"]


# ------------------------------------------------------------------ one job, end to end


@pytest.mark.skipif(not STORESCU.exists(), reason="dcmtk is not installed (apt-get install dcmtk)")
def test_a_pushed_study_gets_the_sigma_map_served_and_sent_back(
    tmp_path, install, redis_url, phantom_files
):
    from service.celery_app import make_celery
    from service.demo import DEMO_PACS_AET, DemoPacs
    from service.dicom_node import DicomNode
    from service.jobs import JobStore
    from service.localredis import free_port
    from service.queue import Enqueuer
    from service.storage import Storage
    from worker.execute import run_job

    install("ensemble")
    pacs = DemoPacs(tmp_path / "pacs").start()
    settings = _settings(
        tmp_path,
        redis_url=redis_url,
        dicom_port=free_port(),
        default_method="cnn",
        export=["sender"],
        peers=[str(pacs.peer)],
        allowed_calling_aets=[DEMO_PACS_AET],
    )
    store, storage = JobStore(settings.db_url), Storage(settings.data_dir)
    node = DicomNode(settings, store, storage, Enqueuer(make_celery(settings), store))
    node.start()
    try:
        pushed = subprocess.run(
            [
                str(STORESCU),
                "-aet",
                DEMO_PACS_AET,
                "-aec",
                settings.ae_title,
                "127.0.0.1",
                str(settings.dicom_port),
                *map(str, phantom_files),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert pushed.returncode == 0, pushed.stderr
        job = wait_for(
            lambda: [j for j in store.list_jobs()[0] if j.state == "queued"], 20, what="the job"
        )[0]
        assert job.options["uncertainty"] is True and job.options["method"] == "cnn"
        outcome = run_job(store, storage, settings, job.id, worker="w1")
        assert outcome["state"] == "done", store.get(job.id).reason
    finally:
        node.stop()
        pacs.stop()
    with TestClient(create_app(settings, sweeper=False)) as client:
        shown = client.get(f"/jobs/{job.id}", headers=AUTH).json()
        r = client.get(f"/jobs/{job.id}/uncertainty", headers=AUTH)
    assert shown["state"] == "done" and shown["options"]["uncertainty"] is True
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    sigma = pydicom.dcmread(storage.job_output(job.id) / "doserate_sigma_pm.dcm")
    mapping = sigma.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert "1-sigma" in mapping.LUTExplanation
    received = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pacs.received
    }
    assert str(sigma.SOPInstanceUID) in received, (
        "the sigma map goes back to the sender with the dose"
    )

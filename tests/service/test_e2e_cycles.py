"""A therapy cycle end to end over DICOM: `spectdose serve` (its own Redis, gateway, DICOM node,
Celery worker) receives four time points on four different days from a modality, computes each,
integrates the cycle after time points 2, 3 and 4, and sends every result back to the sender.

The site asks for dose-rate maps per study (SPECTDOSE_DEFAULT_TIME_MODEL=none), as a site that
images every cycle does. About 70 s on 2 cores (106 s under load): a 4-time-point virtual patient
(ideal camera), serve's start, 4 dose jobs and 3 cycle jobs through the real worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pydicom
import pytest

from service.config import DicomPeer
from service.localredis import free_port

from .support import AUTH, TOKEN, push_study, running, wait_for
from .test_cycles import Pacs

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(900),
]

ROOT = Path(__file__).resolve().parents[2]
TIME_POINTS_H = (4, 24, 96, 168)
LABELS = ("tp004h", "tp024h", "tp096h", "tp168h")
TIMEOUT_S = 300


def test_four_time_points_pushed_on_four_days_give_cycle_doses_after_2_3_and_4(tmp_path, kernel_cache_dir):
    from spectdose.phantoms.cycle import generate_cycle

    if not Path("/usr/bin/redis-server").exists():
        pytest.skip("needs redis-server (scripts/bootstrap.sh --test-tools)")
    cycle_dir = tmp_path / "cycle"
    generate_cycle(cycle_dir, 8, "small", TIME_POINTS_H, truth_engine="dvk", kernel_cache_dir=kernel_cache_dir,
                   camera="ideal")
    days = [str(pydicom.dcmread(next((cycle_dir / label / "dicom" / "NM").glob("*.dcm")),
                                stop_before_pixels=True).AcquisitionDate) for label in LABELS]
    assert len(set(days)) == 4, f"four different days in the headers: {days}"

    modality = Pacs()  # the sender: results go back to it
    http_port, dicom_port, redis_port = free_port(), free_port(), free_port()
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--http-port", str(http_port), "--dicom-port",
           str(dicom_port), "--ae-title", "SPECTDOSE", "--data-dir", str(data), "--redis-url",
           f"redis://127.0.0.1:{redis_port}/0", "--quiet-s", "1", "--export", "sender",
           "--peer", f"MODALITY@127.0.0.1:{modality.port}"]
    # A site imaging cycles: each pushed time point gives its dose-rate map, the cycle the absorbed dose.
    env = {**os.environ, "SPECTDOSE_API_TOKENS": TOKEN, "SPECTDOSE_LOG_LEVEL": "INFO",
           "SPECTDOSE_DEFAULT_TIME_MODEL": "none"}
    log_path = tmp_path / "serve.log"
    http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", headers=AUTH, timeout=30)
    node = DicomPeer("SPECTDOSE", "127.0.0.1", dicom_port)
    try:
        with open(log_path, "w") as log, running(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT) as proc:
            try:
                wait_for(lambda: proc.poll() is None and _up(http), 60, what="serve to answer /health")
                wait_for(lambda: (data / "run" / "worker.pid").exists(), 60, what="the worker")
                jobs, seen = [], []
                for k, label in enumerate(LABELS):
                    files = sorted((cycle_dir / label / "dicom").rglob("*.dcm"))
                    assert push_study(node, files, calling_aet="MODALITY") == len(files)  # retried as a modality does
                    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                    job = wait_for(lambda s=study: _done(http, s), TIMEOUT_S, 0.5, what=f"the job of {label}")
                    assert job["state"] == "done", job
                    jobs.append(job["job_id"])
                    if k == 0:
                        continue
                    cycle = wait_for(lambda j=job["job_id"], n=k: _integrated(http, j, n), TIMEOUT_S, 0.5,
                                     what=f"the cycle result after {label}")
                    seen.append(cycle)
                    rtdose = http.get(f"/cycles/{cycle['cycle_id']}/rtdose")
                    assert rtdose.status_code == 200
            except BaseException:
                print(log_path.read_text()[-6000:])
                raise
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        final = seen[-1]
        assert [tp["job_id"] for tp in final["time_points"]] == jobs
        assert [tp["state"] for tp in final["time_points"]] == ["joined"] * 4
        results = final["results"]  # newest first
        assert [r["used"] for r in reversed(results)] == [jobs[:2], jobs[:3], jobs]
        assert all(r["state"] == "done" for r in results)
        assert [r["superseded_by"] for r in results] == [None, results[0]["result_id"], results[0]["result_id"]]
        # Back at the sender: the three cycle RT Doses, each sent when newest (the time points, dose
        # rate only, sent their dose-rate maps and no single-time-point RT Dose).
        cycle_uids = {r["rtdose"]["sop_instance_uid"] for r in results}
        received = modality.of_kind("RTDOSE")
        assert cycle_uids == set(received)
        last = received[results[0]["rtdose"]["sop_instance_uid"]]
        assert all(tp["study_instance_uid"] in last.DerivationDescription for tp in final["time_points"])
        assert "VP000008" not in log_path.read_text(), "no PatientID in the service log"
    finally:
        http.close()
        modality.stop()


def _up(http: httpx.Client) -> bool:
    try:
        return http.get("/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _done(http: httpx.Client, study_uid: str) -> dict | None:
    jobs = http.get("/jobs", params={"study_instance_uid": study_uid}).json()["jobs"]
    return jobs[0] if jobs and jobs[0]["state"] in ("done", "failed") else None


def _integrated(http: httpx.Client, job_id: str, n_results: int) -> dict | None:
    found = http.get("/cycles", params={"job_id": job_id}).json()["cycles"]
    if not found:
        return None
    cycle = found[0]
    done = [r for r in cycle["results"] if r["state"] in ("done", "failed")]
    return cycle if len(done) >= n_results and cycle["state"] in ("integrated", "failed") else None

"""An export destination that accepts TCP and never answers (issue 19, case 13) must not hold the
worker that computes doses: connecting and association negotiation have short limits, and a
failed association is retried by the task later (Celery countdown), not inside it, so the one
worker of `serve` computes the other jobs in between. The job fails after its bounded retries
with the reason; its computed result stays downloadable.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from service.celery_app import make_celery
from service.jobs import JobStore
from service.localredis import free_port
from service.queue import Enqueuer
from service.storage import Storage
from worker.execute import build_manifest, dose_options

from .support import make_settings, running, wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


class SilentPeer:
    """A TCP listener that accepts every connection and never sends a byte (a hung PACS)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read, never answered

    def close(self):
        self.sock.close()
        for c in self.accepted:
            c.close()


def _ready_job(settings, store, storage, dicom_file: Path, export: list[str]) -> str:
    """A job whose output is already complete (a DICOM object to send): the worker only exports."""
    job_id = uuid.uuid4().hex
    src = storage.uploads / f"{job_id}.dcm"
    shutil.copy(dicom_file, src)
    storage.publish_input(job_id, [src])
    store.create_job(job_id, source="rest", submitted_by="token:test", options={"method": "dvk"}, export=export,
                     queue="cpu", n_files=1)
    work = storage.new_work_dir(job_id, 1)
    shutil.copy(dicom_file, work / "object.dcm")
    key = dose_options({"method": "dvk"}, settings).key()
    storage.publish_output(job_id, work, build_manifest({"object": work / "object.dcm"}, key, 1))
    return job_id


def test_a_destination_that_never_answers_does_not_hold_the_worker(tmp_path, redis_url, phantom_files):
    peer = SilentPeer()
    try:
        settings = make_settings(tmp_path / "data", redis_url=redis_url, peers=[f"HUNG@127.0.0.1:{peer.port}"],
                                 export_connect_timeout_s=1.0, export_associate_timeout_s=2.0, export_timeout_s=30,
                                 retry_backoff_s=4.0, max_retries=2)
        store, storage = JobStore(settings.db_url), Storage(settings.data_dir)
        enqueuer = Enqueuer(make_celery(settings), store)
        env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "service.cli", "worker", "--pool", "solo", "--queues", "cpu",
               "--hostname", f"export-{free_port()}@test"]
        log = tmp_path / "worker.log"
        with open(log, "w") as out, running(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True):
            wait_for(lambda: " ready." in log.read_text(), 90, 0.5, what="the worker")
            hung = _ready_job(settings, store, storage, phantom_files[0], export=["HUNG"])
            others = [_ready_job(settings, store, storage, phantom_files[0], export=[]) for _ in range(3)]
            start = time.monotonic()
            assert enqueuer.submit(hung, "cpu")
            for job_id in others:
                assert enqueuer.submit(job_id, "cpu")
            wait_for(lambda: all(store.get(j).state == "done" for j in others), 60, 0.2,
                     what=f"the other jobs; worker log {log}")
            others_done = time.monotonic() - start
            first = store.get(hung)
            # one association attempt (connect 1 s + A-ASSOCIATE 2 s) is all the worker gave the hung peer
            assert others_done < 25, f"the other jobs waited {others_done:.1f} s behind the hung destination"
            assert first.state in ("queued", "running"), first.state
            wait_for(lambda: store.get(hung).state == "failed", 90, 0.5, what="the hung job to give up")
            took = time.monotonic() - start
            job = store.get(hung)
            print(f"\nhung export destination: 3 other jobs done after {others_done:.1f} s; the hung one failed "
                  f"after {took:.1f} s and {job.transient_failures} tries")
            assert job.reason.startswith("gave up after 3 transient failures") and "HUNG" in job.reason
            assert "no answer within" in job.reason, job.reason
            assert storage.output_manifest(hung) is not None, "the computed result stays downloadable"
            assert len(peer.accepted) == 3, "one connection per try, no retries inside the task"
            # 3 tries x (at most 3 s) + backoff 4 s + 8 s: the worker was busy with it for ~9 s of that
            assert took < 60, took  # before: 4 tries x ~96 s
    finally:
        peer.close()

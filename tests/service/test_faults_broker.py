"""The job store and the broker are reconciled (issue 8, item 2).

A Redis that comes back without its data leaves jobs ``queued`` over an empty queue; the
gateway's sweeper republishes them within ``RECONCILE_INTERVAL_S`` (and a worker does at
its start), instead of the 4 h visibility timeout. A job is still claimed once (fencing).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from service.celery_app import make_celery
from service.jobs import JobStore
from service.localredis import LocalRedis, free_port
from service.queue import Enqueuer, Sweeper, reconcile_once
from service.storage import Storage, atomic_write_bytes
from worker.execute import build_manifest, dose_options

from .support import make_settings, running, wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def _need_redis() -> None:
    if not Path("/usr/bin/redis-server").exists() and not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")


def _ready_job(settings, store: JobStore, storage: Storage) -> str:
    """A queued job whose output is already complete: the worker only finishes it (seconds)."""
    job_id = uuid.uuid4().hex
    src = storage.uploads / f"{job_id}.dcm"
    atomic_write_bytes(src, b"not used: the output is complete")
    storage.publish_input(job_id, [src])
    options = {"method": "dvk"}
    store.create_job(job_id, source="rest", submitted_by="token:test", options=options, export=[], queue="cpu",
                     n_files=1)
    work = storage.new_work_dir(job_id, 1)
    atomic_write_bytes(work / "summary.txt", b"dose summary\n")
    key = dose_options(options, settings).key()
    storage.publish_output(job_id, work, build_manifest({"summary_txt": work / "summary.txt"}, key, 1))
    return job_id


def test_reconcile_republishes_only_jobs_without_a_message(tmp_path, redis_url):
    settings = make_settings(tmp_path / "data", redis_url=redis_url)
    store, storage = JobStore(settings.db_url), Storage(settings.data_dir)
    enqueuer = Enqueuer(make_celery(settings), store)
    jobs = [_ready_job(settings, store, storage) for _ in range(3)]
    for job_id in jobs:
        assert enqueuer.submit(job_id, "cpu")
    assert enqueuer.broker_job_ids() == set(jobs)
    assert reconcile_once(store, enqueuer, grace_s=0) == 0, "every queued job has its message"
    import redis

    with redis.Redis.from_url(redis_url) as r:
        r.flushall()  # what a Redis restarted without its data looks like
    assert enqueuer.broker_job_ids() == set()
    assert reconcile_once(store, enqueuer, grace_s=3600) == 0, "jobs queued within the grace period are left alone"
    assert reconcile_once(store, enqueuer, grace_s=0) == 3
    assert enqueuer.broker_job_ids() == set(jobs)
    assert [store.get(j).state for j in jobs] == ["queued"] * 3
    assert len(store.audit_events(action="job_republished")) == 3
    # a delivered, unacknowledged message (a worker holds it) counts as present
    import redis

    with redis.Redis.from_url(redis_url) as r:
        raw = r.rpop("cpu")
        r.hset("unacked", "tag-1", json.dumps([json.loads(raw), "", "cpu"]))
    assert enqueuer.broker_job_ids() == set(jobs)


def test_redis_restarted_without_its_data_loses_no_queued_job(tmp_path):
    """3 jobs queued; Redis SIGKILLed and restarted empty under a running worker: all done < 2 min."""
    _need_redis()
    port = free_port()
    redis1 = LocalRedis(port, tmp_path / "redis1").start()
    redis2 = None
    settings = make_settings(tmp_path / "data", redis_url=redis1.url)  # default reconcile interval (30 s)
    store, storage = JobStore(settings.db_url), Storage(settings.data_dir)
    enqueuer = Enqueuer(make_celery(settings), store)
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "service.cli", "worker", "--pool", "solo", "--queues", "cpu",
           "--hostname", "faults@test"]
    log = tmp_path / "worker.log"
    sweeper = None
    try:
        with open(log, "w") as out, running(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True) as worker:
            wait_for(lambda: " ready." in log.read_text(), 60, 0.5, what="the worker")
            os.killpg(worker.pid, signal.SIGSTOP)  # the worker stays up but takes nothing for now
            jobs = [_ready_job(settings, store, storage) for _ in range(3)]
            for job_id in jobs:
                assert enqueuer.submit(job_id, "cpu")
            assert [store.get(j).state for j in jobs] == ["queued"] * 3
            redis1.proc.send_signal(signal.SIGKILL)
            redis1.proc.wait(10)
            shutil.rmtree(tmp_path / "redis1")  # restarted without its data
            redis2 = LocalRedis(port, tmp_path / "redis2").start()
            assert enqueuer.broker_job_ids() == set()
            start = time.monotonic()
            os.killpg(worker.pid, signal.SIGCONT)
            sweeper = Sweeper(store, enqueuer, interval_s=settings.sweep_interval_s, lease_s=settings.lease_s,
                              visibility_timeout_s=settings.visibility_timeout_s,
                              reconcile_interval_s=settings.reconcile_interval_s)
            sweeper.start()
            wait_for(lambda: all(store.get(j).state == "done" for j in jobs), 120, 0.5,
                     what=f"the 3 jobs to finish after the Redis restart; worker log: {log}")
            elapsed = time.monotonic() - start
            print(f"\nRedis restarted without data: 3 queued jobs done {elapsed:.1f} s later")
            assert elapsed < 120
            assert [store.get(j).attempt for j in jobs] == [1, 1, 1], "each job ran once"
            # the paused worker may already hold one message in its socket (a BRPOP answered
            # before the pause): that job runs from it; the others were republished.
            assert 2 <= len(store.audit_events(action="job_republished")) <= 3
    finally:
        if sweeper is not None:
            sweeper.stop()
        redis1.stop()
        if redis2 is not None:
            redis2.stop()

"""Soak of the whole service on loopback: uploads for a fixed time while its worker and broker are killed.

Starts ``spectdose serve`` (gateway, DICOM node, supervised Celery worker) in a temporary
folder against a Redis run here (so it can be crashed and restarted), with API tokens set
as in production. For ``--minutes`` it uploads small virtual patients, each a patient of its
own (fresh PatientID and UIDs), alternating at random between ``POST /studies`` (zip, retried
on 5xx / connection errors as a client would) and C-STORE (pynetdicom, the whole study again
on a new association when one fails, as a modality does); every ``--cycle-every``-th patient
is a therapy cycle (``--time-points``, one study per time point, the SEG with the first) so
cycle results are made and integrated. At most ``--max-in-flight`` studies wait at once (a
bounded load, one new study at most every ``--interval-s``). Meanwhile the worker's process
group is SIGKILLed every ``--kill-every`` minutes and Redis is SIGKILLed once, mid-run, and
restarted on its files after ``--redis-down-s`` (``--redis-wipe``: restarted empty).

At the end (after the queue drains) it checks that every study uploaded is one job, done once
(one ``job_done`` audit event, nothing left received/queued/running), that no RT Dose reached
the receiving SCP other than those the jobs and cycle results recorded (a duplicate from an
interrupted attempt would be one) and each job's did, and that every cycle result is final
(done, or failed with a reason; none queued or running), each cycle integrated over all its
time points once, its newest RT Dose delivered. Prints studies/hour, the status route's
p95 (``GET /jobs/{id}``, polled as a client does), the worker kills and Redis restarts
survived; ``--json FILE`` writes the figures. Exits 1 if a check fails, 2 if it could not run.

Not part of CI (bench/ is outside pytest's testpaths). The 30-minute run of issue 19:

    nice -n 10 .venv/bin/python bench/soak.py --minutes 30 --json soak.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The test helpers reused below import starlette's TestClient, which warns about httpx on import.
warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")

from service.config import DicomPeer  # noqa: E402
from service.jobs import JobStore  # noqa: E402
from service.localredis import LocalRedis, free_port  # noqa: E402
from tests.service.support import push_study, zip_folder  # noqa: E402
from tests.service.test_cycles import variant  # noqa: E402
from tests.service.test_e2e_cycles_integrity import CountingPacs  # noqa: E402

SENDER_AET = "SOAK"  # the modality / PACS the studies come from and the results go back to
SEED = 8  # the small virtual patient of the service tests (tests/conftest.py)
FINAL_JOB = ("done", "failed")
FINAL_RESULT = ("done", "failed")


def cycle_phantom(cache: Path, time_points_h: tuple[float, ...]) -> Path:
    """The cycle of virtual patient 8 (ideal camera: seconds per time point, not minutes), made once.

    What ``spectdose phantom cyc8 --seed 8 --time-points ...`` writes, with the ideal camera and
    the DVK truth the service tests use, so that a fresh machine prepares it in about a minute.
    """
    from spectdose.phantoms.cycle import generate_cycle

    folder = cache / f"soak-cycle-seed{SEED}-{'-'.join(f'{h:g}' for h in time_points_h)}"
    if not (folder / "cycle.json").exists():
        print(f"writing the virtual patient's cycle (seed {SEED}, {time_points_h} h) to {folder} ...", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        generate_cycle(folder, SEED, "small", time_points_h, truth_engine="dvk", kernel_cache_dir=cache / "kernels",
                       camera="ideal", seg="first")
    return folder


@dataclass
class Study:
    """One upload: a study of one patient (a single study, or time point ``tp`` of a cycle)."""

    name: str
    transport: str  # "rest" or "dicom"
    folder: Path
    study_uid: str
    patient: str
    tp: int | None = None  # index of the time point for a cycle's study
    sent_at: float | None = None  # wall-clock time.time() when the upload finished
    job_id: str | None = None
    state: str | None = None
    upload_tries: int = 0
    upload_error: str | None = None
    running_attempt: int | None = None  # the attempt seen running, and since when (a stuck one shows here)
    running_since: float = 0.0
    running_max_s: float = 0.0


@dataclass
class Run:
    studies: list[Study] = field(default_factory=list)
    cycles: dict[str, list[Study]] = field(default_factory=dict)  # patient -> its time points
    status_ms: list[float] = field(default_factory=list)
    status_errors: list[str] = field(default_factory=list)
    kills: list[dict] = field(default_factory=list)
    redis_restarts: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path, cache: Path):
        self.args, self.work, self.cache = args, work, cache
        self.rng = random.Random(args.seed)
        self.run = Run()
        self.token = secrets.token_urlsafe(24)
        self.data = work / "data"
        self.http_port, self.dicom_port = free_port(), free_port()
        self.redis = LocalRedis(free_port(), work / "redis")
        self.pacs = CountingPacs()
        self.node = DicomPeer("SPECTDOSE", "127.0.0.1", self.dicom_port)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=120)
        self.proc: subprocess.Popen | None = None
        self.stop = threading.Event()
        self.n_patients = 0

    # ------------------------------------------------------------ service

    def start(self) -> None:
        self.redis.start()
        cmd = [sys.executable, "-m", "service.cli", "serve", "--data-dir", str(self.data), "--http-port",
               str(self.http_port), "--dicom-port", str(self.dicom_port), "--redis-url", self.redis.url,
               "--quiet-s", str(self.args.quiet_s), "--export", "sender",
               "--peer", f"{SENDER_AET}@127.0.0.1:{self.pacs.port}"]
        # Production settings but for the token; the supervised worker is what gets killed.
        env = {**os.environ, "SPECTDOSE_API_TOKENS": self.token, "SPECTDOSE_LOG_LEVEL": "INFO",
               "PYTHONPATH": str(ROOT)}
        self.log = open(self.work / "serve.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (self._health() and self.worker_pid()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"serve did not come up; see {self.work / 'serve.log'}")
            time.sleep(0.5)

    def _health(self) -> bool:
        try:
            return self.http.get("/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def worker_pid(self) -> int | None:
        try:
            return int((self.data / "run" / "worker.pid").read_text())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        self.stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.http.close()
        self.pacs.stop()
        self.redis.stop()
        if getattr(self, "log", None):
            self.log.close()

    # ------------------------------------------------------------ studies

    def new_patient(self, cycle: bool) -> list[Study]:
        """The next patient's studies (fresh PatientID and UIDs), written under the work folder."""
        self.n_patients += 1
        patient = f"SOAK{self.n_patients:05d}-{uuid.uuid4().hex[:6]}"
        phantom = self.phantom
        labels = self.tp_labels if cycle else [self.single_label]
        out = []
        for k, label in enumerate(labels):
            folder = variant(phantom / label, self.work / "studies" / f"{patient}-{label}", patient_id=patient,
                             with_seg=cycle and k == 0)
            uid = str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
            transport = "rest" if self.rng.random() < self.args.rest_fraction else "dicom"
            out.append(Study(f"{patient}-{label}", transport, folder, uid, patient, tp=k if cycle else None))
        return out

    def upload(self, study: Study) -> None:
        """Send one study; a refused or dropped upload is sent again (as a client or a modality would)."""
        deadline = time.monotonic() + self.args.upload_timeout_s
        if study.transport == "dicom":
            files = sorted(study.folder.glob("*.dcm"))
            while True:
                study.upload_tries += 1
                try:
                    push_study(self.node, files, calling_aet=SENDER_AET)
                    break
                except AssertionError as exc:  # push_study's own retries exhausted
                    study.upload_error = str(exc)
                    if time.monotonic() > deadline:
                        raise
            study.sent_at = time.time()
            return
        body = zip_folder(study.folder, self.work / "zips" / f"{study.name}.zip").read_bytes()
        while True:
            study.upload_tries += 1
            try:
                rsp = self.http.post("/studies", content=body, params={"export": SENDER_AET},
                                     headers={"Content-Type": "application/zip"})
                if rsp.status_code in (200, 202):
                    study.job_id = rsp.json()["job_id"]
                    study.sent_at = time.time()
                    return
                study.upload_error = f"{rsp.status_code} {rsp.text[:200]}"
                if rsp.status_code < 500 and rsp.status_code != 429:
                    raise RuntimeError(f"{study.name}: POST /studies {study.upload_error}")
            except httpx.HTTPError as exc:
                study.upload_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"{study.name}: not accepted within {self.args.upload_timeout_s:.0f} s "
                                   f"({study.upload_error})")
            time.sleep(2.0)

    def poll(self, study: Study) -> None:
        """The study's job and its state, as a client polls it (the status route is timed)."""
        try:
            if study.job_id is None:
                rsp = self.http.get("/jobs", params={"study_instance_uid": study.study_uid})
                if rsp.status_code == 200 and rsp.json()["jobs"]:
                    study.job_id = rsp.json()["jobs"][-1]["job_id"]
                return
            t = time.perf_counter()
            rsp = self.http.get(f"/jobs/{study.job_id}")
            ms = 1000 * (time.perf_counter() - t)
            with self.run.lock:
                if rsp.status_code == 200:
                    self.run.status_ms.append(ms)
                    job = rsp.json()
                    study.state = job["state"]
                    if study.state == "running":
                        if study.running_attempt != job["attempt"]:
                            study.running_attempt, study.running_since = job["attempt"], time.time()
                        study.running_max_s = max(study.running_max_s, time.time() - study.running_since)
                else:
                    self.run.status_errors.append(f"GET /jobs/{{id}} {rsp.status_code}")
        except httpx.HTTPError as exc:
            with self.run.lock:
                self.run.status_errors.append(f"{type(exc).__name__}: {exc}")

    def open_studies(self) -> list[Study]:
        return [s for s in self.run.studies if s.sent_at is None or s.state not in FINAL_JOB]

    # ------------------------------------------------------------ faults

    def faults(self, t0: float, t_end: float) -> None:
        """Worker SIGKILLs every ``kill_every`` minutes and one Redis crash mid-run (a thread)."""
        kill_every_s = self.args.kill_every * 60
        next_kill = t0 + kill_every_s
        redis_at = t0 + self.args.redis_restart_at * (t_end - t0) if self.args.redis_restart_at > 0 else None
        while not self.stop.is_set() and time.time() < t_end:
            now = time.time()
            if redis_at is not None and now >= redis_at:
                self.restart_redis()
                redis_at = None
            elif now >= next_kill:
                self.kill_worker()
                next_kill += kill_every_s
            self.stop.wait(0.5)

    def kill_worker(self) -> None:
        pid = self.worker_pid()
        running, integrating = self._running_jobs(), self._running_cycle_results()
        event = {"at": time.time(), "pid": pid, "jobs_running": running, "cycle_results_running": integrating,
                 "restarted_s": None}
        if pid is None:
            event["error"] = "no worker pid"
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # the worker and its pool child, whatever they were doing
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not self.stop.is_set():
                new = self.worker_pid()
                if new and new != pid:
                    event["restarted_s"] = round(time.time() - event["at"], 1)
                    event["new_pid"] = new
                    break
                time.sleep(0.2)
        self.run.kills.append(event)
        print(f"[{self._clock()}] worker SIGKILLed (pid {pid}, {len(running)} job(s) and {len(integrating)} cycle "
              "result(s) running); "
              f"new worker after {event['restarted_s']} s", flush=True)

    def _running_jobs(self) -> list[str]:
        try:
            return [j["job_id"] for j in self.http.get("/jobs", params={"state": "running"}).json()["jobs"]]
        except (httpx.HTTPError, KeyError, ValueError):
            return []

    def _running_cycle_results(self) -> list[str]:
        running = []
        for studies in list(self.run.cycles.values()):
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                cycle = self._cycle(studies)
                running += [r["result_id"] for r in (cycle or {}).get("results", []) if r["state"] == "running"]
        return running

    def restart_redis(self) -> None:
        event = {"at": time.time(), "wiped": self.args.redis_wipe, "down_s": self.args.redis_down_s}
        self.redis.proc.send_signal(signal.SIGKILL)
        self.redis.proc.wait(10)
        self.redis.proc = None
        if self.args.redis_wipe:
            shutil.rmtree(self.redis.data_dir)
        self.stop.wait(self.args.redis_down_s)
        self.redis.start()
        event["back_s"] = round(time.time() - event["at"], 1)
        self.run.redis_restarts.append(event)
        print(f"[{self._clock()}] Redis SIGKILLed and restarted {'empty' if self.args.redis_wipe else 'on its files'}"
              f" after {event['back_s']} s", flush=True)

    def _clock(self) -> str:
        return f"{(time.time() - self.t0) / 60:5.1f} min"

    # ------------------------------------------------------------ the run

    def soak(self) -> None:
        args = self.args
        tps = tuple(float(h) for h in args.time_points.split(","))
        self.phantom = cycle_phantom(self.cache, tps)
        self.tp_labels = [f"tp{h:03.0f}h" for h in tps]
        self.single_label = self.tp_labels[len(tps) // 2]  # a time point inside Hanscheid's 48-168 h
        for d in ("studies", "zips"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        self.start()
        self.t0 = time.time()
        t_end = self.t0 + args.minutes * 60
        faults = threading.Thread(target=self.faults, args=(self.t0, t_end), name="faults", daemon=True)
        faults.start()
        pending: list[Study] = []  # studies of the current patient not yet sent (a cycle's later time points)
        last_upload = 0.0
        redis = (f"Redis restarted {'empty ' if args.redis_wipe else ''}at {args.redis_restart_at:.0%} of the run"
                 if args.redis_restart_at > 0 else "no Redis restart")
        print(f"[{self._clock()}] soak for {args.minutes:g} min: a worker SIGKILL every {args.kill_every:g} min, "
              f"{redis}", flush=True)
        while time.time() < t_end:
            for s in list(self.run.studies):
                if s.sent_at is not None and s.state not in FINAL_JOB:
                    self.poll(s)
            waiting = len(self.open_studies())
            if waiting < args.max_in_flight and time.time() - last_upload >= args.interval_s:
                if not pending:
                    cycle = args.cycle_every > 0 and (self.n_patients + 1) % args.cycle_every == 0
                    pending = self.new_patient(cycle)
                    if cycle:
                        self.run.cycles[pending[0].patient] = list(pending)
                study = pending.pop(0)
                self.run.studies.append(study)
                last_upload = time.time()
                self.upload(study)
                print(f"[{self._clock()}] sent {study.name} over {study.transport} ({waiting} waiting)", flush=True)
            time.sleep(args.poll_s)
        # A cycle's remaining time points are sent too: a cycle cut short would prove nothing.
        for study in pending:
            self.run.studies.append(study)
            self.upload(study)
            print(f"[{self._clock()}] sent {study.name} over {study.transport} (the rest of its cycle)", flush=True)
        self.t_uploads_end = time.time()
        faults.join()
        print(f"[{self._clock()}] uploads over ({len(self.run.studies)} studies); draining ...", flush=True)
        deadline = time.monotonic() + args.drain_timeout_s
        while time.monotonic() < deadline:
            for s in self.open_studies():
                self.poll(s)
            if not self.open_studies() and self._cycles_settled():
                break
            time.sleep(1.0)
        self.t_drained = time.time()

    def _cycles_settled(self) -> bool:
        for studies in self.run.cycles.values():
            cycle = self._cycle(studies)
            if cycle is None or any(r["state"] not in FINAL_RESULT for r in cycle["results"]):
                return False
            newest = cycle["results"][0] if cycle["results"] else None
            if newest is None or len(newest["used"]) < len(studies):
                return False  # its last time point has not been integrated yet
        return True

    def _cycle(self, studies: list[Study]) -> dict | None:
        known = next((s.job_id for s in studies if s.job_id), None)
        if known is None:
            return None
        rsp = self.http.get("/cycles", params={"job_id": known})
        found = rsp.json().get("cycles") if rsp.status_code == 200 else None
        return found[0] if found else None

    # ------------------------------------------------------------ checks

    def check(self) -> tuple[dict, list[str]]:
        problems: list[str] = []
        store = JobStore(f"sqlite:///{self.data / 'jobs.sqlite'}")
        try:
            done_events = [e.job_id for e in store.audit_events(action="job_done")]
            result_done = [e.detail.get("result_id") for e in store.audit_events(action="cycle_result_done")]
            # Why a job or cycle result ran again: the sweeper's requeues and the reconciler's republications.
            recovered = [(e.job_id or e.detail.get("result_id"), e.action) for e in store.audit_events()
                         if e.action.endswith(("_requeued", "_republished"))]
        finally:
            store.close()
        jobs: dict[str, dict] = {}
        for s in self.run.studies:
            listing = self.http.get("/jobs", params={"study_instance_uid": s.study_uid}).json()
            if listing["total"] != 1:
                problems.append(f"{s.name} ({s.transport}): {listing['total']} jobs for one study")
            if not listing["jobs"]:
                continue
            job = listing["jobs"][0]
            jobs[job["job_id"]] = job
            s.job_id, s.state = job["job_id"], job["state"]
            if job["state"] != "done":
                problems.append(f"{s.name} ({s.transport}): job {job['job_id']} {job['state']}: {job.get('reason')}")
            n_done = done_events.count(job["job_id"])
            if job["state"] == "done" and n_done != 1:
                problems.append(f"{s.name}: job {job['job_id']} finished {n_done} times (job_done audit events)")
        for state in ("received", "queued", "running"):
            total = self.http.get("/jobs", params={"state": state, "limit": 1}).json()["total"]
            if total:
                problems.append(f"{total} job(s) left {state}")

        # RT Dose: every one the jobs and cycle results recorded, none other (a duplicate from a lost attempt).
        expected_job = {}
        for job_id, job in jobs.items():
            uids = {e["sop_instance_uid"] for e in job["exports"] if e["kind"] == "rtdose"}
            if job["state"] == "done" and len(uids) != 1:
                problems.append(f"job {job_id}: {len(uids)} RT Dose instances recorded for export")
            for uid in uids:
                expected_job[uid] = job_id
        cycle_uids: dict[str, str] = {}
        cycle_figures = []
        for patient, studies in self.run.cycles.items():
            cycle = self._cycle(studies)
            if cycle is None:
                problems.append(f"cycle of {patient}: no cycle found for its last time point")
                continue
            results = cycle["results"]
            for r in results:
                if r["state"] not in FINAL_RESULT:
                    problems.append(f"cycle {cycle['cycle_id']} result {r['result_id']} left {r['state']}")
                elif r["state"] == "failed" and not r.get("reason"):
                    problems.append(f"cycle {cycle['cycle_id']} result {r['result_id']} failed without a reason")
                if r["state"] == "done":
                    if result_done.count(r["result_id"]) != 1:
                        problems.append(f"cycle result {r['result_id']} done {result_done.count(r['result_id'])} "
                                        "times (cycle_result_done audit events)")
                    if (r.get("rtdose") or {}).get("sop_instance_uid"):
                        cycle_uids[r["rtdose"]["sop_instance_uid"]] = r["result_id"]
            joined = [tp for tp in cycle["time_points"] if tp["state"] == "joined"]
            if len(joined) != len(studies):
                problems.append(f"cycle {cycle['cycle_id']}: {len(joined)} of {len(studies)} time points joined "
                                f"({[(tp['state'], tp.get('reason')) for tp in cycle['time_points']]})")
            newest = results[0] if results else None
            if cycle["state"] != "integrated" or newest is None or newest["state"] != "done":
                problems.append(f"cycle {cycle['cycle_id']}: {cycle['state']}, newest result "
                                f"{newest and (newest['state'], newest.get('reason'))}")
            elif sorted(newest["used"]) != sorted(s.job_id for s in studies):
                problems.append(f"cycle {cycle['cycle_id']}: newest result uses {len(newest['used'])} of "
                                f"{len(studies)} time points")
            elif (newest.get("rtdose") or {}).get("sop_instance_uid") not in self.pacs.stores:
                problems.append(f"cycle {cycle['cycle_id']}: its newest RT Dose never reached the sender")
            cycle_figures.append({"cycle_id": cycle["cycle_id"], "state": cycle["state"],
                                  "results": [(r["state"], r.get("attempt")) for r in results]})
        with self.pacs._lock:
            received = {uid: str(ds.StudyInstanceUID) for uid, ds in self.pacs.received.items()
                        if ds.Modality == "RTDOSE"}
        for uid, job_id in expected_job.items():
            if jobs[job_id]["state"] == "done" and uid not in received:
                problems.append(f"job {job_id}: its RT Dose never reached the sender")
        unknown = set(received) - set(expected_job) - set(cycle_uids)
        if unknown:
            problems.append(f"{len(unknown)} RT Dose instance(s) at the sender that no job or cycle result recorded "
                            "(duplicates from an interrupted attempt)")
        per_study: dict[str, int] = {}
        for uid in set(received) & set(expected_job):
            per_study[received[uid]] = per_study.get(received[uid], 0) + 1
        if any(n > 1 for n in per_study.values()):
            problems.append(f"{sum(n > 1 for n in per_study.values())} studies with more than one RT Dose")
        resent = sum(1 for uid in received if self.pacs.stores[uid] > 1)

        # Faults survived: a new worker after each kill, Redis back, and every job after them done.
        finished = [dt.datetime.fromisoformat(j["finished_at"]).replace(tzinfo=dt.UTC).timestamp()
                    for j in jobs.values() if j["state"] == "done" and j["finished_at"]]
        last_finish = max(finished) if finished else None
        kills_survived = sum(1 for k in self.run.kills if k["restarted_s"] is not None
                             and last_finish is not None and last_finish > k["at"])
        redis_survived = sum(1 for r in self.run.redis_restarts if last_finish is not None and last_finish > r["at"])
        if len(self.run.kills) != kills_survived:
            problems.append(f"{len(self.run.kills) - kills_survived} of {len(self.run.kills)} worker kills not survived")
        if len(self.run.redis_restarts) != redis_survived:
            problems.append("the Redis restart was not survived")
        log = (self.work / "serve.log").read_text(errors="replace")
        leaked = sorted({s.patient for s in self.run.studies if s.patient in log})
        if leaked:
            problems.append(f"{len(leaked)} PatientID(s) in the service log")
        if self.run.status_errors:
            problems.append(f"{len(self.run.status_errors)} status requests failed, e.g. {self.run.status_errors[0]}")

        n_done = sum(1 for j in jobs.values() if j["state"] == "done")
        wall_s = (last_finish - self.t0) if last_finish else float("nan")
        attempts = [j["attempt"] for j in jobs.values()]
        figures = {
            "machine_cpus": os.cpu_count(),
            "minutes": self.args.minutes,
            "kill_every_min": self.args.kill_every,
            "studies": len(self.run.studies),
            "rest": sum(s.transport == "rest" for s in self.run.studies),
            "dicom": sum(s.transport == "dicom" for s in self.run.studies),
            "cycles": len(self.run.cycles),
            "cycle_time_points_h": self.args.time_points,
            "done": n_done,
            "wall_s": round(wall_s, 1),
            "drain_s": round(self.t_drained - self.t_uploads_end, 1),
            "studies_per_hour": round(n_done / wall_s * 3600, 1) if last_finish else None,
            "status_requests": len(self.run.status_ms),
            "status_p50_ms": round(float(np.percentile(self.run.status_ms, 50)), 1) if self.run.status_ms else None,
            "status_p95_ms": round(float(np.percentile(self.run.status_ms, 95)), 1) if self.run.status_ms else None,
            "status_max_ms": round(max(self.run.status_ms), 1) if self.run.status_ms else None,
            "status_errors": len(self.run.status_errors),
            "worker_kills": len(self.run.kills),
            "worker_kills_survived": kills_survived,
            "worker_kills_mid_job": sum(1 for k in self.run.kills if k["jobs_running"]),
            "worker_kills_mid_cycle_integration": sum(1 for k in self.run.kills if k["cycle_results_running"]),
            "worker_restart_s_max": max((k["restarted_s"] or 0 for k in self.run.kills), default=None),
            "redis_restarts": len(self.run.redis_restarts),
            "redis_restarts_survived": redis_survived,
            "redis_wiped": self.args.redis_wipe,
            "job_running_s_max": round(max((s.running_max_s for s in self.run.studies), default=0.0), 1),
            "jobs_attempt_max": max(attempts, default=None),
            "jobs_rerun": sum(a > 1 for a in attempts),
            "requeued_by_sweeper": sum(a.endswith("_requeued") for _, a in recovered),
            "republished_by_reconciler": sum(a.endswith("_republished") for _, a in recovered),
            "reruns": [{"job_id": j["job_id"], "attempt": j["attempt"],
                        "recovered_by": [a for i, a in recovered if i == j["job_id"]]}
                       for j in jobs.values() if j["attempt"] > 1],
            "upload_retries": sum(s.upload_tries - 1 for s in self.run.studies),
            "serve_log_tracebacks": log.count("Traceback (most recent call last)"),
            "rtdose_received": len(received),
            "rtdose_resent_same_uid": resent,
            "cycle_results": sum(len(c["results"]) for c in cycle_figures),
            "cycle_results_rerun": sum(1 for c in cycle_figures for _, a in c["results"] if (a or 1) > 1),
            "cycle_detail": cycle_figures,
            "checks_failed": problems,
        }
        return figures, problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long studies are uploaded (default 30)")
    ap.add_argument("--kill-every", type=float, default=5.0, help="minutes between worker SIGKILLs (default 5)")
    ap.add_argument("--redis-restart-at", type=float, default=0.5,
                    help="Redis is SIGKILLed and restarted at this fraction of the run (default 0.5; 0: never)")
    ap.add_argument("--redis-down-s", type=float, default=5.0, help="how long Redis stays down (default 5)")
    ap.add_argument("--redis-wipe", action="store_true", help="restart Redis without its files (data lost)")
    ap.add_argument("--interval-s", type=float, default=5.0, help="at most one upload per this many seconds")
    ap.add_argument("--max-in-flight", type=int, default=3, help="studies waiting for their result at once (bound)")
    ap.add_argument("--rest-fraction", type=float, default=0.5, help="share of studies sent over REST (rest: C-STORE)")
    ap.add_argument("--cycle-every", type=int, default=4, help="every Nth patient is a cycle (0: none)")
    ap.add_argument("--time-points", default="60,96,144", help="a cycle's time points, hours after administration")
    ap.add_argument("--quiet-s", type=float, default=2.0, help="the DICOM node's study quiet period")
    ap.add_argument("--poll-s", type=float, default=1.0, help="how often the client polls its studies' jobs")
    ap.add_argument("--upload-timeout-s", type=float, default=300.0, help="give up an upload after this long")
    ap.add_argument("--drain-timeout-s", type=float, default=1200.0, help="wait this long for the queue to drain")
    ap.add_argument("--seed", type=int, default=19, help="random choice of transport")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (kept anyway when a check fails)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    cache = Path(os.environ.get("SPECTDOSE_CACHE_DIR") or Path.home() / ".cache" / "spectdose")
    os.environ["SPECTDOSE_CACHE_DIR"] = str(cache)
    work = Path(tempfile.mkdtemp(prefix="spectdose-soak-"))
    work.chmod(0o755)  # serve started as root runs as an unprivileged user, who must reach its data folder
    soak = Soak(args, work, cache)
    try:
        soak.soak()
        figures, problems = soak.check()
    except Exception as exc:  # noqa: BLE001 - reported with where to look
        print(f"soak could not run: {type(exc).__name__}: {exc}; logs in {work}", file=sys.stderr)
        soak.close()
        return 2
    soak.close()
    print(json.dumps(figures, indent=2))
    print(
        f"\n{figures['studies']} studies ({figures['rest']} REST, {figures['dicom']} C-STORE; {figures['cycles']} "
        f"cycles) in {args.minutes:g} min on {os.cpu_count()} CPUs: {figures['studies_per_hour']} studies/h, status "
        f"p95 {figures['status_p95_ms']} ms ({figures['status_requests']} requests), worker kills survived "
        f"{figures['worker_kills_survived']}/{figures['worker_kills']} ({figures['worker_kills_mid_job']} mid-job), "
        f"Redis restarts survived {figures['redis_restarts_survived']}/{figures['redis_restarts']}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if problems:
        print(f"\nCHECKS FAILED ({len(problems)}); logs and data in {work}:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print("all checks passed: every study done once, every cycle result final")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

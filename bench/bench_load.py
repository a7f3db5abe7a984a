"""Load benchmark of the service: N studies pushed at once over DIMSE and REST.

Starts ``spectdose serve`` (gateway, DICOM node, one worker, its own Redis) in a temporary
folder, makes N copies of a small virtual patient with fresh UIDs (so none is a duplicate
of another), then at the same moment pushes half of them over C-STORE (pynetdicom SCU,
one association per study, results sent back to a C-STORE SCP run here) and uploads the
other half as zips to ``POST /studies``, while probe clients poll the gateway
(``GET /jobs/{id}``, ``GET /jobs``, ``GET /health``) the way dashboards and scripts do.

Prints studies/hour, the queue latency of the jobs (queued -> started; a DIMSE study is
queued once the node's quiet period has passed), the turnaround (push -> results done)
and the p50/p95 latency of the gateway's requests under that load.

    .venv/bin/python bench/bench_load.py --studies 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.config import DicomPeer  # noqa: E402
from service.demo import DemoPacs  # noqa: E402
from service.export import push_files  # noqa: E402
from service.localredis import free_port  # noqa: E402

BENCH_AET = "BENCH"


def phantom(cache: Path) -> Path:
    """The small virtual patient 8 imaged 96 h after administration (ideal camera), made once.

    Within the default time model's range (Hanscheid, 48-168 h): the seed-1 patient used before
    was imaged at 33 h, which the service now refuses by default, so every job failed. The 96 h
    time point of the cycle ``bench/soak.py`` uses (the same folder in the cache: made once for
    both); only its CT and SPECT are pushed, so jobs find automatic regions.
    """
    from spectdose.phantoms.cycle import generate_cycle

    folder = cache / "soak-cycle-seed8-60-96-144"
    if not (folder / "cycle.json").exists():
        print(f"writing the virtual patient (seed 8, small, 60/96/144 h) to {folder} ...", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        generate_cycle(folder, 8, "small", (60.0, 96.0, 144.0), truth_engine="dvk", kernel_cache_dir=cache / "kernels",
                       camera="ideal", seg="first")
    return folder / "tp096h" / "dicom"


def copy_with_new_uids(src: Path, dest: Path) -> list[Path]:
    mapping: dict[str, str] = {}
    out = []
    dest.mkdir(parents=True)
    for i, p in enumerate(sorted(src.rglob("*.dcm"))):
        ds = pydicom.dcmread(p)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if kw in ds:
                setattr(ds, kw, mapping.setdefault(str(getattr(ds, kw)), generate_uid()))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = dest / f"{i:05d}.dcm"
        ds.save_as(target)
        out.append(target)
    return out


def zipped(files: list[Path]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in files:
            zf.write(p, p.name)
    return buf.getvalue()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def parse_time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


def server_histograms(client: httpx.Client) -> dict[str, dict[float, float]]:
    """The gateway's own request-latency histogram (GET /metrics): cumulative counts by upper bound
    (s), per "METHOD route". It times each request inside the service, without this benchmark's client
    threads, which share the same 2 cores and interpreter lock with the pushers and the result SCP."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name != "spectdose_http_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                key = f"{sample.labels['method']} {sample.labels['route']}"
                out.setdefault(key, {})[float(sample.labels["le"])] = sample.value
    return out


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The q-quantile (0-1) of the requests counted between two scrapes, linear within a bucket
    (as Prometheus' histogram_quantile); the last finite bound when it falls in the +Inf bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = bound, cumulative
    return lower


class Latencies:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_kind: dict[str, list[float]] = {}

    def add(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.by_kind.setdefault(kind, []).append(seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=8, help="studies pushed at once (half DIMSE, half REST)")
    ap.add_argument("--rest-fraction", type=float, default=0.5)
    ap.add_argument("--probes", type=int, default=4, help="concurrent clients polling the gateway")
    ap.add_argument("--quiet-s", type=float, default=2.0, help="the node's study quiet period")
    ap.add_argument("--timeout-s", type=float, default=3600)
    ap.add_argument("--concurrency", type=int, default=None,
                    help="jobs at once in the worker (SPECTDOSE_WORKER_CONCURRENCY; default: the service's)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    cache = Path(os.environ.get("SPECTDOSE_CACHE_DIR") or Path.home() / ".cache" / "spectdose")
    os.environ["SPECTDOSE_CACHE_DIR"] = str(cache)
    source = phantom(cache)
    work = Path(tempfile.mkdtemp(prefix="spectdose-bench-"))
    n_rest = round(args.studies * args.rest_fraction)
    n_dimse = args.studies - n_rest
    print(f"preparing {args.studies} copies with fresh UIDs ({n_dimse} DIMSE, {n_rest} REST) in {work} ...", flush=True)
    studies = [copy_with_new_uids(source, work / "studies" / f"s{i:03d}") for i in range(args.studies + 1)]
    warmup, studies = studies[0], studies[1:]
    bodies = [zipped(s) for s in studies[:n_rest]]

    pacs = DemoPacs(work / "returned").start()
    http_port, dicom_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http_port}"
    env = {k: v for k, v in os.environ.items() if k != "SPECTDOSE_API_TOKENS"}
    if args.concurrency:
        env["SPECTDOSE_WORKER_CONCURRENCY"] = str(args.concurrency)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--data-dir", str(work / "data"), "--http-port",
           str(http_port), "--dicom-port", str(dicom_port), "--redis-url", f"redis://127.0.0.1:{free_port()}/0",
           "--quiet-s", str(args.quiet_s), "--peer", f"{BENCH_AET}@127.0.0.1:{pacs.port}", "--log-level", "WARNING"]
    log = open(work / "serve.log", "w")  # noqa: SIM115 - closed at the end
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=url, timeout=120)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"serve did not come up; see {work / 'serve.log'}")
            time.sleep(0.3)
        print("warm-up job (kernel cache, worker imports) ...", flush=True)
        warm = client.post("/studies", content=zipped(warmup), headers={"Content-Type": "application/zip"}).json()
        while client.get(f"/jobs/{warm['job_id']}").json()["state"] not in ("done", "failed"):
            time.sleep(0.5)

        lat = Latencies()
        job_ids: list[str] = []
        ids_lock = threading.Lock()
        done = threading.Event()
        push_times: list[float] = []

        def rest_upload(body: bytes) -> None:
            t = time.perf_counter()
            r = client.post("/studies", content=body, headers={"Content-Type": "application/zip"})
            lat.add("POST /studies", time.perf_counter() - t)
            r.raise_for_status()
            with ids_lock:
                job_ids.append(r.json()["job_id"])

        def dimse_push(files: list[Path]) -> None:
            t = time.perf_counter()
            push_files(DicomPeer("SPECTDOSE", "127.0.0.1", dicom_port), files, calling_aet=BENCH_AET)
            push_times.append(time.perf_counter() - t)

        def probe() -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                while not done.is_set():
                    with ids_lock:
                        known = list(job_ids)
                    choice = random.random()
                    if known and choice < 0.6:
                        kind, path = "GET /jobs/{id}", f"/jobs/{random.choice(known)}"
                    elif choice < 0.85:
                        kind, path = "GET /jobs", "/jobs?limit=50"
                    else:
                        kind, path = "GET /health", "/health"
                    t = time.perf_counter()
                    c.get(path).raise_for_status()
                    lat.add(kind, time.perf_counter() - t)
                    time.sleep(0.05)

        scraped_before = server_histograms(client)
        probes = [threading.Thread(target=probe, daemon=True) for _ in range(args.probes)]
        for t in probes:
            t.start()
        print(f"pushing {args.studies} studies at once ...", flush=True)
        t0 = time.time()
        pushers = [threading.Thread(target=rest_upload, args=(b,)) for b in bodies]
        pushers += [threading.Thread(target=dimse_push, args=(s,)) for s in studies[n_rest:]]
        for t in pushers:
            t.start()
        for t in pushers:
            t.join()
        t_pushed = time.time()
        deadline = time.monotonic() + args.timeout_s
        while time.monotonic() < deadline:
            listing = client.get("/jobs", params={"limit": 1000}).json()["jobs"]
            jobs = [j for j in listing if j["job_id"] != warm["job_id"]]
            if len(jobs) == args.studies and all(j["state"] in ("done", "failed") for j in jobs):
                break
            time.sleep(1.0)
        else:
            raise SystemExit("timed out waiting for the jobs")
        done.set()
        for t in probes:
            t.join(timeout=5)
        scraped_after = server_histograms(client)
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        pacs.stop()
        log.close()

    failed = [j for j in jobs if j["state"] != "done"]
    finished = [parse_time(j["finished_at"]) for j in jobs]
    started = [parse_time(j["started_at"]) for j in jobs if j["started_at"]]
    queue_s = [(parse_time(j["started_at"]) - parse_time(j["queued_at"])).total_seconds()
               for j in jobs if j["started_at"] and j["queued_at"]]
    run_s = [(parse_time(j["finished_at"]) - parse_time(j["started_at"])).total_seconds() for j in jobs if j["started_at"]]
    first = dt.datetime.fromtimestamp(t0, dt.UTC).replace(tzinfo=None)
    turnaround_s = [(f - first).total_seconds() for f in finished]
    wall_s = (max(finished) - first).total_seconds()
    gets = [v for k, vs in lat.by_kind.items() if k.startswith("GET") for v in vs]
    figures = {
        "machine_cpus": os.cpu_count(),
        "worker_concurrency": args.concurrency or "default",
        "studies": args.studies,
        "dimse": n_dimse,
        "rest": n_rest,
        "failed": len(failed),
        "wall_s": round(wall_s, 1),
        "studies_per_hour": round(args.studies / wall_s * 3600, 1),
        "push_s": round(t_pushed - t0, 2),
        "dimse_push_s_mean": round(float(np.mean(push_times)), 2) if push_times else None,
        "job_run_s_mean": round(float(np.mean(run_s)), 2),
        "queue_latency_s_p50": round(pct(queue_s, 50), 1),
        "queue_latency_s_p95": round(pct(queue_s, 95), 1),
        "queue_latency_s_max": round(max(queue_s), 1),
        "turnaround_s_p50": round(pct(turnaround_s, 50), 1),
        "turnaround_s_p95": round(pct(turnaround_s, 95), 1),
        "gateway_get_requests": len(gets),
        "gateway_get_p50_ms": round(1000 * pct(gets, 50), 1),
        "gateway_get_p95_ms": round(1000 * pct(gets, 95), 1),
        "post_studies_p50_ms": round(1000 * pct(lat.by_kind.get("POST /studies", []), 50), 1),
        "post_studies_p95_ms": round(1000 * pct(lat.by_kind.get("POST /studies", []), 95), 1),
        "per_route_p95_ms": {k: round(1000 * pct(v, 95), 1) for k, v in sorted(lat.by_kind.items())},
        # Inside the service (its /metrics histogram, interpolated within buckets), this run's requests only.
        "server_p95_ms": {k: round(1000 * histogram_quantile(scraped_before.get(k, {}), h, 0.95), 1)
                          for k, h in sorted(scraped_after.items())
                          if k.startswith(("GET /jobs", "GET /health", "POST /studies"))},
        "results_returned_over_dimse": len(pacs.received),
        "first_start_after_push_s": round((min(started) - first).total_seconds(), 1) if started else None,
    }
    print(json.dumps(figures, indent=2))
    print(
        f"\n{args.studies} studies ({n_dimse} DIMSE + {n_rest} REST) on {os.cpu_count()} CPUs, one worker "
        f"(concurrency {figures['worker_concurrency']}): "
        f"{figures['studies_per_hour']} studies/hour; queue latency p50 {figures['queue_latency_s_p50']} s, "
        f"p95 {figures['queue_latency_s_p95']} s; gateway GET p95 {figures['gateway_get_p95_ms']} ms "
        f"({len(gets)} requests), POST /studies p95 {figures['post_studies_p95_ms']} ms; inside the service: "
        + ", ".join(f"{k} p95 {v} ms" for k, v in figures["server_p95_ms"].items())
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The whole job a clinic waits for, on a clinical-size study: seconds, peak memory, bytes out.

Usage: python bench/bench_job.py [--study DIR] [--seed 101] [--cnn] [--service]

`bench_dvk.py` times the DVK path alone; a clinic waits for ingest, dose, regions, report and
export. Each run here is a separate process so its peak RSS is its own (``os.wait4``):

- ``dvk alone``: ingest, activity and density on the CT grid, convolution (the reference the
  ratios are taken against, measured in the same run since the machine is shared);
- ``dvk job``: ``spectdose dose STUDY -o OUT`` with the defaults (automatic regions, report);
- ``cnn job`` (``--cnn``): the same with ``--method cnn --uncertainty`` (``--model W``: the
  weights W and the ensemble ``W_ensemble.pt`` beside them, e.g. copies of a new network to
  time an ensemble of its architecture before one is trained: the cost does not depend on the
  weights);
- ``service`` (``--service``): ``spectdose serve`` on loopback, the study zipped to
  ``POST /studies``, polled to done, RT Dose fetched; the worker's peak RSS from /proc.

Prints wall and CPU seconds, peak RSS, the stages of ``summary.json`` and the size of every
output object. Targets (issue 20): DVK job <= 12 s wall and <= 2.5 GB on 2 free cores,
regions + report <= 3 s, every output object <= 25 MB as sent to a receiver that takes a lossless
compressed syntax (each object's size on disk and in its best syntax are both printed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECTDOSE = [sys.executable, "-m", "spectdose.cli"]


def clinical_study(seed: int) -> Path:
    """The clinical-size virtual patient bench_dvk.py uses, generated once under bench/.data/."""
    base = ROOT / "bench" / ".data" / f"clinical-{seed}"
    if not (base / "dicom").is_dir():
        from spectdose.phantoms import generate

        print(f"generating clinical virtual patient seed {seed} into {base} (once) ...", flush=True)
        generate(base, seed, size="clinical")
    return base / "dicom"


def run_measured(cmd: list[str], **kw) -> dict:
    """Wall seconds, CPU seconds (user + sys) and peak RSS (MiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024.0,
            "stdout": out}


def dvk_alone_child(study: Path) -> None:
    """Child mode: the DVK path alone (kernel from the cache), stages printed as JSON."""
    from spectdose.dicom.ingest import load_study
    from spectdose.dose import dvk_dose_rate
    from spectdose.kernels import get_kernel
    from spectdose.paths import default_cache_dir
    from spectdose.pipeline import prepare_inputs

    t0 = time.perf_counter()
    loaded = load_study(study)
    prepared = prepare_inputs(loaded)
    grid = loaded.ct.grid
    kernel = get_kernel(grid.spacing_mm, cache_dir=default_cache_dir() / "kernels")
    dvk_dose_rate(prepared.activity_bq_per_ml.array, prepared.density_g_cm3.array, kernel.total_mgy_per_mbq_s,
                  grid.voxel_volume_ml)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def output_sizes(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_size / 1e6 for p in sorted(folder.iterdir()) if p.is_file()}


def sent_sizes(folder: Path) -> dict[str, tuple[float, str]]:
    """Each DICOM output's size (MB) in the best lossless syntax it can be sent in, and that syntax's
    name: what a PACS that accepts it gets over C-STORE, STOW-RS or a REST download that asks for it
    (spectdose.dicom.transfer; a receiver that accepts none gets the file as stored)."""
    import pydicom

    sys.path.insert(0, str(ROOT))
    from spectdose.dicom.transfer import encode_for, syntaxes_for

    out = {}
    for p in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(p)
        syntax = syntaxes_for(ds)[0]
        buf = io.BytesIO()
        encode_for(ds, syntax).save_as(buf, enforce_file_format=True)
        out[p.name] = (buf.tell() / 1e6, pydicom.uid.UID(syntax).name)
    return out


def cli_job(study: Path, out: Path, extra: list[str]) -> dict:
    figures = run_measured([*SPECTDOSE, "dose", str(study), "-o", str(out), *extra])
    summary = json.loads((out / "summary.json").read_text())
    figures["stages_s"] = summary.get("timings_s", {})
    figures["outputs_mb"] = output_sizes(out)
    figures["sent_mb"] = sent_sizes(out)
    return figures


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
                found.extend(int(c) for c in children)
        except OSError:
            continue
    return found


def vm_hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def service_job(study: Path, work: Path) -> dict:
    """POST /studies -> done -> GET rtdose, on `spectdose serve` (loopback, its own Redis)."""
    import httpx

    sys.path.insert(0, str(ROOT))
    from service.localredis import free_port

    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SPECTDOSE_API_TOKENS"}
    cmd = [sys.executable, "-m", "service.cli", "serve", "--data-dir", str(work / "data"), "--http-port",
           str(http_port), "--dicom-port", str(free_port()), "--redis-url", f"redis://127.0.0.1:{free_port()}/0",
           "--log-level", "WARNING"]
    log = open(work / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=300)
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(study.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(study))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"serve did not come up; see {work / 'serve.log'}")
            time.sleep(0.3)
        t0 = time.perf_counter()
        r = client.post("/studies", content=body.getvalue(), headers={"Content-Type": "application/zip"})
        r.raise_for_status()
        job_id = r.json()["job_id"]
        peak = 0.0
        while True:
            state = client.get(f"/jobs/{job_id}").json()
            peak = max([peak, *(vm_hwm_mib(p) for p in descendants(proc.pid))])
            if state["state"] in ("done", "failed"):
                break
            time.sleep(0.25)
        done_s = time.perf_counter() - t0
        if state["state"] != "done":
            raise SystemExit(f"service job failed: {state.get('error') or state}")
        rtdose = client.get(f"/jobs/{job_id}/rtdose")
        rtdose.raise_for_status()
        wall_s = time.perf_counter() - t0
        # The same object as a client that takes JPEG-LS asks for it (PS3.18 transfer-syntax parameter).
        jpegls = client.get(f"/jobs/{job_id}/rtdose",
                            headers={"Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.80"})
        jpegls.raise_for_status()
        return {"wall_s": wall_s, "to_done_s": done_s, "peak_mib": peak,
                "upload_mb": len(body.getvalue()) / 1e6, "rtdose_mb": len(rtdose.content) / 1e6,
                "rtdose_jpegls_mb": len(jpegls.content) / 1e6}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def report(name: str, fig: dict, ref_s: float) -> None:
    print(f"\n{name}: wall {fig['wall_s']:.1f} s ({fig['wall_s'] / ref_s:.1f}x DVK alone), "
          f"CPU {fig.get('cpu_s', float('nan')):.1f} s, peak {fig['peak_mib']:.0f} MiB")
    stages = fig.get("stages_s") or {}
    if stages:
        print("  stages: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    sent = fig.get("sent_mb") or {}
    print(f"  {'object':<28}{'on disk':>12}   sent in its best lossless syntax")
    for k, v in (fig.get("outputs_mb") or {}).items():
        flag = "  > 25 MB" if v > 25 else ""
        line = f"  {k:<28}{v:>9.1f} MB{flag:<9}"
        if k in sent:
            mb, syntax = sent[k]
            line += f"{mb:>7.1f} MB ({syntax}){'  > 25 MB' if mb > 25 else ''}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", type=Path, help="a DICOM study folder (default: the clinical phantom)")
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--cnn", action="store_true", help="also the CNN job with its uncertainty")
    ap.add_argument("--model", type=Path,
                    help="--cnn: these weights (and <stem>_ensemble.pt beside them) instead of models/dblurdosenet.pt")
    ap.add_argument("--service", action="store_true", help="also the service path (REST in, RT Dose out)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--_dvk-alone", dest="dvk_alone", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dvk_alone:
        dvk_alone_child(args.dvk_alone)
        return

    study = args.study or clinical_study(args.seed)
    print(f"cores: {os.cpu_count()}, study: {study}", flush=True)
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="spectdose-benchjob-") as tmp:
        work = Path(tmp)
        print("warm-up (kernel cache, imports) ...", flush=True)
        cli_job(study, work / "warm", [])
        shutil.rmtree(work / "warm")
        alone = run_measured([sys.executable, str(Path(__file__).resolve()), "--_dvk-alone", str(study)])
        alone["path_s"] = json.loads(alone["stdout"].strip().splitlines()[-1])["seconds"]
        figures["dvk alone"] = alone
        figures["dvk job"] = cli_job(study, work / "dvk", [])
        if args.cnn:
            model = ["--model", str(args.model)] if args.model else []
            figures["cnn job"] = cli_job(study, work / "cnn", ["--method", "cnn", "--uncertainty", *model])
        if args.service:
            figures["service (dvk)"] = service_job(study, work)

    ref = figures["dvk alone"]["wall_s"]
    print(f"\ndvk alone: wall {ref:.1f} s (DVK path {figures['dvk alone']['path_s']:.1f} s after imports), "
          f"CPU {figures['dvk alone']['cpu_s']:.1f} s, peak {figures['dvk alone']['peak_mib']:.0f} MiB")
    for name in ("dvk job", "cnn job"):
        if name in figures:
            report(name, figures[name], ref)
    dvk = figures["dvk job"]["stages_s"]
    after_dose = sum(v for k, v in dvk.items() if k.startswith(("region", "report")))
    print(f"\nregions + report (dvk job): {after_dose:.1f} s (target <= 3 s)")
    if "service (dvk)" in figures:
        s = figures["service (dvk)"]
        print(f"service (dvk): upload to done {s['to_done_s']:.1f} s ({s['to_done_s'] / ref:.1f}x DVK alone), "
              f"with the RT Dose fetched {s['wall_s']:.1f} s; worker peak {s['peak_mib']:.0f} MiB; "
              f"upload {s['upload_mb']:.0f} MB, RT Dose {s['rtdose_mb']:.1f} MB as stored, "
              f"{s['rtdose_jpegls_mb']:.1f} MB asked for in JPEG-LS")
    if args.json:
        for f in figures.values():
            f.pop("stdout", None)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

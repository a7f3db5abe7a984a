"""One stint of the DblurDoseNet training campaign on a lent GPU machine (issue 17).

The same stint as ``spectdose train --campaign DIR`` (same ledger, seeds, validation patients,
install rule), with training and the patients' projection and OSEM on the GPU. It imports
only what the campaign needs, not the CLI (whose DICOM and service packages the GPU
machine's image lacks); ``scripts/device_stint.sh`` installs the carried wheels and runs it.

    python3 scripts/device_stint.py [--campaign models/campaign] [--minutes 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--campaign", type=Path, default=ROOT / "models" / "campaign")
    parser.add_argument("--minutes", type=float, default=8.0, help="the whole stint, validation patients and scoring included")
    parser.add_argument("--device", default="cuda", help="torch device of training and generation")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--kernel-cache", type=Path, default=Path("/tmp/spectdose-kernels"))
    parser.add_argument("--end-reserve-minutes", type=float, default=1.5,
                        help="training stops this long before the end, for scoring, snapshots and the ensemble "
                             "(config.json's is sized for a CPU)")
    parser.add_argument("--max-steps", type=int, help="stop after this many training steps (a smoke run)")
    args = parser.parse_args(argv)

    import torch

    from spectdose.learning.campaign import run_stint

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run `spectdose train --campaign` on the CPU instead", file=sys.stderr)
        return 2
    t0 = time.time()
    record = run_stint(args.campaign, deadline=t0 + 60.0 * args.minutes, kernel_cache=args.kernel_cache, threads=args.threads,
                       device=args.device, generate_device=args.device, max_steps=args.max_steps,
                       end_reserve_minutes=args.end_reserve_minutes,
                       progress=lambda m: print(f"[{time.time() - t0:6.0f} s] {m}", flush=True))  # fmt: skip
    print(f"stint {record['stint']}: {record.get('end')}; {record.get('pixel_passes', 0):.3g} pixel passes, "
          f"{len(record.get('seeds', []))} patients, score {(record.get('val') or {}).get('score')}")  # fmt: skip
    return 0 if record.get("end") == "done" or str(record.get("end", "")).startswith("stopped") else 1


if __name__ == "__main__":
    raise SystemExit(main())

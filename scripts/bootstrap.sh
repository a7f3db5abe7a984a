#!/usr/bin/env bash
# Create .venv with the project installed, and the Debian tools a mode needs.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

# Debian packages by need: --service-tools (a local Redis for `spectdose serve`) or
# --test-tools (everything the test suite talks to).
pairs=()
case "${1:-}" in
  --service-tools) pairs=(redis-server:/usr/bin/redis-server) ;;
  --test-tools) pairs=(dcmtk:/usr/bin/dcmdump dicom3tools:/usr/bin/dciodvfy plastimatch:/usr/bin/plastimatch
                       orthanc:/usr/sbin/Orthanc redis-server:/usr/bin/redis-server postgresql:/usr/bin/pg_ctlcluster
                       chromium:/usr/bin/chromium chromium-driver:/usr/bin/chromedriver) ;;
esac
need=()
for pair in "${pairs[@]}"; do
  [[ -x "${pair#*:}" ]] || need+=("${pair%%:*}")
done
if (( ${#need[@]} )); then
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  echo "bootstrap: installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

stamp=.venv/.installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned to the CPU build on disk; an unpinned torch pulls a multi-GB CUDA build.
  # [service]: the gateway, DICOM node and worker (the core alone needs only the base install).
  .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[service,dev]"
  touch "$stamp"
fi

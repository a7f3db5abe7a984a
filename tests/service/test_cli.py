"""The service commands keep the interface other tools rely on, and plug into `spectdose`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from service.cli import add_gateway, add_node, add_serve, add_worker, build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_serve_takes_the_documented_options():
    args = build_parser().parse_args([
        "serve", "--http-port", "8080", "--dicom-port", "11112", "--ae-title", "DOSE", "--data-dir", "/srv/d",
        "--export", "PACS@10.0.0.1:104", "--export", "ARCHIVE@10.0.0.2:11112",
    ])
    assert (args.http_port, args.dicom_port, args.ae_title, args.data_dir) == (8080, 11112, "DOSE", Path("/srv/d"))
    assert args.export == ["PACS@10.0.0.1:104", "ARCHIVE@10.0.0.2:11112"]


def test_entry_point_callables_add_subcommands_to_spectdose():
    """What spectdose.cli does with each `spectdose.commands` entry point."""
    parser = argparse.ArgumentParser(prog="spectdose")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_serve, add_gateway, add_node, add_worker):
        add(sub)
    for name in ("serve", "gateway", "node", "worker"):
        assert callable(parser.parse_args([name]).func)


def test_python_dash_m_reports_bad_settings_with_status_2(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SPECTDOSE_DATA_DIR": str(tmp_path)}  # production, no tokens
    r = subprocess.run([sys.executable, "-m", "service.cli", "gateway"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "SPECTDOSE_API_TOKENS is empty" in r.stderr and "Traceback" not in r.stderr

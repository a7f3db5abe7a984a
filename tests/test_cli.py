"""The `spectdose` command as a user runs it: exit codes and messages, not tracebacks."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest

from spectdose.cli import main


def _run(args, env_cache):
    return subprocess.run(
        [sys.executable, "-m", "spectdose.cli", *args], capture_output=True, text=True, env={**env_cache}, timeout=600
    )


@pytest.fixture()
def env(tmp_path, _session_kernel_cache):
    import os

    return {**os.environ, "SPECTDOSE_CACHE_DIR": str(_session_kernel_cache)}


def test_dose_on_a_zip_of_the_study(small_study, env, tmp_path):
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((small_study / "dicom").rglob("*.dcm"), reverse=True):
            zf.write(f, f"export/{f.parent.name}/{f.name}")
    proc = _run(["dose", str(archive), "-o", str(tmp_path / "out")], env)
    assert proc.returncode == 0, proc.stderr
    assert "Absorbed dose" in proc.stdout
    assert (tmp_path / "out" / "rtdose.dcm").is_file() and (tmp_path / "out" / "doserate_pm.dcm").is_file()


@pytest.mark.parametrize(
    "setup,needle",
    [
        ("empty", "no DICOM"),
        ("ct_only", "SPECT"),
        ("nm_only", "CT"),
        ("garbage", "no DICOM"),
    ],
)
def test_bad_studies_exit_2_with_a_message(small_study, env, tmp_path, setup, needle):
    study = tmp_path / "study"
    study.mkdir()
    if setup in ("ct_only", "nm_only"):
        import shutil

        sub = "CT" if setup == "ct_only" else "NM"
        shutil.copytree(small_study / "dicom" / sub, study / sub)
    if setup == "garbage":
        (study / "notes.txt").write_text("not dicom")
        (study / "image.dcm").write_bytes(b"\x00" * 64)
    proc = _run(["dose", str(study), "-o", str(tmp_path / "out")], env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error:" in proc.stderr and needle.lower() in proc.stderr.lower()
    assert "Traceback" not in proc.stderr


def test_truncated_spect_is_refused_with_the_file_named(small_study, env, tmp_path):
    import shutil

    study = tmp_path / "study"
    shutil.copytree(small_study / "dicom", study)
    nm = next((study / "NM").glob("*.dcm"))
    data = nm.read_bytes()
    nm.write_bytes(data[: len(data) // 2])
    proc = _run(["dose", str(study), "-o", str(tmp_path / "out")], env)
    assert proc.returncode == 2
    assert nm.name in proc.stderr
    assert "Traceback" not in proc.stderr


def test_kernel_command_writes_the_total_kernel(tmp_path, _session_kernel_cache, monkeypatch, capsys):
    monkeypatch.setenv("SPECTDOSE_CACHE_DIR", str(_session_kernel_cache))
    out = tmp_path / "k.npy"
    assert main(["kernel", "--nuclide", "Lu-177", "--voxel-mm", "4.8", "4.8", "4.8", "-o", str(out)]) == 0
    k = np.load(out)
    assert k.dtype == np.float32 and k.ndim == 3 and all(n % 2 == 1 for n in k.shape)
    c = tuple(n // 2 for n in k.shape)
    assert k[c] == k.max()
    # 4.8 mm soft-tissue self S-value with all electrons: Lanconelli's beta-only 3/6 mm values bracket it.
    assert 0.0925 < k[c] < 0.693


def test_kernel_command_refuses_an_unknown_nuclide(tmp_path, capsys):
    assert main(["kernel", "--nuclide", "I-131", "--voxel-mm", "4", "4", "4", "-o", str(tmp_path / "k.npy")]) == 2
    assert "unknown nuclide" in capsys.readouterr().err


def test_effective_model_without_half_life_is_refused(small_study, capsys, tmp_path):
    code = main(["dose", str(small_study / "dicom"), "-o", str(tmp_path), "--time-model", "effective"])
    assert code == 2
    assert "half-life" in capsys.readouterr().err

"""The `spectdose` command as a user runs it: exit codes and messages, not tracebacks."""

from __future__ import annotations

import json
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


# ----------------------------------------------------------------------------- exit codes, flags, progress


def _tiny_study(root, **nm_kw):
    """A small synthetic study (tests/dicom_factory.py) 72 h after administration."""
    from . import dicom_factory as f

    study = f.StudyIds(**nm_kw.pop("ids", {}))
    f.write_ct_series(root / "CT", study, f.smooth_hu((16, 20, 24)), origin_mm=(-30, -20, -40), spacing_mm=(5.0, 2.0, 2.5))
    kw = {"spacing_mm": (4.0, 4.0, 4.0), "first_voxel_mm": (-22, -18, -14), "rwvm": (2.5, 0.0), "admin_datetime": "20240302093000"}
    f.write_nm_recon(root / "NM" / "nm.dcm", study, f.blob_counts((8, 10, 12)), **{**kw, **nm_kw})
    return root


def test_version(capsys):
    from spectdose import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"spectdose {__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["dose", "study"],  # no -o
        ["dose", "study", "-o", "out", "--no-such-flag"],
        ["dose", "study", "-o", "out", "--accept", "guess_everything"],
        ["dose", "study", "-o", "out", "--energy-window", "high"],
        ["dose", "study", "-o", "out", "--acquisition-time", "yesterday"],
    ],
)
def test_usage_errors_exit_64_not_2(argv, capsys):
    """sysexits EX_USAGE: a wrong command line is not a refused input (exit 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 64
    assert "error:" in capsys.readouterr().err


def test_output_path_that_is_a_file_exits_2_with_a_message(tmp_path, capsys):
    target = tmp_path / "taken.txt"
    target.write_text("x")
    assert main(["dose", str(tmp_path), "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is an existing file" in err and "internal error" not in err
    assert main(["dose", str(tmp_path), "-o", str(target / "sub")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_internal_errors_exit_70(tmp_path, monkeypatch, capsys):
    import spectdose.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(spectdose.pipeline, "run", broken)
    assert main(["dose", str(tmp_path), "-o", str(tmp_path / "out")]) == 70
    assert "internal error (RuntimeError: a bug)" in capsys.readouterr().err


def test_every_dose_option_has_a_flag_named_as_its_public_name(tmp_path):
    from spectdose.cli import _dose_options, build_parser
    from spectdose.pipeline import PUBLIC_NAMES

    parser = build_parser()
    dose = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "dose")[1]
    flags = {s for action in dose._actions for s in action.option_strings}
    for field, name in PUBLIC_NAMES.items():
        if field != "calling_ae_title":  # set by the DICOM node, not by a user
            assert "--" + name.replace("_", "-") in flags, field
    args = parser.parse_args(
        ["dose", "s", "-o", "o", "--acquisition-time", "2024-03-05T09:30", "--administration-time", "2024-03-02T09:30",
         "--energy-window", "208", "--dose-grid", "3", "--accept", "time_outside_model_range",
         "--accept", "administration_date_from_acquisition", "--method", "cnn", "--bf16", "--normalised"]  # fmt: skip
    )
    options = _dose_options(args)
    assert options.acquisition_datetime.isoformat() == "2024-03-05T09:30:00"
    assert options.administration_datetime.isoformat() == "2024-03-02T09:30:00"
    assert options.energy_window_kev == 208.0 and options.dose_grid == "3"
    assert options.accepted_assumptions == ("administration_date_from_acquisition", "time_outside_model_range")
    assert options.method == "cnn" and options.autocast_bf16 and options.allow_normalised
    defaults = _dose_options(parser.parse_args(["dose", "s", "-o", "o"]))
    assert defaults.method == "dvk" and defaults.time_model == "hanscheid" and defaults.dose_grid == "ct"


def test_progress_on_stderr_without_verbose_and_summary_on_stdout(tmp_path, kernel_cache_dir, capsys):
    study = _tiny_study(tmp_path / "study")
    assert main(["dose", str(study), "-o", str(tmp_path / "out"), "--kernel-cache", str(kernel_cache_dir)]) == 0
    out, err = capsys.readouterr()
    assert "spectdose:  35% dose_rate" in err and "100% done" in err
    assert "spectdose:" not in out and "Absorbed dose" in out  # stdout: the summary only
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["method"] == "dvk"
    # -v after the command name is accepted too (issue 7: it had to come first)
    assert main(["dose", str(study), "-o", str(tmp_path / "out2"), "-v", "--kernel-cache", str(kernel_cache_dir)]) == 0


def test_deidentified_study_names_the_missing_acquisition_date_then_takes_the_hours(tmp_path, kernel_cache_dir, capsys):
    """Issue 7 item 3: with blank dates the message names the acquisition date and the flags that supply it."""
    study = _tiny_study(
        tmp_path / "study", ids={"study_date": "", "study_time": ""}, admin_datetime=None,
        admin_time_only="093000", acquisition=("", "093000"),
    )  # fmt: skip
    common = ["--kernel-cache", str(kernel_cache_dir)]
    assert main(["dose", str(study), "-o", str(tmp_path / "a"), "--administration-time", "2024-03-02T09:30", *common]) == 2
    err = capsys.readouterr().err
    assert "acquisition date is unknown" in err and "--acquisition-time (CLI) / acquisition_time (REST)" in err
    assert "--hours-after-administration" in err and not (tmp_path / "a" / "rtdose.dcm").exists()
    assert main(["dose", str(study), "-o", str(tmp_path / "b"), "--hours-after-administration", "72", *common]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["time"]["hours_since_administration"] == 72.0
    assert summary["time"]["source"] == "hours after administration given"

"""Issue 10: zero activity in -> zero dose (and zero uncertainty) out, when the site says so.

A SPECT without activity is refused by default (issue 8: never a silent 0 Gy RT Dose); the
assumption ``no_activity_gives_zero_dose`` (a blank or QA acquisition) lets it through, and
then every output is exactly zero and says why. A broken header is refused either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from spectdose.cli import main
from spectdose.dicom.export import read_dose_rate_map, read_rtdose
from spectdose.dicom.ingest import load_study
from spectdose.errors import InputError
from spectdose.pipeline import ASSUMPTIONS

from . import dicom_factory as f
from .dicom_factory import copy_with_zero_activity
from .tiny_models import install_tiny_cnn

NAME = "no_activity_gives_zero_dose"
ACCEPT = ("--accept", NAME)
NM_SHAPE = (8, 10, 12)


def _small_ingest_study(
    root: Path, stored: np.ndarray, rwvm: tuple[float, float] | None = (2.5, 0.0)
) -> Path:
    """A CT and a multi-frame NM reconstruction on small grids (ingest only, no dose)."""
    study = f.StudyIds()
    f.write_ct_series(
        root / "CT",
        study,
        f.smooth_hu((16, 20, 24)),
        origin_mm=(-30.0, -20.0, -40.0),
        spacing_mm=(5.0, 2.0, 2.5),
    )
    f.write_nm_recon(
        root / "NM" / "nm.dcm",
        study,
        stored,
        spacing_mm=(4.0, 4.0, 4.0),
        first_voxel_mm=(-22.0, -18.0, -14.0),
        rwvm=rwvm,
    )
    return root


# ----------------------------------------------------------------------------- ingest


def test_the_assumption_is_known_to_every_entry_point():
    assert NAME in ASSUMPTIONS and "all-zero dose" in ASSUMPTIONS[NAME]


@pytest.mark.parametrize(
    ("stored", "rwvm", "why"),
    [
        (np.zeros(NM_SHAPE, np.uint16), (2.5, 0.0), "the pixel data are all zero"),
        # stored values that the header's scaling maps to exactly 0 Bq/ml everywhere
        (
            np.full(NM_SHAPE, 40, np.uint16),
            (2.5, -100.0),
            "every voxel is zero after the header's scaling",
        ),
    ],
    ids=["zero-pixels", "zero-after-scaling"],
)
def test_no_activity_is_refused_naming_the_flag_or_accepted_as_zero(tmp_path, stored, rwvm, why):
    root = _small_ingest_study(tmp_path, stored, rwvm)
    with pytest.raises(InputError, match=why) as refused:
        load_study(root)
    assert f"--accept {NAME} (CLI)" in str(refused.value) and f"accept={NAME} (REST)" in str(
        refused.value
    )
    study = load_study(root, accepted_assumptions=(NAME,))
    assert (
        study.spect.units == "Bq/ml"
        and study.spect.array.shape == NM_SHAPE
        and not np.any(study.spect.array)
    )
    noted = [w for w in study.warnings if f"accepted as no activity by {NAME}" in w]
    assert len(noted) == 1 and why in noted[0] and noted[0].startswith(f"ASSUMED ({NAME})")


@pytest.mark.parametrize(
    ("stored", "rwvm", "refusal"),
    [
        (f.blob_counts(NM_SHAPE), (0.0, 5.0), "slope 0 in every slice"),
        (
            f.blob_counts(NM_SHAPE),
            (2.5, -1e5),
            "no voxel holds positive activity.*negative values beyond noise",
        ),
        (
            np.zeros(NM_SHAPE, np.uint16),
            (2.5, 5.0),
            r"all zero but the value scaling .* adds a non-zero intercept",
        ),
        (f.blob_counts(NM_SHAPE), (2.5, -1000.0), "negative values beyond noise.*Intercept"),
    ],
    ids=["slope-0", "all-negative", "zero-pixels-with-intercept", "negative-beyond-noise"],
)
def test_a_broken_header_is_refused_even_with_the_assumption(tmp_path, stored, rwvm, refusal):
    """The assumption covers an image without activity, never a scaling that cannot describe one."""
    root = _small_ingest_study(tmp_path, stored, rwvm)
    with pytest.raises(InputError, match=refusal):
        load_study(root, accepted_assumptions=(NAME,))


# ----------------------------------------------------------------------------- the pipeline, through the CLI


@pytest.fixture(scope="module")
def zero_study(small_study, tmp_path_factory) -> Path:
    return copy_with_zero_activity(small_study / "dicom", tmp_path_factory.mktemp("zero") / "dicom")


def _assert_all_zero_outputs(out: Path, *, sigma: bool) -> dict:
    """RT Dose, dose-rate map (and its sigma map) exactly zero; the summary says zero and why."""
    summary = json.loads((out / "summary.json").read_text())
    dose, rate = read_rtdose(out / "rtdose.dcm"), read_dose_rate_map(out / "doserate_pm.dcm")
    assert dose.array.size and not np.any(dose.array) and dose.units == "Gy"
    assert rate.array.size and not np.any(rate.array)
    assert float(pydicom.dcmread(out / "rtdose.dcm", stop_before_pixels=True).DoseGridScaling) > 0
    assert summary["dose"] == {"max_gy": 0.0, "mean_in_tissue_gy": 0.0}
    assert (
        summary["dose_rate"]["max_mgy_per_h"] == 0.0
        and summary["activity"]["total_in_spect_fov_mbq"] == 0.0
    )
    assert any(f"accepted as no activity by {NAME}" in w for w in summary["warnings"])
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF") and (
        out / "report_pdf.dcm"
    ).is_file()
    assert "accepted as no activity" in (out / "summary.txt").read_text()
    if sigma:
        s = read_dose_rate_map(out / "doserate_sigma_pm.dcm")
        assert s.array.size and not np.any(s.array)
        assert summary["uncertainty"]["mean_in_tissue_dose_rate_sigma_mgy_per_h"] == 0.0
    else:
        assert not (out / "doserate_sigma_pm.dcm").exists()
    return summary


def test_dvk_refuses_by_default_and_gives_zero_with_the_assumption(
    zero_study, small_study, kernel_cache_dir, tmp_path, capsys
):
    common = ["dose", str(zero_study), "--kernel-cache", str(kernel_cache_dir)]
    assert main([*common, "-o", str(tmp_path / "refused")]) == 2
    assert (
        f"--accept {NAME}" in capsys.readouterr().err
        and not (tmp_path / "refused" / "rtdose.dcm").exists()
    )

    out = tmp_path / "out"
    assert main([*common, "-o", str(out), *ACCEPT]) == 0
    summary = _assert_all_zero_outputs(out, sigma=False)
    # No hot spots to find: the automatic lesion regions are skipped, with a note, not an empty SEG.
    assert summary["regions"] is None and summary["regions_error"] is None
    assert any("no automatic lesion regions" in w and NAME in w for w in summary["region_warnings"])
    assert not (out / "autoseg.dcm").exists()
    # Regions given later to the finished result: every statistic and DVH is zero, nothing fails.
    assert main(["regions", str(out), "--regions", str(small_study / "truth" / "seg.dcm"), "-o",
                 str(tmp_path / "regions")]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "regions" / "regions.json").read_text())["regions"]
    assert rows and all(r["mean_gy"] == r["max_gy"] == r["d2_gy"] == 0.0 for r in rows)
    for r in rows:  # the cumulative DVH: the whole region at 0 Gy, none at 2 Gy
        assert r["v_gy"]["2"]["ml"] == 0.0 and r["dvh_gy"]["volume_ml"] == [
            pytest.approx(r["volume_ml"], rel=1e-3)
        ]


def test_cnn_and_its_uncertainty_give_zero_with_the_assumption(
    zero_study, small_study, kernel_cache_dir, tmp_path
):
    weights = install_tiny_cnn(tmp_path / "models", "tiny")
    common = ["dose", str(zero_study), "--method", "cnn", "--model", str(weights), "--kernel-cache",
              str(kernel_cache_dir), *ACCEPT]  # fmt: skip
    assert main([*common, "-o", str(tmp_path / "cnn")]) == 0
    cnn_summary = json.loads((tmp_path / "cnn" / "summary.json").read_text())
    assert cnn_summary["method"] == "cnn"
    assert "body's in-plane box" in cnn_summary["dose_rate"]["network"]["field"]  # how the result was made
    _assert_all_zero_outputs(tmp_path / "cnn", sigma=False)

    # The ensemble mean and its calibrated sigma, with regions given: all zero, the regions too.
    out = tmp_path / "cnn-sigma"
    assert (
        main(
            [
                *common,
                "--uncertainty",
                "--regions",
                str(small_study / "truth" / "seg.dcm"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    summary = _assert_all_zero_outputs(out, sigma=True)
    assert summary["regions_error"] is None and summary["regions"]
    for r in summary["regions"]:
        assert r["mean_gy"] == r["max_gy"] == r["mean_dose_rate_mgy_per_h"] == 0.0
        assert r["uncertainty_dose_rate_mgy_per_h"] == r["uncertainty_gy"] == 0.0


def test_time_integration_of_zero_dose_rates_is_zero():
    """A cycle whose time points hold no activity: every voxel and region integral is 0 Gy."""
    from spectdose.integration import fit_time_curve, integrate_voxels

    vox = integrate_voxels([24.0, 96.0, 168.0], np.zeros((3, 4, 5, 6), np.float32), model="mono")
    assert not np.any(vox["integral"]) and vox["n_fitted"] == 0
    fit = fit_time_curve([24.0, 96.0, 168.0], [0.0, 0.0, 0.0])
    assert fit.integral == 0.0 and "no positive values" in fit.reason

"""A CT cut at either end of the SPECT's extent is told from the headers (spectdose.dicom.completeness)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from spectdose.dicom.completeness import ct_coverage_problem


@pytest.fixture(scope="module")
def parts(small_study) -> tuple[list[Path], list[Path]]:
    """(CT files from the feet up, NM files) of the session's small virtual patient."""
    ct = sorted((small_study / "dicom" / "CT").glob("*.dcm"),
                key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    return ct, sorted((small_study / "dicom" / "NM").glob("*.dcm"))


def test_a_whole_study_is_complete(parts):
    ct, nm = parts
    assert ct_coverage_problem(ct + nm) is None
    assert ct_coverage_problem(ct[1:] + nm) is None, "one SPECT slice outside the CT is allowed (fields of view)"


@pytest.mark.parametrize(("cut", "end"), [(slice(0, 34), "upper"), (slice(30, None), "lower")])
def test_a_ct_cut_at_either_end_of_the_spect_is_named(parts, cut, end):
    ct, nm = parts
    why = ct_coverage_problem(ct[cut] + nm)
    assert why is not None and f"short at the {end} end" in why and "34 slices" in why, why


def test_images_in_acquisition_counts_the_slices_missing(parts, tmp_path):
    ct, nm = parts
    kept = []
    for i, path in enumerate(ct[:-1]):  # the last slice lost, within the SPECT's margin: only the count tells
        ds = pydicom.dcmread(path)
        ds.ImagesInAcquisition = len(ct)
        ds.save_as(tmp_path / f"{i:03d}.dcm")
        kept.append(tmp_path / f"{i:03d}.dcm")
    why = ct_coverage_problem(kept + nm)
    assert why is not None and f"{len(ct) - 1} of the {len(ct)} slices" in why, why

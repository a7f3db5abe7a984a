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


def test_the_cli_refuses_a_ct_cut_at_one_end_unless_accepted(parts, tmp_path, capsys):
    """As the service refuses it: the SPECT beyond a cut CT would have no dose, with only a warning to say so."""
    import shutil

    from spectdose.cli import main
    from spectdose.dicom.ingest import load_study
    from spectdose.errors import InputError

    ct, nm = parts
    study = tmp_path / "study"
    (study / "CT").mkdir(parents=True)
    (study / "NM").mkdir()
    for path in ct[:56]:  # the upper end of the CT lost in transfer (most of the activity still inside)
        shutil.copy(path, study / "CT" / path.name)
    for path in nm:
        shutil.copy(path, study / "NM" / path.name)
    assert main(["dose", str(study), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "incomplete study" in err and "short at the upper end" in err and "--accept ct_short_of_spect" in err, err
    assert not (tmp_path / "out" / "rtdose.dcm").exists()
    with pytest.raises(InputError, match="short at the upper end"):
        load_study(study)
    accepted = load_study(study, accepted_assumptions=("ct_short_of_spect",))
    assert any(w.startswith("ASSUMED (ct_short_of_spect)") and "no dose" in w for w in accepted.warnings)
    assert accepted.ct.grid.shape[0] == 56

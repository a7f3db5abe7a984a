"""Issue 18, ingest side: how beds are blended, and an unwritable output folder found before any work.

The end-to-end cases (beds joined or refused, decay correction, contradicting geometry, contrast
CT) are in tests/test_odd_inputs.py; these are the parts a corpus case cannot see.
"""

from __future__ import annotations

import numpy as np
import pytest

from spectdose.dicom._beds import Bed, BedSet, join
from spectdose.geometry import Grid


def _grid(n: int, z0: float) -> Grid:
    return Grid(shape=(n, 2, 3), spacing_mm=(4.0, 4.0, 4.0), origin_mm=(0.0, 0.0, z0), axes=np.eye(3)[::-1].copy())


def test_overlapping_beds_are_blended_linearly_and_keep_their_own_slices():
    """Bed 1 (slices 0-4) holds 1, bed 2 (slices 3-7) holds 2: outside the overlap each bed's own
    value; in the 2-slice overlap bed 1's weight falls 2/3, 1/3 while bed 2's rises 1/3, 2/3."""
    beds = [Bed(None, [0], _grid(5, 0.0), False, []), Bed(None, [0], _grid(5, 12.0), False, [])]
    bed_set = BedSet(beds, [0, 3], _grid(8, 0.0))
    joined = join([np.ones((5, 2, 3)), np.full((5, 2, 3), 2.0)], bed_set)
    expected = [1, 1, 1, (2 / 3 * 1 + 1 / 3 * 2), (1 / 3 * 1 + 2 / 3 * 2), 2, 2, 2]
    assert joined[:, 0, 0] == pytest.approx(expected)
    assert np.all(joined == joined[:, :1, :1])


def test_a_bed_stored_against_the_slice_direction_is_reversed_before_joining():
    beds = [Bed(None, [0], _grid(3, 0.0), False, []), Bed(None, [0], _grid(3, 12.0), True, [])]
    bed_set = BedSet(beds, [0, 3], _grid(6, 0.0))
    second = np.arange(3, dtype=float)[:, None, None] * np.ones((3, 2, 3))  # stored top-down: 0, 1, 2
    joined = join([np.zeros((3, 2, 3)), second], bed_set)
    assert joined[3:, 0, 0] == pytest.approx([2, 1, 0])


def test_an_unwritable_output_folder_is_refused_before_any_computation(tmp_path, monkeypatch, capsys):
    """os.access says yes to root; a folder that cannot be made (here under /proc) must still be
    refused with exit 2 before the study is even read (issue 18 item 10)."""
    import spectdose.pipeline
    from spectdose.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the computation started")

    monkeypatch.setattr(spectdose.pipeline, "run", never)
    monkeypatch.setattr(spectdose.pipeline, "load_study", never)
    out = "/proc/spectdose-issue18-out/run"
    assert main(["dose", str(tmp_path), "-o", out, "--kernel-cache", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert "spectdose-issue18-out" in err and ("cannot be written" in err or "not writable" in err), err


def test_dose_help_lists_the_new_assumptions(capsys):
    """The --accept help is built from ASSUMPTIONS; a '%' in a description broke `spectdose dose --help`."""
    from spectdose.cli import main

    with pytest.raises(SystemExit) as done:
        main(["dose", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("contrast_ct_density", "pixel_spacing_trusted", "slice_spacing_trusted", "spect_beds_missing"):
        assert name in text

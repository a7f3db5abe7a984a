"""The one-page PDF report, its Encapsulated PDF and the slice renderer, on a synthetic study (seconds).

Text is read back from the PDF without a PDF library: matplotlib writes each text artist as one
``TJ`` array of two-byte codes that are the characters' Unicode code points (its Type 42 fonts
are CID fonts whose CIDs are code points, mapped to glyphs by a CIDToGIDMap), so decoding the
strings of every ``TJ`` array as UTF-16-BE gives the text as drawn.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import shutil
import subprocess
import zlib

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    EncapsulatedPDFStorage,
    NuclearMedicineImageStorage,
    generate_uid,
)

from spectdose.dicom.pdf import REPORT_TITLE, build_encapsulated_pdf, write_encapsulated_pdf
from spectdose.geometry import Grid, Volume
from spectdose.regions import Region, RegionSet, region_statistics
from spectdose.report import (
    ViewVolumes,
    default_isodose_levels,
    identifiers_from_study,
    key_point,
    region_colours,
    render_slice,
    report_pdf_bytes,
    table_rows,
)
from spectdose.study import Administration, PatientInfo, SeriesRef, Study

SHAPE = (24, 40, 48)
SPACING_MM = (3.0, 2.0, 2.0)


def _study(axes=None) -> Study:
    seed = "spectdose-test-report"
    study_uid, for_uid = generate_uid(entropy_srcs=[seed, "study"]), generate_uid(entropy_srcs=[seed, "for"])
    axes = np.eye(3)[::-1] if axes is None else axes
    grid = Grid(SHAPE, SPACING_MM, (-48.0, -40.0, -36.0), axes, for_uid)
    k, j, i = np.indices(SHAPE, dtype=float)
    body = ((j - 20) / 17) ** 2 + ((i - 24) / 21) ** 2 <= 1
    ct = Volume(np.where(body, 40, -1000).astype(np.int16), grid, "HU")
    spect = Volume(np.zeros(SHAPE, np.float32), grid, "Bq/ml")
    ct_ref = SeriesRef(study_uid, generate_uid(entropy_srcs=[seed, "ct"]), "CT", CTImageStorage,
                       tuple(generate_uid(entropy_srcs=[seed, "ct", str(n)]) for n in range(SHAPE[0])), "CT", 2, for_uid)
    nm_ref = SeriesRef(study_uid, generate_uid(entropy_srcs=[seed, "nm"]), "NM", NuclearMedicineImageStorage,
                       (generate_uid(entropy_srcs=[seed, "nm", "0"]),), "SPECT", 3, for_uid)
    patient = PatientInfo("Müller^Jürgen", "P-REPORT-42", "19600101", "M", "20240305", "101500", "S7", "ACC-991", "")
    administration = Administration("Lu-177", 7.4e9, dt.datetime(2024, 3, 1, 9, 0), "Lu-177 DOTATATE")
    return Study(ct, spect, ct_ref, nm_ref, patient, administration, dt.datetime(2024, 3, 5, 10, 0), "test calibration")


def _dose(study: Study) -> Volume:
    """A hot lesion (centre voxel 16, 26, 30) on a warm kidney-like ellipsoid, in Gy."""
    k, j, i = np.indices(SHAPE, dtype=float)
    dose = 0.3 + 12.0 * np.exp(-(((k - 8) / 3) ** 2 + ((j - 14) / 3) ** 2 + ((i - 16) / 4) ** 2))
    dose += 60.0 * np.exp(-(((k - 16) / 2) ** 2 + ((j - 26) / 2) ** 2 + ((i - 30) / 2) ** 2))
    return Volume(dose.astype(np.float32), study.ct.grid, "Gy")


def _regions() -> RegionSet:
    k, j, i = np.indices(SHAPE, dtype=float)
    kidney = ((k - 8) / 4) ** 2 + ((j - 14) / 4) ** 2 + ((i - 16) / 5) ** 2 <= 1
    lesion = ((k - 16) / 2.5) ** 2 + ((j - 26) / 3) ** 2 + ((i - 30) / 3) ** 2 <= 1
    return RegionSet([Region("kidney_left", kidney, 1), Region("lesion_liver_1", lesion, 2, lesion=True)], "SEG",
                     description="test regions")


def _summary(dose: Volume, regions: RegionSet) -> dict:
    voxel_ml = float(np.prod(SPACING_MM)) / 1000
    rows = region_statistics(dose.array, dose.array / 3.6e5, regions.masks, voxel_ml)
    return {
        "method": "dvk",
        "provenance": {"method": "DVK", "software": "spectdose 0.test", "time_model": "hanscheid, t = 96.00 h",
                       "calibration": "test calibration", "density_curve": "schneider2000", "dose_grid": "CT",
                       "inputs_sha256": "0123456789abcdef", "model_sha256": None},
        "time": {"administration": "2024-03-01T09:00:00", "acquisition": "2024-03-05T10:00:00",
                 "hours_since_administration": 97.0, "model": "hanscheid", "model_half_life_h": 97.0,
                 "half_life_note": "Hanscheid: effective half-life taken equal to the imaging time t"},
        "activity": {"injected_activity_mbq": 7400.0, "calibration": "test calibration"},
        "regions": rows,
        "regions_source": {"kind": "SEG", "method": None},
        "warnings": ["ASSUMED (test): a warning the physicist must see"],
        "region_warnings": [],
        "content_sha256": "ab" * 32,
    }


def pdf_text(pdf: bytes) -> str:
    """The text drawn in a matplotlib PDF (see the module docstring), one line per text artist."""
    lines = []
    for raw in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        try:
            content = zlib.decompress(raw)
        except zlib.error:
            continue
        for array in re.findall(rb"\[(.*?)\]\s*TJ", content, re.S):
            pieces = re.findall(rb"\(((?:\\.|[^\\)])*)\)", array, re.S)
            data = b"".join(re.sub(rb"\\([0-7]{1,3}|.)", _unescape, p, flags=re.S) for p in pieces)
            lines.append(data.decode("utf-16-be", errors="replace"))
    return "\n".join(lines)


def _unescape(match: re.Match) -> bytes:
    code = match.group(1)
    if code[:1].isdigit():
        return bytes([int(code, 8)])
    return {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f"}.get(code, code)


@pytest.fixture(scope="module")
def report():
    study = _study()
    dose, regions = _dose(study), _regions()
    view = ViewVolumes.from_volumes(study.ct, dose, regions)
    summary = _summary(dose, regions)
    return study, view, summary, report_pdf_bytes(view, summary, identifiers_from_study(study))


def test_report_is_a4_with_identifiers_administration_method_regions_and_reviewer_fields(report):
    study, view, summary, pdf = report
    assert pdf.startswith(b"%PDF-")
    assert len(re.findall(rb"/Type\s*/Page(?!s)", pdf)) == 2  # the key page, then the region table
    box = [float(v) for v in re.search(rb"/MediaBox\s*\[\s*([\d.\s]+)\]", pdf).group(1).split()]
    assert box[2] == pytest.approx(595.3, abs=1) and box[3] == pytest.approx(841.9, abs=1)  # A4 in points
    text = pdf_text(pdf)
    for expected in ("Müller Jürgen", "P-REPORT-42", "ACC-991", study.ct_series.study_instance_uid, "7400 MBq",
                     "2024-03-01T09:00:00", "DVK", "hanscheid", "test calibration", "kidney_left", "lesion_liver_1",
                     "D98\n(Gy)", "a warning the physicist must see", "Cumulative DVH", "axial", "coronal", "sagittal",
                     "half-life used 97 h", "Reviewed and approved by the medical physicist", "Name", "Date",
                     "Signature", "patient's right on the viewer's left", "page 1 of 2", "page 2 of 2",
                     "Uncertainty: none estimated by this method"):
        assert expected in text, f"{expected!r} is not in the report"
    lesion = next(r for r in summary["regions"] if r["region"] == "lesion_liver_1")
    assert f"{lesion['mean_gy']:.3g}" in text  # the table's numbers are the summary's
    # No creation date: the same inputs give the same bytes (and the same Encapsulated PDF UIDs).
    assert report_pdf_bytes(view, summary, identifiers_from_study(study)) == pdf


def test_words_with_ff_are_drawn_letter_by_letter_in_two_embedded_fonts(report):
    """A ligature ("ff" of "effective" as one glyph) would be drawn from a third font subset under a
    code that is not its text, so a search or copy of the report would not find the word."""
    _study_, _view, summary, pdf = report
    assert "effective" in summary["time"]["half_life_note"]
    assert "half-life used 97 h (Hanscheid: effective half-life taken equal to" in pdf_text(pdf)
    fonts = set(re.findall(rb"/BaseFont\s*/[A-Z]{6}\+([\w-]+)", pdf))
    assert sorted(fonts) == [b"DejaVuSans", b"DejaVuSans-Bold"]
    assert len(re.findall(rb"/FontFile2", pdf)) == 2  # one subset each


def test_key_images_cut_through_the_hottest_region_and_show_the_dose(report):
    _study_, view, _summary_, _pdf = report
    point = key_point(view)
    lesion = view.region_masks[view.region_names.index("lesion_liver_1")]
    assert lesion[point], "the key images must cut through the region with the highest mean dose"
    assert view.dose[point] == pytest.approx(view.dose[lesion].max())
    assert default_isodose_levels(view) == [2.0, 10.0, 23.0]  # the V(x Gy) levels below the 60 Gy maximum
    hot = render_slice(view, "axial", point[0])
    far = render_slice(view, "axial", view.n_slices("axial") - 1)
    saturated = lambda rgb: int(((rgb.max(axis=2).astype(int) - rgb.min(axis=2)) > 80).sum())  # noqa: E731
    assert saturated(hot) > 200 and saturated(far) == 0  # dose colours over the lesion, plain CT far away
    assert not np.array_equal(render_slice(view, "axial", point[0], opacity=0.0, isodose_levels=[], regions=False),
                              hot)


def test_view_is_turned_head_up_and_survives_a_round_trip(report, tmp_path):
    study, view, _summary_, _pdf = report
    # The same patient stored feet-first-up (slices running towards the feet) looks the same.
    flipped_axes = study.ct.grid.axes.copy()
    flipped_axes[0] = -flipped_axes[0]
    flipped = _study(flipped_axes)
    dose = _dose(study)
    other = ViewVolumes.from_volumes(Volume(study.ct.array[::-1].copy(), flipped.ct.grid, "HU"),
                                     Volume(dose.array[::-1].copy(), flipped.ct.grid, "Gy"))
    assert np.array_equal(other.ct_hu, view.ct_hu) and np.allclose(other.dose, view.dose)
    back = ViewVolumes.load(view.save(tmp_path / "view.npz"))
    assert back.region_names == view.region_names and back.region_lesion == [False, True]
    assert np.array_equal(back.region_masks, view.region_masks) and np.array_equal(back.dose, view.dose)
    assert back.dose_unit == "Gy" and back.spacing_mm == view.spacing_mm


def test_encapsulated_pdf_files_into_the_source_study_with_content_derived_uids(report, tmp_path):
    study, _view_, summary, pdf = report
    sources = [("1.2.840.10008.5.1.4.1.1.481.2", "1.2.3.4.5")]
    path = write_encapsulated_pdf(tmp_path / "report_pdf.dcm", pdf, study, content_digest=summary["content_sha256"],
                                  sources=sources)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == EncapsulatedPDFStorage and ds.Modality == "DOC"
    assert ds.StudyInstanceUID == study.ct_series.study_instance_uid
    assert (ds.PatientID, str(ds.PatientName), ds.AccessionNumber) == ("P-REPORT-42", "Müller^Jürgen", "ACC-991")
    assert ds.SeriesInstanceUID not in (study.ct_series.series_instance_uid, study.spect_series.series_instance_uid)
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf" and ds.DocumentTitle == REPORT_TITLE
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength] == pdf
    assert ds.SourceInstanceSequence[0].ReferencedSOPInstanceUID == "1.2.3.4.5"
    again = build_encapsulated_pdf(pdf, study, content_digest=summary["content_sha256"], sources=sources)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (ds.SOPInstanceUID, ds.SeriesInstanceUID)
    changed = build_encapsulated_pdf(pdf + b"\n%changed", study, content_digest=summary["content_sha256"])
    assert changed.SOPInstanceUID != ds.SOPInstanceUID and changed.SeriesInstanceUID == ds.SeriesInstanceUID
    with pytest.raises(ValueError, match="not a PDF"):
        build_encapsulated_pdf(b"<html>", study, content_digest="x")
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (dicom3tools; scripts/bootstrap.sh --test-tools)")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    messages = (out.stdout + out.stderr).splitlines()
    assert "EncapsulatedPDF" in messages[0]
    assert not [m for m in messages if m.startswith(("Error", "Warning"))], "\n".join(messages)


def test_a_dose_rate_only_result_reports_the_rate_and_says_there_are_no_regions(tmp_path):
    # A normalised SPECT (no calibration) gives a per-MBq dose-rate map and no absorbed dose.
    study = _study()
    rate = Volume(_dose(study).array / 300.0, study.ct.grid, "mGy/h/MBq")
    view = ViewVolumes.from_volumes(study.ct, rate)
    assert not view.absorbed and len(view.region_masks) == 0
    top = float(view.dose.max())
    assert default_isodose_levels(view) == pytest.approx([0.2 * top, 0.5 * top, 0.8 * top], rel=1e-2)
    summary = {**_summary(_dose(study), _regions()), "regions": None, "regions_error": "no regions reported here",
               "time": {}, "provenance": {"method": "DVK", "time_model": "none (dose rate only)"}}
    pdf = report_pdf_bytes(view, summary, identifiers_from_study(study))
    text = pdf_text(pdf)
    assert len(re.findall(rb"/Type\s*/Page(?!s)", pdf)) == 1  # no regions: no table page
    assert "mGy/h/MBq" in text and "none (dose rate only)" in text and "no regions reported here" in text
    assert "P-REPORT-42" in text


def _many_regions(n: int) -> RegionSet:
    """``n`` small boxes along the body, each its own region (a 15-segment SEG in miniature)."""
    regions = []
    for r in range(n):
        mask = np.zeros(SHAPE, bool)
        k, j = 2 + (r % 10) * 2, 4 + (r // 10) * 5
        mask[k:k + 2, j:j + 4, 20:26] = True
        regions.append(Region(f"lesion_{r + 1}" if r >= 11 else f"organ_{r + 1}", mask, r + 1, lesion=r >= 11))
    return RegionSet(regions, "SEG", description="many regions")


def test_every_region_of_a_15_segment_seg_is_in_the_table_and_a_dvh_with_its_own_colour():
    study = _study()
    dose, regions = _dose(study), _many_regions(15)
    view = ViewVolumes.from_volumes(study.ct, dose, regions)
    summary = _summary(dose, regions)
    names = [r.name for r in regions.regions]
    text = pdf_text(report_pdf_bytes(view, summary, identifiers_from_study(study)))
    for name in names:
        # once in a DVH legend (page 1) and once in the table (page 2)
        assert len(re.findall(rf"(?m)^{name}$", text)) >= 2, f"{name} is not in both a DVH and the table"
    last = summary["regions"][-1]
    assert f"{last['mean_gy']:.3g}" in text and "Cumulative DVH (9-15 of 15)" in text
    colours = np.asarray(region_colours(40), float)
    distance = np.sqrt(((colours[:, None] - colours[None]) ** 2).sum(axis=-1)) + np.eye(40) * 1e9
    assert distance.min() > 20  # 40 regions, no colour repeated or nearly so (RGB distance)


def test_sixty_regions_take_further_pages_and_none_is_left_off():
    study = _study()
    dose, regions = _dose(study), _many_regions(60)
    summary = _summary(dose, regions)
    pdf = report_pdf_bytes(ViewVolumes.from_volumes(study.ct, dose, regions), summary, identifiers_from_study(study))
    text = pdf_text(pdf)
    # page 1, the table pages (rows with wrapped notes take more room), one page of further DVHs
    # (regions 17-60: six panels of 8)
    pages = len(re.findall(rb"/Type\s*/Page(?!s)", pdf))
    assert pages >= 4 and f"page {pages} of {pages}" in text
    for r in regions.regions:
        assert len(re.findall(rf"(?m)^{r.name}$", text)) >= 2, r.name
    assert "Cumulative DVH (57-60 of 60)" in text and re.search(r"Regions \(1-\d+ of 60\)", text)
    assert re.search(r"Regions \(\d+-60 of 60\)", text)


def test_header_and_label_text_is_drawn_literally_never_as_mathtext():
    study = _study()
    study.patient = dataclasses.replace(study.patient, patient_name="A$x^{$^B", patient_id="ID$1$")
    dose = _dose(study)
    regions = _regions()
    regions.regions[0].name = "A$x^{$^B"
    summary = _summary(dose, regions)
    view = ViewVolumes.from_volumes(study.ct, dose, regions)
    text = pdf_text(report_pdf_bytes(view, summary, identifiers_from_study(study)))
    assert "A$x {$ B" in text and "ID$1$" in text  # the name's components, as a name is shown
    assert len(re.findall(r"(?m)^A\$x\^\{\$\^B$", text)) >= 2  # the label, in the DVH legend and the table


def test_uncertainty_coverage_and_notes_are_columns_and_an_uncovered_region_has_no_numbers():
    rows = [
        {"region": "liver", "volume_ml": 1500.0, "mean_gy": 3.0, "uncertainty_gy": 0.21, "d2_gy": 6.0, "d50_gy": 3.0,
         "d98_gy": 1.0, "max_gy": 7.0, "mean_dose_rate_mgy_per_h": 11.0, "coverage": "covered",
         "spect_coverage_fraction": 1.0, "automatic": False, "location": "abdomen, right"},
        {"region": "kidney_left", "volume_ml": 150.0, "mean_gy": None, "uncertainty_gy": None, "d2_gy": None,
         "d50_gy": None, "d98_gy": None, "max_gy": None, "mean_dose_rate_mgy_per_h": None, "coverage": "not covered",
         "spect_coverage_fraction": 0.0, "automatic": True, "location": "abdomen, left", "size_note": "below 2 ml"},
        {"region": "lesion_1", "volume_ml": 5.0, "mean_gy": 9.0, "uncertainty_gy": 1.1, "d2_gy": 12.0, "d50_gy": 9.0,
         "d98_gy": 4.0, "max_gy": 13.0, "mean_dose_rate_mgy_per_h": 30.0, "coverage": "partly covered",
         "spect_coverage_fraction": 0.62},
    ]
    header, body = table_rows(rows)
    assert header[:4] == ["region", "volume (ml)", "coverage", "mean (Gy)"] and "1 sigma (Gy)" in header
    cells = dict(zip(header, body[1], strict=True))
    assert cells["mean (Gy)"] == cells["D2 (Gy)"] == cells["1 sigma (Gy)"] == "-"
    assert cells["coverage"] == "not covered (0 % in SPECT)" and cells["notes"] == "automatic; abdomen, left; below 2 ml"
    assert dict(zip(header, body[2], strict=True))["coverage"] == "partly covered (62 % in SPECT)"
    assert dict(zip(header, body[0], strict=True))["1 sigma (Gy)"] == "0.21"
    # the old form (no coverage fields) still renders, without the new columns
    old_header, _ = table_rows([{k: v for k, v in rows[0].items() if k not in ("coverage", "automatic", "location",
                                                                              "spect_coverage_fraction")}])
    assert "coverage" not in old_header and "notes" not in old_header


def test_the_maxima_are_marked_where_they_lie_whatever_the_slice_order(tmp_path):
    study = _study()
    dose, regions = _dose(study), _regions()
    hot = study.ct.grid.index_to_lps_mm(np.array([16, 26, 30]))  # the lesion's hottest voxel
    warm = study.ct.grid.index_to_lps_mm(np.array([8, 14, 16]))  # the kidney's
    points = {"voxel maximum": hot, "maximum in soft tissue": warm}
    view = ViewVolumes.from_volumes(study.ct, dose, regions, points_lps_mm=points)
    assert view.markers["voxel maximum"] == key_point(view)  # the same voxel, found from the dose
    assert view.dose[view.markers["maximum in soft tissue"]] == pytest.approx(dose.array[8, 14, 16], rel=1e-3)
    # the same patient, slices stored in the other order: the same marks
    g = study.ct.grid
    flipped_axes = g.axes.copy()
    flipped_axes[0] = -flipped_axes[0]
    grid = Grid(SHAPE, SPACING_MM, tuple(g.index_to_lps_mm(np.array([SHAPE[0] - 1, 0, 0]))), flipped_axes,
                g.frame_of_reference_uid)
    other = ViewVolumes.from_volumes(Volume(study.ct.array[::-1].copy(), grid, "HU"),
                                     Volume(dose.array[::-1].copy(), grid, "Gy"), points_lps_mm=points)
    assert other.markers == view.markers
    assert ViewVolumes.load(view.save(tmp_path / "view.npz")).markers == view.markers
    text = pdf_text(report_pdf_bytes(view, _summary(dose, regions), identifiers_from_study(study)))
    words = " ".join(text.split())
    assert "marked in white: voxel maximum (×), maximum in soft tissue (circle)" in words

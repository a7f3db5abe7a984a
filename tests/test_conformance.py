"""Every object a small run writes passes dciodvfy, text from headers and labels stays text, and
the summary's maximum is the delivered RT Dose's (issue 18 items 6, 8, 9; issue 19 item 5).

Two CLI runs on the session's small virtual patient (seed 8, ~20 s each):

* ``named``: its truth SEG as regions (15 segments), one segment relabelled and the patient
  renamed ``A$x^{$^B`` (two dollars: matplotlib would parse mathtext), ``--dose-grid 4``;
* ``automatic``: no regions given, so the automatic regions' SEG (``autoseg.dcm``) is written too.

dciodvfy cannot read 32-bit pixels, so the RT Dose is checked through a 16-bit copy with the
same header (:func:`rtdose_16bit_copy`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from spectdose.dicom.rtdose import dose_grid_scaling_ds, read_rtdose
from tests.test_report import pdf_text

ODD_TEXT = "A$x^{$^B"
RELABELLED = "spleen"
DCIODVFY = shutil.which("dciodvfy")


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectdose.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _renamed_study(small_study: Path, folder: Path) -> tuple[Path, Path]:
    """The small study with PatientName ``A$x^{$^B`` everywhere and one SEG segment so labelled."""
    shutil.copytree(small_study / "dicom", folder / "dicom")
    for path in sorted((folder / "dicom").rglob("*")):
        if path.is_file():
            try:
                ds = pydicom.dcmread(path)
            except pydicom.errors.InvalidDicomError:
                continue
            ds.PatientName = ODD_TEXT
            ds.save_as(path)
    seg = pydicom.dcmread(small_study / "truth" / "seg.dcm")
    seg.PatientName = ODD_TEXT
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert RELABELLED in labels and len(labels) == 15
    seg.SegmentSequence[labels.index(RELABELLED)].SegmentLabel = ODD_TEXT
    seg_path = folder / "seg.dcm"
    seg.save_as(seg_path)
    return folder / "dicom", seg_path


@pytest.fixture(scope="module")
def named(small_study, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("odd-text")
    dicom, seg = _renamed_study(small_study, folder)
    out = folder / "out"
    run = _cli("dose", str(dicom), "-o", str(out), "--regions", str(seg), "--dose-grid", "4")
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def automatic(small_study, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("auto") / "out"
    run = _cli("dose", str(small_study / "dicom"), "-o", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "autoseg.dcm").is_file()
    return out


def rtdose_16bit_copy(path: Path, target: Path) -> Path:
    """The RT Dose with 16-bit pixels (and the Dose Grid Scaling that goes with them), all else equal."""
    ds = pydicom.dcmread(path)
    dose = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    scaling = dose_grid_scaling_ds(float(dose.max()), 2**16 - 1)
    ds.PixelData = np.rint(dose / float(scaling)).astype("<u2").tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.DoseGridScaling = scaling
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # the pixels above are native
    ds.save_as(target, enforce_file_format=True)
    return target


def _ds_too_long(ds: pydicom.Dataset) -> list[str]:
    """DS values longer than 16 characters, as written (PS3.5 6.2), anywhere in the dataset."""
    bad = []

    def visit(dataset, _elem):
        elem = _elem
        if elem.VR == "DS" and elem.value is not None:
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                text = getattr(v, "original_string", None) or str(v)
                if len(text) > 16:
                    bad.append(f"{elem.keyword} = {text}")

    ds.walk(visit)
    return bad


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _objects(out: Path, tmp: Path) -> dict[str, Path]:
    objects = {}
    for path in sorted(out.glob("*.dcm")):
        objects[path.name] = rtdose_16bit_copy(path, tmp / "rtdose16.dcm") if path.name == "rtdose.dcm" else path
    return objects


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) not installed: scripts/bootstrap.sh --test-tools")
def test_dciodvfy_finds_no_error_in_any_object_of_a_small_run(named, automatic, tmp_path):
    checked = {}
    for name, out in (("named", named), ("automatic", automatic)):
        (tmp_path / name).mkdir()
        for file_name, path in _objects(out, tmp_path / name).items():
            checked[f"{name}/{file_name}"] = _dciodvfy_errors(path) + _ds_too_long(
                pydicom.dcmread(out / file_name, stop_before_pixels=True))
    # every kind of object the pipeline writes was looked at
    kinds = {key.split("/")[1] for key in checked}
    assert {"rtdose.dcm", "doserate_pm.dcm", "regions_rtstruct.dcm", "sr.dcm", "report_pdf.dcm", "autoseg.dcm"} <= kinds
    failing = {key: errors[:5] for key, errors in checked.items() if errors}
    assert not failing, json.dumps(failing, indent=1)


def test_header_and_label_text_reaches_pdf_sr_and_summary_as_literal_text(named):
    summary = json.loads((named / "summary.json").read_text())
    assert ODD_TEXT in [r["region"] for r in summary["regions"]] and len(summary["regions"]) == 15
    text = pdf_text((named / "report.pdf").read_bytes())
    assert len(re.findall(rf"(?m)^{re.escape(ODD_TEXT)}$", text)) >= 2  # DVH legend and table cell, verbatim
    assert "A$x {$ B" in text  # the patient's name, its components as a name is shown
    encapsulated = pydicom.dcmread(named / "report_pdf.dcm")
    assert bytes(encapsulated.EncapsulatedDocument)[: encapsulated.EncapsulatedDocumentLength] == \
        (named / "report.pdf").read_bytes()
    assert str(encapsulated.PatientName) == ODD_TEXT
    sr = pydicom.dcmread(named / "sr.dcm")
    identifiers = set()
    sr.walk(lambda _ds, e: identifiers.add(str(e.value)) if e.keyword == "TextValue" else None)
    assert ODD_TEXT in identifiers
    # File names never carry header or label text.
    assert not [p.name for p in named.iterdir() if "$" in p.name or "{" in p.name]


def test_summary_maximum_is_the_delivered_rt_doses_and_says_where_it_lies(named):
    summary = json.loads((named / "summary.json").read_text())
    delivered = read_rtdose(named / "rtdose.dcm")
    assert delivered.grid.spacing_mm == pytest.approx((4.0, 4.0, 4.0))
    assert summary["dose"]["max_gy"] == pytest.approx(float(delivered.array.max()), rel=1e-6)
    maxima = summary["maxima"]
    assert maxima["grid"] == "4x4x4 mm" and maxima["max"] == pytest.approx(summary["dose"]["max_gy"])
    where = maxima["max_location"]
    # The voxel maximum of this patient is SPECT spill-over into lung at the spleen (issue 18): labelled so.
    assert where["tissue"] == "lung/low-density" and where["density_g_cm3"] < 0.9
    assert where["interface"] is not None and "not a dose to quote" in maxima["max_location_text"]
    soft = maxima["max_in_soft_tissue_location"]
    assert soft["tissue"] == "soft tissue" and soft["density_g_cm3"] >= 0.9 and soft["region"]
    assert maxima["max_in_soft_tissue"] < maxima["max"]
    txt = (named / "summary.txt").read_text()
    assert f"{summary['dose']['max_gy']:.3g} Gy (on the 4x4x4 mm grid of the RT Dose)" in txt
    assert "Maximum in soft tissue (density >= 0.9 g/cm3)" in txt and "Highest region D2" in txt
    assert "half-life 93.05 h" in txt  # Hanscheid: T = t
    pdf = " ".join(pdf_text((named / "report.pdf").read_bytes()).split())
    assert "Voxel maximum on the 4x4x4 mm grid" in pdf and "not a dose to quote" in pdf

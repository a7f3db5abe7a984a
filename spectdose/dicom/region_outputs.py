"""Region results as files: CSV, SEG, RT Structure Set, RT Dose with DVHs, TID 1500 SR.

One writer for the pipeline and for :func:`region_report` (a region set arriving after the
dose). Which object references which (docs/regions.md):

* SR (TID 1500) -> each region's segment in a SEG (the given SEG, ``autoseg.dcm`` for
  automatic lesions, ``regions_seg.dcm`` traced from a given RT Structure Set) and the RT
  Dose it measured.
* RT Dose with DVHs -> an RT Structure Set (PS3.3 C.8.8.4: Referenced Structure Set
  Sequence, DVH Referenced ROI Sequence by ROI Number): the given RTSTRUCT, or
  ``regions_rtstruct.dcm`` traced from the SEG, whose ROIs name their SEG segment in the
  Definition Source Sequence (PS3.3 C.8.8.5).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, RTStructureSetStorage, SegmentationStorage

from spectdose.dicom.rtstruct import build_rtstruct
from spectdose.geometry import Grid
from spectdose.regions import FieldOfView, RegionSet, region_statistics

__all__ = ["RegionContext", "write_region_outputs", "REGION_OUTPUT_NAMES", "add_dvhs"]

REGION_OUTPUT_NAMES = {
    "regions_csv": "regions.csv",
    "dvh_csv": "dvh.csv",
    "autoseg": "autoseg.dcm",
    "regions_seg": "regions_seg.dcm",
    "regions_rtstruct": "regions_rtstruct.dcm",
    "sr": "sr.dcm",
}
_UID_ROOT = "2.25."
# Codes of our own (PS3.16 8.2: a private coding scheme designator starts with 99).
_SCHEME = "99SPECTDOSE"


@dataclasses.dataclass
class RegionContext:
    """What the region outputs reference: the CT (grid, series, instances) and the patient/study header."""

    ct_grid: Grid
    ct_series_uid: str
    ct_instance_uids: tuple[str, ...]  # in ct_grid's slice order
    header: Dataset  # patient and study attributes are copied from it (the RT Dose or map)
    software_version: str
    rtdose_path: Path | None = None
    # The RT Dose in memory, not yet written (the pipeline's): its DVHs are added to it and the caller
    # writes it, once, instead of this module reading ``rtdose_path`` back and writing it again.
    rtdose: Dataset | None = None


def _uid(*parts: str) -> str:
    """A UID under 2.25 from a digest of ``parts`` (PS3.5 B.2), so a rerun gives the same one."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return _UID_ROOT + str(int.from_bytes(digest[:16], "big"))


def _packed_mask(region) -> bytes:
    """``np.packbits(region.mask).tobytes()`` made from the region's box: the bytes of the set bits
    are or-ed together, the rest of the whole grid's bytes are zero."""
    box, local = region.bounds()
    shape = region.mask.shape
    out = np.zeros((int(np.prod(shape)) + 7) // 8, dtype=np.uint8)
    where = np.argwhere(local) + np.array([b.start for b in box])
    if len(where):
        flat = np.ravel_multi_index(tuple(where.T), shape)  # ascending: argwhere is in C order
        byte = flat >> 3
        bits = (np.uint8(0x80) >> (flat & 7).astype(np.uint8)).astype(np.uint8)
        starts = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
        out[byte[starts]] = np.bitwise_or.reduceat(bits, starts)
    return out.tobytes()


def _masks_digest(regions: RegionSet) -> str:
    """Digest of the regions' names and masks (as packed bits of the whole grid) for content-derived UIDs."""
    h = hashlib.sha256()
    for r in regions.regions:
        h.update(r.name.encode())
        h.update(_packed_mask(r))
    return h.hexdigest()


def _label_volume(regions: RegionSet, shape: tuple[int, ...]) -> np.ndarray | None:
    """One volume holding each region's number (1, 2, ...) on its voxels, filled box by box;
    None when two regions share a voxel (a SEG then needs one frame stack per segment)."""
    labels = np.zeros(shape, dtype=np.uint8 if len(regions.regions) < 256 else np.uint16)
    for number, r in enumerate(regions.regions, start=1):
        box, local = r.bounds()
        part = labels[box]
        if np.any(part[local]):
            return None
        part[local] = number
    return labels


def _pseudo_ct_headers(ctx: RegionContext) -> list[Dataset]:
    """CT headers (no pixels) with the CT's UIDs and plane geometry, as highdicom's SEG needs
    source images; built from the grid so no CT file has to be at hand."""
    g, h = ctx.ct_grid, ctx.header
    common = Dataset()  # what every slice shares, built once: its elements are shared, only read
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(common, keyword, h.get(keyword, ""))
    common.SOPClassUID, common.Modality = CTImageStorage, "CT"
    common.SeriesInstanceUID = ctx.ct_series_uid
    common.FrameOfReferenceUID = g.frame_of_reference_uid
    common.Rows, common.Columns = g.shape[1], g.shape[2]
    common.PixelSpacing = [g.spacing_mm[1], g.spacing_mm[2]]
    common.SliceThickness = g.spacing_mm[0]
    common.ImageOrientationPatient = [float(v) for v in (*g.axes[2], *g.axes[1])]
    out = []
    for k, uid in enumerate(ctx.ct_instance_uids):
        d = Dataset({element.tag: element for element in common})
        d.SOPInstanceUID = uid
        d.ImagePositionPatient = [float(v) for v in g.index_to_lps_mm(np.array([k, 0, 0]))]
        out.append(d)
    return out


def _build_seg(regions: RegionSet, ctx: RegionContext, *, description: str, method: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if len(ctx.ct_instance_uids) != ctx.ct_grid.shape[0]:
        raise ValueError("one CT instance UID per slice of the CT grid is needed to write a SEG")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="spectdose hot-spot segmentation" if regions.source == "automatic" else "spectdose contour fill",
        version=ctx.software_version,
        # CID 7162 has no "thresholding"; a threshold relative to the neighbourhood's maximum and
        # background is neighbourhood analysis. Contours filled into masks are a morphological step.
        family=codes.cid7162.NeighborhoodAnalysis if regions.source == "automatic"
        else codes.cid7162.MorphologicalOperations,
        parameters={"method": method[:64]} if method else None,
    )
    descriptions = []
    for number, r in enumerate(regions.regions, start=1):
        category, kind = _segment_codes(r)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=r.name[:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if r.automatic
            else hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm,
        ))
    # A label volume when the regions do not overlap (automatic hot spots never do): 1/n of the
    # bytes of a stack of n segments, and highdicom checks it with one max() instead of a sum.
    pixels = _label_volume(regions, ctx.ct_grid.shape)
    if pixels is None:
        pixels = np.stack([r.mask for r in regions.regions], axis=-1).astype(np.uint8)
    digest = _masks_digest(regions)
    seg = hd.seg.Segmentation(
        source_images=_pseudo_ct_headers(ctx),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid("SEG-series", regions.source, digest),
        series_number=902,
        sop_instance_uid=_uid("SEG-instance", regions.source, digest),
        instance_number=1,
        manufacturer="spectdose",
        manufacturer_model_name="spectdose",
        software_versions=f"spectdose {ctx.software_version}",
        device_serial_number="0",
        series_description=description[:64],
        content_label="AUTOHOTSPOTS" if regions.source == "automatic" else "REGIONS",
        content_description=(method or description)[:64],
    )
    # Segment Description (0062,0006, LO): an automatic region says it is unreviewed and where it lies.
    for item, r in zip(seg.SegmentSequence, regions.regions, strict=True):
        if r.unreviewed:
            item.SegmentDescription = f"{UNREVIEWED}; {r.location}"[:64]
    # highdicom draws the Dimension Organization UID at random; derive it from the content so an
    # identical rerun is the identical object (the node and REST de-duplicate by content digest).
    organisation_uid = _uid("SEG-dimension-organisation", seg.SOPInstanceUID)
    for item in seg.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = organisation_uid
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = organisation_uid
    return seg


# How an automatic region is labelled in the SEG, SR, summary and report.
UNREVIEWED = "unreviewed, automatic"


def _segment_codes(region) -> tuple:
    """SEG category and SR finding type: spectdose's automatic hot spot is a region in space (nobody
    has reviewed it), never a neoplasm; a region of a given SEG keeps the type its SEG gives; a
    lesion of a given RT Structure Set is a neoplasm; anything else an organ."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if region.unreviewed:
        return codes.SCT.SpatialAndRelationalConcept, codes.DCM.RegionInSpace
    if region.property_type is not None and all(region.property_type):
        kind = hd.sr.CodedConcept(*region.property_type)  # a given SEG says what it is: the SR repeats it
        return (codes.SCT.MorphologicallyAbnormalStructure if region.lesion else codes.SCT.AnatomicalStructure), kind
    if region.lesion:
        return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm
    return codes.SCT.AnatomicalStructure, codes.SCT.Organ


def add_dvhs(rtdose: Dataset, rows: Sequence[dict], roi_numbers: Sequence[int], structure_set_uid: str) -> None:
    """Add the RT DVH Module (PS3.3 C.8.8.4): one cumulative absorbed-dose DVH per region, in cm3.

    DVH Data holds (bin width, volume) pairs with a uniform bin width; volume n is the volume
    receiving at least (n - 1) bin widths, so the first is the whole region.
    """
    items = []
    for row, number in zip(rows, roi_numbers, strict=True):
        dvh = row.get("dvh_gy")
        if not dvh:
            continue  # not covered by the SPECT: no dose, no DVH
        roi = Dataset()
        roi.ReferencedROINumber = int(number)
        roi.DVHROIContributionType = "INCLUDED"
        item = Dataset()
        item.DVHReferencedROISequence = [roi]
        item.DVHType = "CUMULATIVE"
        item.DoseUnits = "GY"
        item.DoseType = "PHYSICAL"
        item.DVHDoseScaling = 1.0
        item.DVHVolumeUnits = "CM3"
        item.DVHNumberOfBins = len(dvh["volume_ml"])
        data = []
        for volume in dvh["volume_ml"]:
            data += [dvh["bin_width"], volume]
        item.DVHData = data
        # DS values are at most 16 characters (PS3.5 6.2): pydicom's formatter, as rtdose.ds() uses.
        item.DVHMinimumDose = pydicom.valuerep.format_number_as_ds(float(row["min_gy"]))
        item.DVHMaximumDose = pydicom.valuerep.format_number_as_ds(float(row["max_gy"]))
        item.DVHMeanDose = pydicom.valuerep.format_number_as_ds(float(row["mean_gy"]))
        items.append(item)
    if not items:
        return  # no region with a dose statistic: no DVH module
    ref = Dataset()
    ref.ReferencedSOPClassUID = RTStructureSetStorage
    ref.ReferencedSOPInstanceUID = structure_set_uid
    rtdose.ReferencedStructureSetSequence = [ref]
    rtdose.DVHSequence = items


def _finding_sites(region) -> list | None:
    """TID 1411 Finding Site of an automatic region: the CT tissue class it mostly lies in, with
    laterality (from ``Region.location``, spectdose.lesions.classify_location)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not region.unreviewed or not region.location:
        return None
    tissue = {"lung": codes.SCT.Lung, "fat": codes.SCT.AdiposeTissue, "soft tissue": codes.DCM.SoftTissue,
              "bone": codes.SCT.Bone}
    words = region.location.split(",")
    kind = next((code for name, code in tissue.items() if words[0].startswith(name)), None)
    if kind is None:
        return None
    side = words[1].split()[0] if len(words) > 1 and words[1].split() else ""
    laterality = {"right": codes.SCT.Right, "left": codes.SCT.Left}.get(side)
    return [hd.sr.FindingSite(anatomic_location=kind, laterality=laterality)]


def _build_sr(rows, regions: RegionSet, seg_uid: str, segment_numbers, rtdose: Dataset | None, seg_ds: Dataset,
              ctx: RegionContext):
    """TID 1500 Measurement Report: one volumetric measurement group (TID 1411) per region."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    def code(value: str, meaning: str) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(value, _SCHEME, meaning)

    gy, ml = hd.sr.CodedConcept("Gy", "UCUM", "Gy"), hd.sr.CodedConcept("ml", "UCUM", "ml")
    mgy_h = hd.sr.CodedConcept("mGy/h", "UCUM", "mGy/h")
    percent = hd.sr.CodedConcept("%", "UCUM", "%")
    algorithm = hd.sr.AlgorithmIdentification(name="spectdose", version=ctx.software_version)
    groups = []
    for row, region, number in zip(rows, regions.regions, segment_numbers, strict=True):
        measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=row["volume_ml"], unit=ml, algorithm_id=algorithm)]
        evaluations = []
        if row.get("coverage", "covered") != "covered":
            # (DCM 111052 Quality Finding) = (DCM 130576 Anatomy coverage incomplete); the covered
            # fractions as measurements; no dose measurement unless the partial statistics were accepted.
            evaluations.append(hd.sr.QualitativeEvaluation(codes.DCM.QualityFinding, codes.DCM.AnatomyCoverageIncomplete))
            measurements.append(hd.sr.Measurement(
                name=code("SPECTFOV", "Fraction of the region in the SPECT field of view"),
                value=round(100.0 * row["spect_coverage_fraction"], 2), unit=percent, algorithm_id=algorithm))
            measurements.append(hd.sr.Measurement(
                name=code("CTFOV", "Fraction of the region in the CT field of view"),
                value=round(100.0 * row["ct_coverage_fraction"], 2), unit=percent, algorithm_id=algorithm))
        if row.get("size_bias_pct"):
            evaluations.append(hd.sr.QualitativeEvaluation(
                codes.DCM.QualityFinding, code("SMALLVOL", "Volume near the SPECT resolution, dose biased low")))
            for key, value in zip(("BIASLOW", "BIASHIGH"), row["size_bias_pct"], strict=True):
                measurements.append(hd.sr.Measurement(
                    name=code(key, f"Expected bias of the mean absorbed dose, {'lowest' if key == 'BIASLOW' else 'highest'} measured"),
                    value=value, unit=percent, algorithm_id=algorithm))
        if region.unreviewed:
            # Nobody has reviewed it: (DCM 111012 Certainty of Finding) = (SCT 82334004 Indeterminate).
            evaluations.append(hd.sr.QualitativeEvaluation(codes.DCM.CertaintyOfFinding, codes.SCT.Indeterminate))
        if row.get("mean_gy") is not None:
            for key, derivation in (("mean_gy", codes.SCT.Mean), ("median_gy", codes.SCT.Median),
                                    ("min_gy", codes.SCT.Minimum), ("max_gy", codes.SCT.Maximum)):
                measurements.append(hd.sr.Measurement(name=codes.DCM.AbsorbedDose, value=row[key], unit=gy,
                                                      derivation=derivation, algorithm_id=algorithm))
            for x in ("2", "50", "98"):
                measurements.append(hd.sr.Measurement(
                    name=code(f"D{x}", f"Minimum absorbed dose to the hottest {x} % of the volume"),
                    value=row[f"d{x}_gy"], unit=gy, algorithm_id=algorithm))
        if row.get("mean_dose_rate_mgy_per_h") is not None:
            measurements.append(hd.sr.Measurement(name=code("DOSERATE", "Absorbed dose rate"),
                                                  value=row["mean_dose_rate_mgy_per_h"], unit=mgy_h,
                                                  derivation=codes.SCT.Mean, algorithm_id=algorithm))
        label = f"{region.name} ({UNREVIEWED})" if region.unreviewed else region.name
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid("tracking", seg_uid, str(number)), identifier=label[:64]),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=SegmentationStorage, sop_instance_uid=seg_uid, segment_number=int(number),
                source_series=hd.sr.SourceSeriesForSegmentation(ctx.ct_series_uid)),
            finding_type=_segment_codes(region)[1],
            finding_sites=_finding_sites(region),
            measurements=measurements,
            qualitative_evaluations=evaluations or None,
        ))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=_uid("device", "spectdose"), name="spectdose"))),
        procedure_reported=hd.sr.CodedConcept("spectdose-mrt", _SCHEME, "Radionuclide therapy dosimetry"),
        imaging_measurements=groups,
    )
    evidence = [seg_ds] + ([rtdose] if rtdose is not None else [])
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=_uid("SR-series", seg_uid, digest),
        series_number=904,
        sop_instance_uid=_uid("SR-instance", seg_uid, digest),
        instance_number=1,
        manufacturer="spectdose",
        is_complete=True,
        series_description="Region doses (spectdose)",
    )
    # Our own coding scheme is identified in the SOP Common Module (PS3.3 C.12.1.1.2).
    scheme = Dataset()
    scheme.CodingSchemeDesignator = _SCHEME
    scheme.CodingSchemeName = "spectdose dosimetry concepts"
    scheme.CodingSchemeResponsibleOrganization = "spectdose"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _write_csvs(out_dir: Path, rows: list[dict]) -> dict[str, Path]:
    flat_keys = ["region", "volume_ml", "voxels", "mean_gy", "median_gy", "min_gy", "max_gy", "d2_gy", "d50_gy",
                 "d98_gy", "uncertainty_gy", "mean_dose_rate_mgy_per_h", "median_dose_rate_mgy_per_h",
                 "min_dose_rate_mgy_per_h", "max_dose_rate_mgy_per_h", "uncertainty_dose_rate_mgy_per_h",
                 "coverage", "spect_coverage_fraction", "ct_coverage_fraction", "automatic", "location", "size_note",
                 "source"]
    thresholds = sorted({x for r in rows for x in (r.get("v_gy") or {})}, key=float)
    header = flat_keys + [f"v{x}gy_ml" for x in thresholds] + [f"v{x}gy_pct" for x in thresholds]
    path = out_dir / REGION_OUTPUT_NAMES["regions_csv"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            v = r.get("v_gy") or {}
            w.writerow([r.get(k, "") if r.get(k) is not None else "" for k in flat_keys]
                       + [v.get(x, {}).get("ml", "") for x in thresholds] + [v.get(x, {}).get("pct", "") for x in thresholds])
    dvh_path = out_dir / REGION_OUTPUT_NAMES["dvh_csv"]
    with dvh_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["region", "quantity", "unit", "at_least", "volume_ml", "volume_pct"])
        for r in rows:
            for key, quantity, unit in (("dvh_gy", "absorbed_dose", "Gy"), ("dvh_dose_rate_mgy_per_h", "dose_rate", "mGy/h")):
                dvh = r.get(key)
                if not dvh:
                    continue
                total = dvh["volume_ml"][0] or 1.0
                for n, volume in enumerate(dvh["volume_ml"]):
                    w.writerow([r["region"], quantity, unit, f"{n * dvh['bin_width']:.6g}", volume, round(100 * volume / total, 3)])
    return {"regions_csv": path, "dvh_csv": dvh_path}


def write_region_outputs(
    out_dir: Path,
    regions: RegionSet,
    dose_gy: np.ndarray | None,
    dose_rate_gy_per_s: np.ndarray,
    ctx: RegionContext,
    *,
    method: str = "",
    dose_rate_sigma_gy_per_s: np.ndarray | None = None,
    dose_sigma_gy: np.ndarray | None = None,
    field_of_view: FieldOfView | None = None,
    accept_partial: bool = False,
    dose_method: str = "dvk",
    network_sha256: str | None = None,
) -> tuple[dict[str, Path], list[dict], dict]:
    """Statistics, CSVs, SEG/RTSTRUCT as needed, RT Dose with DVHs and the SR, written to ``out_dir``.

    ``field_of_view``: the SPECT volume, for each region's coverage (regions.region_statistics);
    ``accept_partial``: partly covered regions get statistics of their part inside;
    ``dose_method``, ``network_sha256``: the dose method and the weights that made the dose
    rate (learned methods), for the small-region note.

    Returns ``(outputs, rows, info)``: paths by output name, the per-region rows for
    summary.json, and the UIDs written (``info["uids"]``). The RT Dose at
    ``ctx.rtdose_path`` is read and rewritten as ``out_dir/rtdose.dcm`` with its DVHs under a
    new SOP Instance UID (same series): the DVHs are new content of the same dose. An RT Dose
    in memory (``ctx.rtdose``) gets its DVHs and new UID in place and is left to the caller to write.
    """
    out_dir = Path(out_dir)
    rows = region_statistics(
        dose_gy, dose_rate_gy_per_s, regions.masks, ctx.ct_grid.voxel_volume_ml,
        dose_rate_sigma_gy_per_s=dose_rate_sigma_gy_per_s, dose_sigma_gy=dose_sigma_gy, regions=regions.regions,
        ct_grid=ctx.ct_grid, field_of_view=field_of_view, accept_partial=accept_partial, method=dose_method,
        network_sha256=network_sha256)
    for row, r in zip(rows, regions.regions, strict=True):
        row.update(number=r.number, automatic=r.unreviewed, lesion=r.lesion, source=regions.source)
    outputs = _write_csvs(out_dir, rows)
    info: dict = {"uids": {}}

    # The SEG the SR points to.
    seg_ds = None
    if regions.source == "SEG":
        seg_uid, segment_numbers = regions.sop_instance_uid, [r.number for r in regions.regions]
    else:
        name = "autoseg" if regions.source == "automatic" else "regions_seg"
        description = f"Automatic hot spots (spectdose) - {UNREVIEWED}" if regions.source == "automatic" else \
            f"Regions from RTSTRUCT {regions.description}".strip()
        seg_ds = _build_seg(regions, ctx, description=description, method=method)
        outputs[name] = out_dir / REGION_OUTPUT_NAMES[name]
        seg_ds.save_as(outputs[name])
        seg_uid, segment_numbers = str(seg_ds.SOPInstanceUID), list(range(1, len(regions.regions) + 1))
        info["uids"][name] = {"series_instance_uid": str(seg_ds.SeriesInstanceUID), "sop_instance_uid": seg_uid}

    if (ctx.rtdose is None and ctx.rtdose_path is None) or dose_gy is None:
        return outputs, rows, info  # no RT Dose (a per-MBq run): statistics and SEG only

    # The RT Structure Set the DVHs reference.
    if regions.source == "RTSTRUCT":
        structure_set_uid, roi_numbers = regions.sop_instance_uid, [r.number for r in regions.regions]
    else:
        digest = _masks_digest(regions)
        rtstruct = build_rtstruct(
            regions.masks, ctx.ct_grid, ctx.header, ct_series_uid=ctx.ct_series_uid,
            ct_instance_uids=ctx.ct_instance_uids, sop_instance_uid=_uid("RTSTRUCT-instance", seg_uid, digest),
            series_instance_uid=_uid("RTSTRUCT-series", seg_uid, digest),
            label="AUTOHOTSPOTS" if regions.source == "automatic" else "REGIONS",
            source_segments={r.name: (seg_uid, n) for r, n in zip(regions.regions, segment_numbers, strict=True)},
            automatic=regions.source == "automatic",
            # An unreviewed automatic region is no GTV: its type stays empty (Type 2) until someone says what it is.
            interpreted_types={r.name: ("" if r.unreviewed else "GTV" if r.lesion else "ORGAN") for r in regions.regions},
            software_version=ctx.software_version,
            boxes={r.name: r.bounds()[0] for r in regions.regions},
        )
        outputs["regions_rtstruct"] = out_dir / REGION_OUTPUT_NAMES["regions_rtstruct"]
        rtstruct.save_as(outputs["regions_rtstruct"], enforce_file_format=True)
        structure_set_uid, roi_numbers = str(rtstruct.SOPInstanceUID), list(range(1, len(regions.regions) + 1))
        info["uids"]["regions_rtstruct"] = {"series_instance_uid": str(rtstruct.SeriesInstanceUID),
                                            "sop_instance_uid": structure_set_uid}

    rtdose = ctx.rtdose if ctx.rtdose is not None else pydicom.dcmread(ctx.rtdose_path)
    add_dvhs(rtdose, rows, roi_numbers, structure_set_uid)
    dvh_digest = hashlib.sha256(json.dumps([r["dvh_gy"] for r in rows]).encode()).hexdigest()
    rtdose.SOPInstanceUID = _uid("RTDOSE-DVH", str(rtdose.SOPInstanceUID), structure_set_uid, dvh_digest)
    rtdose.file_meta.MediaStorageSOPInstanceUID = rtdose.SOPInstanceUID
    if ctx.rtdose is None:
        outputs["rtdose"] = out_dir / "rtdose.dcm"
        rtdose.save_as(outputs["rtdose"], enforce_file_format=True)
    info["uids"]["rtdose"] = {"series_instance_uid": str(rtdose.SeriesInstanceUID),
                              "sop_instance_uid": str(rtdose.SOPInstanceUID)}

    if seg_ds is None:
        seg_ds = pydicom.dcmread(regions.path, stop_before_pixels=True)
    sr = _build_sr(rows, regions, seg_uid, segment_numbers, rtdose, seg_ds, ctx)
    outputs["sr"] = out_dir / REGION_OUTPUT_NAMES["sr"]
    sr.save_as(outputs["sr"])
    info["uids"]["sr"] = {"series_instance_uid": str(sr.SeriesInstanceUID), "sop_instance_uid": str(sr.SOPInstanceUID)}
    return outputs, rows, info

"""The PDF report as a DICOM Encapsulated PDF (PS3.3 A.45.1), for the PACS.

Same patient and study as the source (copied like the RT Dose's), a series of its own, and
UIDs derived from the content in the style of the RT Dose (:func:`derive_uid` over the
inputs' :func:`content_digest` and the PDF's own digest): an identical rerun is the identical
object, any change a new one. It references the RT Dose (or the dose-rate map) it reports on
in the Source Instance Sequence.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage

from spectdose.dicom._derived import file_meta
from spectdose.dicom.rtdose import (
    MANUFACTURER,
    add_patient_and_study,
    da_tm,
    derive_uid,
    software_version,
)
from spectdose.study import Study

__all__ = ["build_encapsulated_pdf", "write_encapsulated_pdf", "REPORT_TITLE", "REPORT_SERIES_NUMBER"]

REPORT_TITLE = "Lu-177 SPECT/CT dosimetry report"
REPORT_SERIES_NUMBER = 906
# Concept Name of the document: LOINC 18748-4 "Diagnostic Imaging Report", the first entry of
# DICOM CID 7000 "Diagnostic Imaging Report Document Titles" (PS3.16).
_CONCEPT = ("18748-4", "LN", "Diagnostic Imaging Report")


def build_encapsulated_pdf(
    pdf: bytes,
    study: Study,
    *,
    content_digest: str,
    sources: Sequence[tuple[str, str]] = (),
    title: str = REPORT_TITLE,
    created_at: dt.datetime | None = None,
) -> Dataset:
    """An Encapsulated PDF Storage instance holding ``pdf``.

    ``sources`` are the (SOP Class UID, SOP Instance UID) of the objects the report was made
    from (the RT Dose, the map); ``content_digest`` is the inputs' digest the RT Dose's UIDs
    come from.
    """
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("not a PDF document (no %PDF- header)")
    pdf_sha256 = hashlib.sha256(pdf).hexdigest()
    series_uid = derive_uid("REPORT-PDF-series", study, content_digest)
    sop_uid = derive_uid("REPORT-PDF-instance", study, content_digest, pdf_sha256)
    created_date, created_time = da_tm(created_at or dt.datetime.now())

    out = Dataset()
    out.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common
    out.SOPClassUID = EncapsulatedPDFStorage
    out.SOPInstanceUID = sop_uid
    out.InstanceCreationDate = created_date
    out.InstanceCreationTime = created_time
    # Patient, General Study
    add_patient_and_study(out, study)
    # Encapsulated Document Series
    out.Modality = "DOC"
    out.SeriesInstanceUID = series_uid
    out.SeriesNumber = REPORT_SERIES_NUMBER
    out.SeriesDescription = "Dosimetry report (spectdose)"
    # General Equipment, SC Equipment (WSD: made on a workstation, PS3.3 C.8.6.1)
    out.Manufacturer = MANUFACTURER
    out.ManufacturerModelName = MANUFACTURER
    out.SoftwareVersions = software_version()
    out.ConversionType = "WSD"
    # Encapsulated Document
    out.InstanceNumber = 1
    out.ContentDate = created_date
    out.ContentTime = created_time
    out.AcquisitionDateTime = created_date + created_time
    out.BurnedInAnnotation = "YES"  # the page carries the patient's name and ID
    out.DocumentTitle = title[:64]
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = _CONCEPT
    out.ConceptNameCodeSequence = [concept]
    out.VerificationFlag = "UNVERIFIED"
    if sources:
        items = []
        for class_uid, instance_uid in sources:
            item = Dataset()
            item.ReferencedSOPClassUID = class_uid
            item.ReferencedSOPInstanceUID = instance_uid
            items.append(item)
        out.SourceInstanceSequence = items
    out.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # OB values are padded to even length; the length attribute keeps the PDF's own size.
    out.EncapsulatedDocumentLength = len(pdf)
    out.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")

    out.file_meta = file_meta(EncapsulatedPDFStorage, sop_uid)
    return out


def write_encapsulated_pdf(path: str | os.PathLike, pdf: bytes, study: Study, **kwargs) -> Path:
    """:func:`build_encapsulated_pdf` written to ``path``."""
    ds = build_encapsulated_pdf(pdf, study, **kwargs)
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path

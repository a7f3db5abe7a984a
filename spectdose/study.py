"""What ingest hands to the rest of the pipeline: volumes plus the facts needed downstream."""

from __future__ import annotations

import dataclasses
import datetime as dt

from .geometry import Volume

__all__ = ["SeriesRef", "PatientInfo", "Administration", "Study"]


@dataclasses.dataclass(frozen=True)
class SeriesRef:
    """Identifies a source series so outputs can reference it (and be traced back)."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    series_description: str = ""
    series_number: int | None = None
    frame_of_reference_uid: str | None = None
    manufacturer: str = ""
    station_name: str = ""


@dataclasses.dataclass(frozen=True)
class PatientInfo:
    """Patient/study attributes copied verbatim into outputs. Never logged."""

    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""


@dataclasses.dataclass(frozen=True)
class Administration:
    """Radiopharmaceutical administration as recorded in the NM/PT header."""

    nuclide: str = "Lu-177"
    injected_activity_bq: float | None = None
    administration_datetime: dt.datetime | None = None
    radiopharmaceutical: str = ""


@dataclasses.dataclass
class Study:
    """A SPECT/CT study ready for dosimetry.

    ``ct`` is in Hounsfield units on the CT grid. ``spect`` holds activity concentration in
    Bq/ml at the acquisition start time (``spect.units == "Bq/ml"``) or, when the user asked
    for normalised output, a relative map that sums to 1 MBq over the field of view
    (``spect.units == "MBq-normalised"``), on the SPECT's own grid.
    """

    ct: Volume
    spect: Volume
    ct_series: SeriesRef
    spect_series: SeriesRef
    patient: PatientInfo
    administration: Administration
    acquisition_datetime: dt.datetime | None
    calibration_note: str
    warnings: list[str] = dataclasses.field(default_factory=list)
    ignored_files: list[tuple[str, str]] = dataclasses.field(default_factory=list)

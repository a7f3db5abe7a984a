"""What ingest hands to the rest of the pipeline: volumes plus the facts needed downstream."""

from __future__ import annotations

import dataclasses
import datetime as dt

from spectdose.geometry import Volume
from spectdose.option_names import option_hint, public_name

__all__ = ["SeriesRef", "PatientInfo", "Administration", "Study", "TimeFacts", "resolve_times"]


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
    # Radiopharmaceutical Start Time when the header carries no date for it (never completed by a guess).
    start_time_only: dt.time | None = None


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
    # Where acquisition_datetime came from: "acquisition" (the SPECT's Acquisition Date/Time),
    # "series" or "study" (their dates: not necessarily the acquisition), "" when unknown.
    acquisition_datetime_source: str = "acquisition"

    def resolve_times(self, **options) -> TimeFacts:
        """The time since administration from the header and the user's options; see :func:`resolve_times`."""
        return resolve_times(self.administration, self.acquisition_datetime, self.acquisition_datetime_source, **options)


@dataclasses.dataclass(frozen=True)
class TimeFacts:
    """The times the dose depends on, where each came from, and the assumptions made on the way."""

    hours: float | None
    administration: dt.datetime | None
    acquisition: dt.datetime | None
    source: str
    warnings: tuple[str, ...] = ()


def _hint(field: str) -> str:
    return option_hint(field)


def _accept_hint(name: str) -> str:
    return f"{public_name('accepted_assumptions', cli=True)} {name} (CLI) / {public_name('accepted_assumptions')}={name} (REST)"


def resolve_times(
    administration: Administration,
    acquisition_datetime: dt.datetime | None,
    acquisition_source: str,
    *,
    administration_datetime: dt.datetime | None = None,
    acquisition_given: dt.datetime | None = None,
    hours_after_administration: float | None = None,
    accepted: tuple[str, ...] | frozenset[str] = (),
    required: bool = True,
    single_study: bool = True,
) -> TimeFacts:
    """Hours from administration to the acquisition start, never from a guessed date.

    A fact is taken from the user's options (hours directly, or the date-times), else read
    unambiguously from the SPECT header. A Radiopharmaceutical Start Time without a date,
    an acquisition time known only from the series or study date, an administration at or
    after the acquisition, or a missing date refuse with the reason and the flag/field that
    supplies the fact, unless the assumption is listed in ``accepted`` (then a warning).
    With ``required=False`` (no time integration, e.g. a normalised map) nothing is refused.
    ``single_study=False`` (a time point of a cycle) leaves out the remedies a cycle refuses
    (the acquisition time and the hours since administration name one study's facts).

    Raises
    ------
    InputError
        the time since administration cannot be known without a guess.
    """
    from spectdose.errors import InputError

    warnings: list[str] = []
    if hours_after_administration is not None:
        hours = float(hours_after_administration)
        acquisition = acquisition_datetime if acquisition_source == "acquisition" else None
        admin = acquisition - dt.timedelta(hours=hours) if acquisition is not None else None
        return TimeFacts(hours, admin, acquisition, "hours after administration given", ())

    problems: list[str] = []
    acquisition, acq_from = acquisition_datetime, acquisition_source
    if acquisition_given is not None:
        if acquisition is not None and acq_from == "acquisition" and abs((acquisition - acquisition_given).total_seconds()) > 60:
            warnings.append(
                f"the acquisition start given ({acquisition_given.isoformat()}) replaces the header's "
                f"({acquisition.isoformat()})"
            )
        acquisition, acq_from = acquisition_given, "given"
    elif acquisition is not None and acq_from in ("series", "study"):
        name = "acquisition_time_from_series_or_study"
        if name in accepted:
            warnings.append(
                f"ASSUMED ({name}): the SPECT has no Acquisition Date/Time; its {acq_from} date/time "
                f"{acquisition.isoformat()} was used as the acquisition start"
            )
        else:
            problems.append(
                f"the SPECT has no Acquisition Date/Time and its {acq_from} date/time ({acquisition.isoformat()}) need "
                "not be the acquisition start (a reconstruction's series is often written hours later): "
                + (f"give {_hint('acquisition_datetime')}, or " if single_study else "")
                + f"allow it with {_accept_hint(name)}"
            )
            acquisition = None
    elif acquisition is None:
        problems.append(
            "the acquisition date is unknown (the SPECT header has no Acquisition, Series or Study Date: "
            + (
                f"de-identified?): give the acquisition start with {_hint('acquisition_datetime')}"
                if single_study
                else "de-identified?): a cycle takes each time point's acquisition from its header; send the study "
                "with its dates, or compute this time point alone (one study) with its acquisition time"
            )
        )

    admin = administration_datetime or administration.administration_datetime
    admin_from = "given" if administration_datetime is not None else "header"
    if admin is None and administration.start_time_only is not None:
        name = "administration_date_from_acquisition"
        clock = administration.start_time_only.isoformat(timespec="minutes")
        if name in accepted and acquisition is not None:
            admin = dt.datetime.combine(acquisition.date(), administration.start_time_only)
            if admin >= acquisition:
                admin -= dt.timedelta(days=1)
            admin_from = "assumed"
            warnings.append(
                f"ASSUMED ({name}): the header gives the administration time {clock} without a date; "
                f"{admin.isoformat()} was used (the last such time before the acquisition start). A wrong day "
                "changes the dose by a factor of up to several"
            )
        elif name not in accepted:
            problems.append(
                f"the SPECT header gives the administration time ({clock}, Radiopharmaceutical Start Time) but no "
                f"date, which is not guessed: give the administration date and time with "
                f"{_hint('administration_datetime')}, or allow taking it on the acquisition day with "
                f"{_accept_hint(name)}"
            )
    elif admin is None:
        problems.append(
            "the administration date-time is unknown (no Radiopharmaceutical Start DateTime in the SPECT): give "
            f"{_hint('administration_datetime')}"
        )
    if problems:
        if not required:
            return TimeFacts(None, admin, acquisition, "unknown", tuple(warnings))
        raise InputError(
            "time since administration unknown: "
            + "; ".join(problems)
            + (
                f". Or give the hours from administration to acquisition directly with {_hint('hours_after_administration')}"
                if single_study
                else ""
            )
        )
    if (admin.tzinfo is None) != (acquisition.tzinfo is None):
        # One carries a UTC offset (e.g. given as ISO with "+01:00"), the other is a header's local
        # time: compare wall-clock times, as ingest does with header offsets.
        admin, acquisition = admin.replace(tzinfo=None), acquisition.replace(tzinfo=None)
    hours = (acquisition - admin).total_seconds() / 3600.0
    if hours <= 0 and required:
        where = "given" if admin_from == "given" else "in the header"
        remedy = (
            f"check the header, or give {_hint('administration_datetime')} or {_hint('hours_after_administration')}"
            if single_study
            else "check this time point's Acquisition Date/Time and Radiopharmaceutical Start DateTime, or give the "
            f"administration with {_hint('administration_datetime')} (it applies to every time point of the cycle)"
        )
        raise InputError(
            f"the administration ({admin.isoformat()}, {where}) is not before the acquisition start "
            f"({acquisition.isoformat()}): {remedy}"
        )
    acq_words = {"given": "given", "acquisition": "from the header", "series": "from the series date", "study": "from the study date"}
    source = f"administration {'from the header' if admin_from == 'header' else admin_from}, acquisition {acq_words[acq_from]}"
    return TimeFacts(hours, admin, acquisition, source, tuple(warnings))

"""Response bodies of the REST API, separate from the database models.

They carry UIDs, AE titles, states and counts; patient attributes never leave the DICOM files.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, Field

from .db import ExportRecord, Job, RegionSetRecord

__all__ = ["ErrorOut", "ValidationErrorOut", "SubmitOut", "ExportOut", "JobOut", "JobListOut", "HealthOut", "ReadyOut", "job_out",
           "RegionSetOut", "RegionSetListOut", "region_set_out"]

JobStateName = Literal["received", "queued", "running", "done", "failed"]


class ErrorOut(BaseModel):
    detail: str = Field(description="why the request was refused, for a person to read")


class ValidationErrorOut(BaseModel):
    """422: a sentence from our own checks, or FastAPI's list of invalid parameters."""

    detail: str | list[dict[str, Any]]


class SubmitOut(BaseModel):
    job_id: str = Field(description="32 hexadecimal digits")
    state: JobStateName
    location: str = Field(description="URL of the job (also in the Location header)")
    files: int = Field(description="files stored for the job")
    ignored_files: int = Field(0, description="files in the upload that are not usable DICOM (listed by the core)")
    study_instance_uid: str | None = None
    duplicate: bool = Field(False, description="the same content with the same options has this job already "
                            "(HTTP 200); recompute=true makes a new one")


class ExportOut(BaseModel):
    destination: str
    kind: str
    sop_instance_uid: str
    state: Literal["pending", "sent", "failed"]
    attempts: int
    last_error: str | None = None
    sent_at: dt.datetime | None = None


class JobOut(BaseModel):
    job_id: str
    state: JobStateName
    stage: str | None = Field(None, description="pipeline stage while running (ingest, resample, density, dose_rate, export)")
    progress: float = Field(description="0..1")
    reason: str | None = Field(None, description="why the job failed, or why it was requeued")
    source: Literal["rest", "dicom"]
    submitted_by: str = Field(description="API token label (token:<hash>) or calling AE title")
    calling_aet: str | None = None
    study_instance_uid: str | None = None
    queue: str
    files: int
    attempt: int = Field(description="how many times a worker started the job")
    created_at: dt.datetime
    queued_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    options: dict = Field(description="the dose options (DoseOptions public names), site policy included")
    method: str | None = Field(None, description="dose-rate engine of the job (dvk or cnn)")
    warnings: list[str] = Field(default_factory=list, description="assumptions and caveats the result carries "
                                "(summary.json warnings); empty until done")
    region_warnings: list[str] = Field(default_factory=list, description="notes on the regions (automatic lesions, "
                                       "a region set that could not be used); they do not change the dose")
    provenance: dict | None = Field(None, description="software version, engine (network weights digest for the "
                                    "CNN), options key and output UIDs of the result")
    replaces: dict | None = Field(None, description="the earlier result of the study this one replaces (series, "
                                  "job, reason), when the study was computed before with other input or options")
    outputs: dict[str, str] = Field(default_factory=dict, description="output kind -> URL")
    exports: list[ExportOut] = Field(default_factory=list)


class JobListOut(BaseModel):
    total: int
    limit: int
    offset: int
    jobs: list[JobOut]


class HealthOut(BaseModel):
    status: Literal["ok"]
    version: str
    environment: str


class ReadyOut(BaseModel):
    status: Literal["ready", "not ready"]
    database: str
    broker: str


_OUTPUT_ROUTES = {"rtdose": "rtdose", "doserate": "doserate", "summary_json": "summary"}


def job_out(job: Job, exports: list[ExportRecord], base_url: str) -> JobOut:
    outputs = job.outputs or {}
    links = {route: f"{base_url}/jobs/{job.id}/{route}" for kind, route in _OUTPUT_ROUTES.items() if kind in outputs}
    if job.state == "done":  # region sets after the dose: POST a SEG/RTSTRUCT there, GET its versions
        links["regions"] = f"{base_url}/jobs/{job.id}/regions"
    options = job.options or {}
    result = job.result or {}
    replaces = job.replaces
    return JobOut(
        job_id=job.id,
        state=job.state,
        stage=job.stage,
        progress=round(job.progress or 0.0, 4),
        reason=job.reason,
        source=job.source,
        submitted_by=job.submitted_by,
        calling_aet=job.calling_aet,
        study_instance_uid=job.study_instance_uid,
        queue=job.queue,
        files=job.n_files,
        attempt=job.attempt,
        created_at=job.created_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        options=options,
        method=result.get("method") or options.get("method"),
        warnings=result.get("warnings", []),
        region_warnings=result.get("region_warnings", []),
        provenance={k: v for k, v in result.items() if k not in ("warnings", "region_warnings")} or None,
        replaces=replaces or None,
        outputs=links,
        exports=[
            ExportOut(
                destination=e.destination,
                kind=e.kind,
                sop_instance_uid=e.sop_instance_uid,
                state=e.state,
                attempts=e.attempts,
                last_error=e.last_error,
                sent_at=e.sent_at,
            )
            for e in exports
        ],
    )


class RegionSetOut(BaseModel):
    """A region set applied to a finished job: one version of its region outputs."""

    region_set_id: str
    job_id: str
    version: int = Field(description="1, 2, ... per job; its files are in regions/v<version>/ beside the result")
    state: JobStateName
    reason: str | None = Field(None, description="why it was refused or failed; the dose result is kept")
    source: Literal["rest", "dicom"]
    kind: Literal["SEG", "RTSTRUCT"]
    sop_instance_uid: str = Field(description="the region set received")
    created_at: dt.datetime
    finished_at: dt.datetime | None = None
    location: str = Field(description="URL of this region set")
    regions: list[dict] = Field(default_factory=list, description="per region: volume, mean/median/min/max, "
                                "D2/D50/D98 (Gy), mean dose rate (mGy/h)")
    warnings: list[str] = Field(default_factory=list, description="regions left out (empty, outside the CT), "
                                "a dose on a coarser grid")
    outputs: dict[str, dict] = Field(default_factory=dict, description="the new DICOM objects (SR, RT Dose with "
                                     "the DVHs, traced SEG or RT Structure Set): UIDs by kind")
    exports: list[ExportOut] = Field(default_factory=list, description="where the new objects were sent")


class RegionSetListOut(BaseModel):
    job_id: str
    region_sets: list[RegionSetOut]


def region_set_out(rec: RegionSetRecord, exports: list[ExportRecord], location: str) -> RegionSetOut:
    result = rec.result or {}
    outputs = result.get("outputs", {})
    ours = {e["sop_instance_uid"] for e in outputs.values()}
    return RegionSetOut(
        region_set_id=rec.id, job_id=rec.job_id, version=rec.version, state=rec.state, reason=rec.reason,
        source=rec.source, kind=rec.kind, sop_instance_uid=rec.sop_instance_uid, created_at=rec.created_at,
        finished_at=rec.finished_at, location=location, regions=result.get("regions", []),
        warnings=result.get("warnings", []), outputs=outputs,
        exports=[ExportOut(destination=e.destination, kind=e.kind, sop_instance_uid=e.sop_instance_uid, state=e.state,
                           attempts=e.attempts, last_error=e.last_error, sent_at=e.sent_at)
                 for e in exports if e.sop_instance_uid in ours],
    )

"""POST /studies: a SPECT/CT study in (zip, multipart files, or STOW-RS), a job id out."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response

from ..config import SENDER
from ..deps import Actor, Ctx
from ..intake import SubmitParams, receive_study
from ..schemas import ErrorOut, SubmitOut, ValidationErrorOut

router = APIRouter(prefix="/studies", tags=["studies"])

_BINARY = {"type": "string", "format": "binary"}
_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "The study's DICOM files: a zip archive (folders allowed), multipart/form-data file "
        "parts (DICOM files or zips), or a DICOMweb STOW-RS body (PS3.18 10.5) whose parts are "
        "application/dicom instances.",
        "content": {
            "application/zip": {"schema": _BINARY},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"files": {"type": "array", "items": _BINARY}}}
            },
            'multipart/related; type="application/dicom"': {"schema": _BINARY},
        },
    }
}
_ERRORS = {
    202: {"description": "stored; the job is queued (or received, if the broker is briefly unavailable)",
          "headers": {"Location": {"description": "URL of GET /jobs/{job_id}", "schema": {"type": "string"}}}},
    400: {"model": ErrorOut, "description": "not DICOM, truncated files, malformed body, or an unsafe archive"},
    401: {"model": ErrorOut, "description": "missing or invalid API token"},
    413: {"model": ErrorOut, "description": "over the upload or unpacked-size limit (zip bombs included)"},
    415: {"model": ErrorOut, "description": "unsupported Content-Type or STOW-RS part type"},
    422: {"model": ValidationErrorOut, "description": "DICOM, but not a SPECT/CT study (wrong modality, no CT, no SPECT), "
          "or invalid options"},
}


def submit_params(
    ctx: Ctx,
    method: Annotated[
        Literal["dvk", "cnn"] | None,
        Query(description="dose-rate engine (default: SPECTDOSE_DEFAULT_METHOD; the CNN once weights are installed)"),
    ] = None,
    time_model: Annotated[
        Literal["hanscheid", "physical", "effective"], Query(description="time integration model")
    ] = "hanscheid",
    effective_half_life_h: Annotated[float | None, Query(gt=0, description="for time_model=effective")] = None,
    administration_time: Annotated[dt.datetime | None, Query(description="override (ISO date-time)")] = None,
    normalised: Annotated[bool, Query(description="accept an uncalibrated SPECT; dose rate per MBq")] = False,
    sensitivity_cps_per_mbq: Annotated[float | None, Query(gt=0, description="camera sensitivity")] = None,
    spect_series: Annotated[str | None, Query(description="SeriesInstanceUID of the SPECT to use")] = None,
    ct_series: Annotated[str | None, Query(description="SeriesInstanceUID of the CT to use")] = None,
    export: Annotated[
        list[str],
        Query(description="AE titles of configured peers (SPECTDOSE_PEERS) to C-STORE the results to; "
              "'default' for the configured export destinations"),
    ] = [],  # noqa: B006 - FastAPI copies query defaults
) -> SubmitParams:
    if time_model == "effective" and effective_half_life_h is None:
        raise HTTPException(422, "time_model=effective needs effective_half_life_h")
    method = method or ctx.settings.resolved_method
    peers = ctx.settings.peer_map
    destinations: list[str] = []
    for name in export:
        if name == "default":
            destinations += [d for d in ctx.settings.export if d != SENDER]
        elif name in peers:
            destinations.append(name)
        else:
            raise HTTPException(422, f"export destination {name!r} is not a configured peer (SPECTDOSE_PEERS)")
    options = {
        "method": method,
        "time_model": time_model,
        "effective_half_life_h": effective_half_life_h,
        "administration_time": administration_time.isoformat() if administration_time else None,
        "normalised": normalised,
        "sensitivity_cps_per_mbq": sensitivity_cps_per_mbq,
        "spect_series": spect_series,
        "ct_series": ct_series,
    }
    return SubmitParams({k: v for k, v in options.items() if v not in (None, False)} | {"method": method},
                        destinations)


@router.post(
    "",
    status_code=202,
    response_model=SubmitOut,
    responses=_ERRORS,
    openapi_extra=_REQUEST_BODY,
    summary="Submit a SPECT/CT study",
    description="Stores the study durably, then queues a dose calculation. Answers 202 with the job id and "
    "a Location header pointing at GET /jobs/{job_id}.",
)
async def submit_study(
    request: Request, response: Response, ctx: Ctx, actor: Actor, params: Annotated[SubmitParams, Depends(submit_params)]
) -> SubmitOut:
    accepted = await receive_study(request, ctx, actor, params)
    location = f"{ctx.settings.public_url.rstrip('/')}/jobs/{accepted.job_id}" if ctx.settings.public_url else str(
        request.url_for("get_job", job_id=accepted.job_id))
    response.headers["Location"] = location
    return SubmitOut(
        job_id=accepted.job_id,
        state=ctx.store.get(accepted.job_id).state,
        location=location,
        files=accepted.files,
        ignored_files=accepted.ignored_files,
        study_instance_uid=accepted.study_instance_uid,
    )

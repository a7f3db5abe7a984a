"""POST /studies: a SPECT/CT study in (zip, multipart files, or STOW-RS), a job id out.

The query fields are the public names of :class:`spectdose.pipeline.DoseOptions`; they are
validated by building it, and the job stores its ``to_dict()``. A STOW-RS request
(``multipart/related; type="application/dicom"``) is answered with the PS3.18 Store
Instances Response (``application/dicom+json``, 200/202/409); zip and form uploads with JSON.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

from ..config import SENDER
from ..cycles import CYCLE_ID_PATTERN
from ..deps import Actor, Ctx, public_base_url
from ..intake import Accepted, SubmitParams, UploadRejected, receive_study
from ..jobs import InstanceDigest
from ..schemas import ErrorOut, SubmitOut, ValidationErrorOut

log = logging.getLogger("spectdose.service.gateway")

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
_LOCATION = {"Location": {"description": "URL of GET /jobs/{job_id}", "schema": {"type": "string"}}}
_STORE_RESPONSE = {"application/dicom+json": {"schema": {"type": "object"}}}
_ERRORS = {
    200: {"description": "the same content with the same options was submitted before: the existing job "
          "(recompute=true computes again). STOW-RS: every instance stored (PS3.18 Store Instances Response)",
          "headers": _LOCATION, "content": _STORE_RESPONSE},
    202: {"description": "stored; the job is queued (or received, if the broker is briefly unavailable). "
          "STOW-RS: stored, but some parts were not DICOM instances (Failed SOP / Other Failures Sequence)",
          "headers": _LOCATION, "content": _STORE_RESPONSE},
    409: {"description": "STOW-RS only: DICOM, but not a SPECT/CT study; nothing stored (Failed SOP Sequence, "
          "the reason in the Warning header)", "content": _STORE_RESPONSE},
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
        Literal["dvk", "cnn", "dvk-rr"] | None,
        Query(description="dose-rate engine (default: SPECTDOSE_DEFAULT_METHOD, dvk like the CLI); dvk-rr: DVK on "
              "the resolution-recovered SPECT (docs/network.md)"),
    ] = None,
    time_model: Annotated[
        Literal["hanscheid", "physical", "effective", "none"] | None,
        Query(description="time integration model (default SPECTDOSE_DEFAULT_TIME_MODEL, hanscheid); none: the "
              "dose-rate map only (a time point of a cycle)")
    ] = None,
    effective_half_life_h: Annotated[float | None, Query(gt=0, description="for time_model=effective")] = None,
    administration_time: Annotated[
        dt.datetime | None, Query(description="administration date-time (ISO), overrides the header")] = None,
    acquisition_time: Annotated[
        dt.datetime | None, Query(description="acquisition date-time (ISO), e.g. for de-identified data")] = None,
    hours_after_administration: Annotated[
        float | None, Query(gt=0, description="time from administration to acquisition, instead of date-times")
    ] = None,
    density_curve: Annotated[
        str | None, Query(description="CT calibration curve by name (schneider2000, bilinear)")] = None,
    kernel_medium: Annotated[str | None, Query(description="kernel medium (soft, water, bone, lung)")] = None,
    normalised: Annotated[bool, Query(description="accept an uncalibrated SPECT; dose rate per MBq")] = False,
    sensitivity_cps_per_mbq: Annotated[float | None, Query(gt=0, description="camera sensitivity")] = None,
    spect_series: Annotated[str | None, Query(description="SeriesInstanceUID of the SPECT to use")] = None,
    ct_series: Annotated[str | None, Query(description="SeriesInstanceUID of the CT to use")] = None,
    energy_window: Annotated[
        float | None, Query(gt=0, description="photopeak (keV) of the window to use in a multi-window SPECT")] = None,
    dose_grid: Annotated[str | None, Query(description="output grid: ct (default), spect, or a spacing in mm")] = None,
    accept: Annotated[
        list[str],
        Query(description="assumptions to allow for this job (each refused by default; repeatable); the site's "
              "SPECTDOSE_ACCEPT is added"),
    ] = [],  # noqa: B006 - FastAPI copies query defaults
    calling_aet: Annotated[
        str | None, Query(max_length=16, description="AE title whose camera calibration applies")] = None,
    bf16: Annotated[bool, Query(description="CNN in bfloat16 (GPU)")] = False,
    uncertainty: Annotated[
        bool | None,
        Query(description="with method=cnn: a calibrated 1-sigma map from the deep ensemble (GET /jobs/{id}/uncertainty) "
              "and a sigma per region (default: SPECTDOSE_DEFAULT_UNCERTAINTY, auto = for CNN jobs once the ensemble "
              "is installed)"),
    ] = None,
    map_precision: Annotated[
        str | None,
        Query(description="dose-rate maps: auto (16-bit JPEG-LS where the quoted means allow, else float32) or float32 "
              "(always float: dcmqi and 3D Slicer read only float Parametric Maps)"),
    ] = None,
    recompute: Annotated[
        bool, Query(description="compute again even if the same content with the same options has a job")] = False,
    export: Annotated[
        list[str],
        Query(description="AE titles of configured peers (SPECTDOSE_PEERS) to C-STORE the results to; "
              "'default' for the configured export destinations"),
    ] = [],  # noqa: B006 - FastAPI copies query defaults
    cycle_id: Annotated[str | None, Query(max_length=64, description="therapy cycle this study is a time point of "
                                          "(else grouped by PatientID and administration; GET /cycles/{id})")] = None,
) -> SubmitParams:
    from spectdose.density import CURVES
    from spectdose.errors import InputError
    from spectdose.kernels import MEDIA
    from spectdose.pipeline import DoseOptions

    if density_curve is not None and density_curve not in CURVES:  # by name only: no server paths over REST
        raise HTTPException(422, f"density_curve must be one of {', '.join(sorted(CURVES))}, got {density_curve!r}")
    if kernel_medium is not None and kernel_medium not in MEDIA:
        raise HTTPException(422, f"kernel_medium must be one of {', '.join(MEDIA)}, got {kernel_medium!r}")
    peers = ctx.settings.peer_map
    destinations: list[str] = []
    for name in export:
        if name == "default":
            destinations += [d for d in ctx.settings.export if d != SENDER]
        elif name in peers:
            destinations.append(name)
        else:
            raise HTTPException(422, f"export destination {name!r} is not a configured peer (SPECTDOSE_PEERS)")
    method = method or ctx.settings.resolved_method
    if uncertainty is None:  # the site's default; an explicit true/false wins (true with dvk is refused below)
        uncertainty = ctx.settings.resolved_uncertainty(method)
    public = {
        "method": method,
        "time_model": time_model or ctx.settings.default_time_model,
        "effective_half_life_h": effective_half_life_h,
        "administration_time": administration_time.isoformat() if administration_time else None,
        "acquisition_time": acquisition_time.isoformat() if acquisition_time else None,
        "hours_after_administration": hours_after_administration,
        "density_curve": density_curve,
        "kernel_medium": kernel_medium,
        "normalised": normalised,
        "sensitivity_cps_per_mbq": sensitivity_cps_per_mbq,
        "spect_series": spect_series,
        "ct_series": ct_series,
        "energy_window": energy_window,
        "dose_grid": dose_grid,
        "accept": sorted(set(accept) | set(ctx.settings.accepted_assumptions())),
        "calling_aet": calling_aet,
        "bf16": bf16,
        "uncertainty": uncertainty,
        "map_precision": map_precision,
    }
    try:
        options = DoseOptions.from_dict(public)
    except InputError as exc:
        raise HTTPException(422, str(exc)) from exc
    if cycle_id is not None and not CYCLE_ID_PATTERN.match(cycle_id):  # service.cycles.check_cycle_id's rule
        raise HTTPException(422, f"cycle_id must be 1-64 letters, digits, '.', '_' or '-', got {cycle_id!r}")
    return SubmitParams(options.to_dict(), destinations, recompute, cycle_id=cycle_id)


def _element(vr: str, *values) -> dict:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def _sop_ref(item: InstanceDigest) -> dict:
    return {"00081150": _element("UI", item.sop_class_uid), "00081155": _element("UI", item.sop_instance_uid)}


# PS3.18 Table I.2-2 Failure Reason values used here.
_CANNOT_UNDERSTAND = 0xC000
_PROCESSING_FAILURE = 0x0110


def store_response(instances: tuple[InstanceDigest, ...], *, stored: bool, failure_reason: int = _PROCESSING_FAILURE
                   ) -> tuple[dict, int]:
    """The PS3.18 Store Instances Response Module (Annex I) as DICOM JSON, and its HTTP status.

    ``stored``: the instances were kept (as a job's input). Parts that are not DICOM
    instances are failures: in the Failed SOP Sequence when they carry SOP UIDs, else in
    the Other Failures Sequence. No Retrieve URL: this service offers no WADO-RS (type 2,
    present and empty).
    """
    dicom = [i for i in instances if i.sop_instance_uid and i.sop_class_uid]
    other = [i for i in instances if not (i.sop_instance_uid and i.sop_class_uid)]
    failed = [] if stored else dicom
    referenced = dicom if stored else []
    out: dict = {"00081190": _element("UR")}
    if failed:
        out["00081198"] = {"vr": "SQ", "Value": [
            _sop_ref(i) | {"00081197": _element("US", failure_reason)} for i in failed]}
    if other:
        out["0008119A"] = {"vr": "SQ", "Value": [{"00081197": _element("US", _CANNOT_UNDERSTAND)} for _ in other]}
    if referenced:
        out["00081199"] = {"vr": "SQ", "Value": [_sop_ref(i) | {"00081190": _element("UR")} for i in referenced]}
    if not referenced:
        status = 409
    elif failed or other:
        status = 202
    else:
        status = 200
    return out, status


def _is_stow(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "multipart/related"


def _warning_header(text: str) -> str:
    """An RFC 7234 Warning header value (PS3.18 8.4.4), ASCII-only."""
    clean = text.encode("ascii", "replace").decode().replace('"', "'").replace("\r", " ").replace("\n", " ")
    return f'299 spectdose "{clean[:500]}"'


@router.post(
    "",
    status_code=202,
    response_model=SubmitOut,
    responses=_ERRORS,
    openapi_extra=_REQUEST_BODY,
    summary="Submit a SPECT/CT study",
    description="Stores the study durably, then queues a dose calculation. Answers 202 with the job id and "
    "a Location header pointing at GET /jobs/{job_id}; 200 with the existing job when the same content with the "
    "same options was submitted before (unless recompute=true). A STOW-RS request gets the PS3.18 store "
    "response (application/dicom+json): 200 all stored, 202 stored with failures for some parts, 409 none stored.",
)
async def submit_study(
    request: Request, response: Response, ctx: Ctx, actor: Actor, params: Annotated[SubmitParams, Depends(submit_params)]
):
    stow = _is_stow(request)
    try:
        accepted = await receive_study(request, ctx, actor, params)
    except UploadRejected as exc:
        if not (stow and exc.status_code == 422 and exc.instances):
            raise
        body, status = store_response(exc.instances, stored=False)
        return JSONResponse(body, status_code=status, media_type="application/dicom+json",
                            headers={"Warning": _warning_header(exc.detail)})
    location = f"{public_base_url(request, ctx)}/jobs/{accepted.job_id}"  # never from the Host header
    if stow:
        body, status = store_response(accepted.instances, stored=True)
        headers = {"Location": location, "X-Job-Id": accepted.job_id}
        if accepted.duplicate:
            headers["Warning"] = _warning_header(f"same content and options as job {accepted.job_id}: not computed "
                                                 "again (recompute=true computes again)")
        return JSONResponse(body, status_code=status, media_type="application/dicom+json", headers=headers)
    response.headers["Location"] = location
    if accepted.duplicate:
        response.status_code = 200
    return _submit_out(ctx, accepted, location)


def _submit_out(ctx, accepted: Accepted, location: str) -> SubmitOut:
    return SubmitOut(
        job_id=accepted.job_id,
        state=ctx.store.get(accepted.job_id).state,
        location=location,
        files=accepted.files,
        ignored_files=accepted.ignored_files,
        study_instance_uid=accepted.study_instance_uid,
        duplicate=accepted.duplicate,
    )

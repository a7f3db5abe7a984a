"""GET /jobs, /jobs/{job_id} and the job's outputs (RT Dose, dose-rate map, summary, PDF report)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from ..deps import Actor, Ctx, ServiceContext, job_or_404, public_base_url
from ..schemas import ErrorOut, JobListOut, JobOut, job_out

router = APIRouter(prefix="/jobs", tags=["jobs"])

_AUTH = {401: {"model": ErrorOut, "description": "missing or invalid API token"}}
_NOT_FOUND = {404: {"model": ErrorOut, "description": "no such job, or the job has no such output"}}
_NOT_READY = {409: {"model": ErrorOut, "description": "the job has not finished computing yet"}}
_DICOM = {"content": {"application/dicom": {"schema": {"type": "string", "format": "binary"}}}}


# Why an output a client asks for can be missing from a finished job.
_WHY_ABSENT = {
    "doserate_sigma": "the job ran without the uncertainty map: uncertainty=false, method dvk, or no "
    "DblurDoseNet ensemble installed (SPECTDOSE_DEFAULT_UNCERTAINTY)",
}


def _output_path(ctx: ServiceContext, job_id: str, kind: str):
    """The file of output ``kind``, or 404/409 saying why there is none."""
    job = job_or_404(ctx, job_id)
    manifest = ctx.storage.output_manifest(job_id)
    if manifest is None:
        if job.state in ("done", "failed"):
            raise HTTPException(404, f"job {job_id} has no outputs ({job.state}: {job.reason or 'no reason recorded'})")
        where = f", stage {job.stage}" if job.stage else ""
        raise HTTPException(409, f"job {job_id} is {job.state}{where} ({100 * (job.progress or 0):.0f} %): "
                                 "outputs are not ready yet")
    entry = manifest["files"].get(kind)
    if entry is None:
        raise HTTPException(404, f"job {job_id} produced no {kind} ({_WHY_ABSENT.get(kind, 'e.g. no RT Dose for a normalised SPECT')})")
    return ctx.storage.job_output(job_id) / entry["file"]


@router.get("", response_model=JobListOut, responses=_AUTH, summary="List jobs, newest first")
def list_jobs(
    request: Request,
    ctx: Ctx,
    _actor: Actor,
    state: Annotated[Literal["received", "queued", "running", "done", "failed"] | None, Query()] = None,
    source: Annotated[Literal["rest", "dicom"] | None, Query()] = None,
    calling_aet: Annotated[str | None, Query(max_length=16)] = None,
    study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[dt.datetime | None, Query(description="created at or after (UTC)")] = None,
    until: Annotated[dt.datetime | None, Query(description="created before (UTC)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobListOut:
    def naive_utc(t: dt.datetime | None) -> dt.datetime | None:
        return t.astimezone(dt.UTC).replace(tzinfo=None) if t is not None and t.tzinfo else t

    jobs, total = ctx.store.list_jobs(
        state=state, source=source, calling_aet=calling_aet, study_instance_uid=study_instance_uid,
        since=naive_utc(since), until=naive_utc(until), limit=limit, offset=offset,
    )
    base = public_base_url(request, ctx)
    exports = ctx.store.exports_for([j.id for j in jobs])
    return JobListOut(total=total, limit=limit, offset=offset, jobs=[job_out(j, exports[j.id], base) for j in jobs])


@router.get("/{job_id}", response_model=JobOut, responses=_AUTH | _NOT_FOUND, summary="A job's state")
def get_job(request: Request, ctx: Ctx, _actor: Actor, job_id: str) -> JobOut:
    job = job_or_404(ctx, job_id)
    return job_out(job, ctx.store.exports_of(job_id), public_base_url(request, ctx))


_PDF = {"content": {"application/pdf": {"schema": {"type": "string", "format": "binary"}}}}

# The result files a client fetches: route, output kind (the manifest's key), media type, what it is.
RESULT_FILES = (
    ("rtdose", "rtdose", "application/dicom", "The RT Dose (absorbed dose, Gy) as a DICOM file"),
    ("doserate", "doserate", "application/dicom", "The dose-rate Parametric Map (mGy/h) as a DICOM file"),
    ("uncertainty", "doserate_sigma", "application/dicom",
     "The 1-sigma uncertainty of the dose rate (Parametric Map, mGy/h; CNN jobs with the ensemble installed "
     "unless uncertainty=false, see SPECTDOSE_DEFAULT_UNCERTAINTY)"),
    ("report", "report", "application/pdf",
     "The PDF report to sign (identifiers, administration, method, maxima, key images, every region's DVH and row)"),
)


def _asked_syntaxes(accept: str) -> tuple[list[str], bool]:
    """The transfer syntaxes an Accept header names for application/dicom (PS3.18 8.7.3.5:
    ``application/dicom; transfer-syntax=UID``), in its order, and whether it also takes the file as
    stored (application/dicom without the parameter, ``transfer-syntax=*``, or any type)."""
    asked, as_stored = [], not accept.strip()
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        if media in ("*/*", "application/*"):
            as_stored = True
        if media != "application/dicom":
            continue
        values = [p.split("=", 1)[1].strip().strip('"') for p in params if p.lower().startswith("transfer-syntax=")]
        if not values or values[0] == "*":
            as_stored = True
        else:
            asked.append(values[0])
    return asked, as_stored


def _dicom_in_asked_syntax(path, accept: str, filename: str):
    """The stored object, or the same instance re-encoded losslessly in a transfer syntax the client
    asked for in Accept (JPEG-LS takes a 16-bit clinical RT Dose from 68 MB to about 5 MB); 406
    when it asked only for syntaxes this object cannot be given in. Stored files stay as written
    (plastimatch, for one, reads no JPEG-LS RT Dose)."""
    import io

    import pydicom

    from spectdose.dicom.transfer import UNCOMPRESSED, encode_for, syntaxes_for

    asked, as_stored = _asked_syntaxes(accept)
    if not asked:
        return None
    header = pydicom.dcmread(path, stop_before_pixels=True)
    stored = str(header.file_meta.TransferSyntaxUID)
    offered = [*syntaxes_for(header), *([stored] if stored not in UNCOMPRESSED else [])]
    for uid in asked:
        if uid == stored:
            return None
        if uid in offered:
            out = io.BytesIO()
            encode_for(pydicom.dcmread(path), uid).save_as(out, enforce_file_format=True)
            return Response(out.getvalue(), media_type=f"application/dicom; transfer-syntax={uid}",
                            headers={"Content-Disposition": f'attachment; filename="{filename}"'})
    if as_stored:
        return None
    raise HTTPException(406, f"this object can be sent in the transfer syntaxes {', '.join(offered)} "
                             f"(stored: {stored}), not {', '.join(asked)}")


def _result_file_route(route: str, kind: str, media_type: str, summary: str) -> None:
    suffix = ".pdf" if media_type == "application/pdf" else ".dcm"

    def get_result_file(request: Request, ctx: Ctx, _actor: Actor, job_id: str) -> Response:
        path, filename = _output_path(ctx, job_id, kind), f"{job_id}-{route}{suffix}"
        if suffix == ".dcm":
            encoded = _dicom_in_asked_syntax(path, request.headers.get("accept", ""), filename)
            if encoded is not None:
                return encoded
        return FileResponse(path, media_type=media_type, filename=filename)

    router.add_api_route(
        f"/{{job_id}}/{route}", get_result_file, methods=["GET"], response_class=FileResponse, name=f"get_{route}",
        summary=summary + ("" if suffix == ".pdf" else "; in a lossless transfer syntax the Accept header names "
                           "(application/dicom; transfer-syntax=1.2.840.10008.1.2.4.80 for JPEG-LS), as stored else"),
        responses=_AUTH | _NOT_FOUND | _NOT_READY | {200: _PDF if suffix == ".pdf" else _DICOM}
        | ({} if suffix == ".pdf" else {406: {"model": ErrorOut, "description": "no asked transfer syntax suits"}}),
    )


for _route in RESULT_FILES:
    _result_file_route(*_route)


@router.get(
    "/{job_id}/summary",
    responses=_AUTH | _NOT_FOUND | _NOT_READY | {
        200: {"content": {"application/json": {"schema": {"type": "object"}}, "text/plain": {"schema": {"type": "string"}}},
              "description": "summary.json (default) or summary.txt (format=text)"}},
    summary="The dosimetry summary (JSON, or text with format=text)",
)
def get_summary(ctx: Ctx, _actor: Actor, job_id: str,
                format: Annotated[Literal["json", "text"], Query()] = "json"):  # noqa: A002 - the query name
    if format == "text":
        return PlainTextResponse(_output_path(ctx, job_id, "summary_txt").read_text())
    return JSONResponse(json.loads(_output_path(ctx, job_id, "summary_json").read_text()))

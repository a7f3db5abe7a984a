"""POST /jobs/{job_id}/regions: a region set (SEG or RT Structure Set) for a finished job; its versions.

The statistics are computed again on the stored dose by a worker (no dose recomputed); each
set is one version of the region outputs beside the result, sent to the PACS as new
objects. Refusals store nothing and say why: 404 unknown job, 409 job not finished, 400 not
readable DICOM, 415 not a region set, 422 drawn on another CT (frame of reference) or regions
sharing one label.
"""

from __future__ import annotations

import datetime as dt
import logging

from fastapi import APIRouter, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from ..db import utcnow
from ..deps import Actor, Ctx, ServiceContext, job_or_404, public_base_url
from ..diskguard import DISK_FULL_NAME, is_disk_full
from ..intake import UploadRejected, accept_region_set, publish_region_set, spooled_request_body
from ..schemas import ErrorOut, RegionSetListOut, RegionSetOut, region_set_out

log = logging.getLogger("spectdose.service.gateway")

router = APIRouter(prefix="/jobs", tags=["regions"])

_REPUBLISH_AFTER = dt.timedelta(seconds=5)  # a set just stored is being published by its request
_MEDIA = ("application/dicom", "application/octet-stream", "")
_REQUEST_BODY = {"requestBody": {"required": True, "description": "one DICOM SEG or RT Structure Set file, drawn "
                                 "on the job's CT (its frame of reference)",
                                 "content": {"application/dicom": {"schema": {"type": "string", "format": "binary"}}}}}
_ERRORS = {
    200: {"model": RegionSetOut, "description": "the same file was applied to the job before: that version"},
    400: {"model": ErrorOut, "description": "not a readable DICOM file (or an empty body)"},
    401: {"model": ErrorOut, "description": "missing or invalid API token"},
    404: {"model": ErrorOut, "description": "no such job (or region set version)"},
    409: {"model": ErrorOut, "description": "the job has not finished (or failed): no dose to report regions on"},
    413: {"model": ErrorOut, "description": "over the upload limit"},
    507: {"model": ErrorOut, "description": "the server's disk is nearly full: nothing stored, retry later"},
    415: {"model": ErrorOut, "description": "not a DICOM SEG or RT Structure Set, or not application/dicom"},
    422: {"model": ErrorOut, "description": "drawn on another frame of reference than the job's CT, or regions "
          "sharing one label"},
    503: {"model": ErrorOut, "description": "stored, but the queue is unavailable: send the same file again"},
}


def _out(request: Request, ctx: ServiceContext, rec) -> RegionSetOut:
    location = f"{public_base_url(request, ctx)}/jobs/{rec.job_id}/regions/{rec.version}"
    return region_set_out(rec, ctx.store.exports_of(rec.job_id), location)


def _refuse_shared_labels(path) -> None:
    """422 for a set whose regions share a label (read from the header, before anything is stored):
    the core refuses it too, but only once a worker reads it; the client hears it now."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SegmentSequence", "StructureSetROISequence"])
    except Exception:  # noqa: BLE001 - not readable: accept_region_set says so (400)
        return
    labels = [str(item.get("SegmentLabel", "")) for item in ds.get("SegmentSequence", []) or []]
    labels += [str(item.get("ROIName", "")) for item in ds.get("StructureSetROISequence", []) or []]
    shared = sorted({x for x in labels if x and labels.count(x) > 1})
    if shared:
        raise UploadRejected(422, f"region set refused, the dose result is kept: {labels.count(shared[0])} regions "
                                  f"share the label {shared[0]!r}; each region needs a label of its own")


@router.post("/{job_id}/regions", status_code=202, response_model=RegionSetOut, responses=_ERRORS,
             openapi_extra=_REQUEST_BODY, summary="Regions after the dose: a SEG or RT Structure Set for a finished job")
async def post_regions(request: Request, response: Response, ctx: Ctx, actor: Actor, job_id: str) -> RegionSetOut:
    job = job_or_404(ctx, job_id)
    settings = ctx.settings
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in _MEDIA:
        raise UploadRejected(415, f"send one DICOM file as application/dicom, not {media!r}")
    try:
        async with spooled_request_body(request, ctx, "regions.dcm") as (_, body):
            await run_in_threadpool(_refuse_shared_labels, body)
            accepted = await run_in_threadpool(accept_region_set, ctx.store, ctx.storage, ctx.enqueuer, job, body,
                                               source="rest", submitted_by=actor)
    except UploadRejected as exc:
        ctx.store.audit(actor, "region_set_refused", job_id=job_id, status=exc.status_code, why=exc.detail[:300])
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise UploadRejected(507, f"{DISK_FULL_NAME}; nothing was stored, retry in {settings.disk_retry_after_s} s",
                             headers={"Retry-After": str(settings.disk_retry_after_s)}) from exc
    rec = ctx.store.region_set(accepted.region_set_id)
    out = _out(request, ctx, rec)
    response.headers["Location"] = out.location
    if not accepted.queued:
        raise HTTPException(503, f"region set stored as version {rec.version} of job {job_id}, but the queue is "
                                 "unavailable: send the same file again to queue it (or poll it: polling queues it)",
                            headers={"Retry-After": "10", "Location": out.location})
    if not accepted.created:
        response.status_code = 200
    log.info("job %s: region set %s received from %s (version %d)", job_id, rec.id, actor, rec.version)
    return out


@router.get("/{job_id}/regions", response_model=RegionSetListOut, responses={k: _ERRORS[k] for k in (401, 404)},
            summary="The region sets applied to a job after the dose, oldest first")
def list_regions(request: Request, ctx: Ctx, _actor: Actor, job_id: str) -> RegionSetListOut:
    job_or_404(ctx, job_id)
    return RegionSetListOut(job_id=job_id, region_sets=[_out(request, ctx, r) for r in ctx.store.region_sets_of(job_id)])


@router.get("/{job_id}/regions/{version}", response_model=RegionSetOut, responses={k: _ERRORS[k] for k in (401, 404)},
            summary="One version of a job's region outputs (poll it after POST)")
def get_region_version(request: Request, ctx: Ctx, _actor: Actor, job_id: str, version: int) -> RegionSetOut:
    job = job_or_404(ctx, job_id)
    for rec in ctx.store.region_sets_of(job_id):
        if rec.version == version:
            if rec.state == "received" and utcnow() - rec.created_at > _REPUBLISH_AFTER:
                # stored while the queue was down: polling it puts it on the queue (as re-sending would)
                publish_region_set(ctx.store, ctx.enqueuer, rec.id, job.queue)
                rec = ctx.store.region_set(rec.id)
            return _out(request, ctx, rec)
    raise HTTPException(404, f"job {job_id} has no region set version {version}")

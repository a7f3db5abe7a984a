"""Therapy cycles: GET /cycles, /cycles/{id}, /cycles/{id}/rtdose, POST /cycles/{id}/integrate,
and GET /patients/{id}/cumulative (cumulative kidney, marrow and lesion doses with the kidney limits).

Patient IDs are PHI: the cumulative route takes one in its path, looks up its hash and logs
nothing of it (the gateway's logs name routes, not paths with IDs; see docs/service.md).
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Path, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from .. import cycles
from ..deps import Actor, Ctx
from ..schemas import ErrorOut

router = APIRouter(tags=["cycles"])

_PATIENT_PATH = re.compile(r"/patients/[^/?\s]+")


class _RedactPatientPaths(logging.Filter):
    """uvicorn's access log prints request paths: the PatientID of /patients/{id}/... becomes ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_PATIENT_PATH.sub("/patients/***", a) if isinstance(a, str) else a
                                for a in record.args)
        if isinstance(record.msg, str):
            record.msg = _PATIENT_PATH.sub("/patients/***", record.msg)
        return True


def _redact_access_log() -> None:
    """Idempotent: on import and again per request (uvicorn's logging set-up keeps filters, but be sure)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactPatientPaths) for f in logger.filters):
            logger.addFilter(_RedactPatientPaths())


_redact_access_log()

_AUTH = {401: {"model": ErrorOut, "description": "missing or invalid API token"}}
_NOT_FOUND = {404: {"model": ErrorOut, "description": "no such cycle (or patient), or no such output"}}
_NOT_READY = {409: {"model": ErrorOut, "description": "no finished cycle result yet"}}
_DICOM = {"content": {"application/dicom": {"schema": {"type": "string", "format": "binary"}}},
          "description": "the newest cycle RT Dose (Gy), integrated over the time points it names"}
_CYCLE = {200: {"description": "the cycle: state (collecting, pending, integrating, integrated, failed), its time "
                "points (joined, rejected with the reason, replaced, pending) and its results (newest first; "
                "older ones superseded)"}}
_CumulativeDoc = {200: {"description": "per region (kidneys, red marrow, lesions): absorbed dose and BED summed "
                        "over the patient's cycles, each cycle's share, and the kidney limits flagged "
                        "(23 Gy absorbed, Emami et al. 1991; 28 Gy BED, Bodei et al. 2008)"}}

CycleId = Annotated[str, Path(max_length=64, description="a cycle id (the client's cycle_id, or derived)")]


def _cycle_or_404(ctx, cycle_id: str) -> dict:
    view = cycles.cycle_view(ctx.store, cycle_id)
    if view is None:
        raise HTTPException(404, f"no cycle {cycle_id!r}")
    return view


@router.get("/cycles", responses=_AUTH, summary="Cycles, newest first, or the cycle of a job")
def list_cycles(ctx: Ctx, _actor: Actor,
                job_id: Annotated[str | None, Query(max_length=32, description="the cycle this job joined, "
                                                    "was rejected from, or was named for")] = None,
                limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
    found = cycles.cycles_of_job(ctx.store, job_id, limit)
    held = cycles.held_conflicts(ctx.store)
    if job_id:
        held = [c for c in held if c["job_id"] == job_id]
    return {"cycles": found, "total": len(found), "conflicts": held}


@router.get("/cycles/{cycle_id}", responses=_AUTH | _NOT_FOUND | _CYCLE, summary="A cycle: time points, state, results")
def get_cycle(ctx: Ctx, _actor: Actor, cycle_id: CycleId) -> dict[str, Any]:
    return _cycle_or_404(ctx, cycle_id)


@router.get("/cycles/{cycle_id}/rtdose", response_class=FileResponse,
            responses=_AUTH | _NOT_FOUND | _NOT_READY | {200: _DICOM}, summary="The newest cycle RT Dose (DICOM)")
def get_cycle_rtdose(ctx: Ctx, _actor: Actor, cycle_id: CycleId) -> FileResponse:
    view = _cycle_or_404(ctx, cycle_id)
    newest = cycles.newest_result(ctx.store, cycle_id)
    if newest is None:
        raise HTTPException(409, f"cycle {cycle_id} is {view['state']}: no finished cycle result yet "
                                 f"({view['joined']} time point(s) joined; 2 are needed)")
    name = (newest.outputs or {}).get("rtdose")
    path = cycles.result_dir(ctx.storage, cycle_id, newest.id) / "output" / name if name else None
    if path is None or not path.is_file():
        raise HTTPException(404, f"cycle result {newest.id} has no RT Dose file (removed?)")
    return FileResponse(path, media_type="application/dicom", filename=f"{cycle_id}-{newest.id}-rtdose.dcm")


@router.post("/cycles/{cycle_id}/integrate", status_code=202, responses=_AUTH | _NOT_FOUND | _NOT_READY,
             summary="Integrate the cycle again over its joined time points (e.g. after a failed result)")
def integrate_cycle(ctx: Ctx, actor: Actor, cycle_id: CycleId) -> dict[str, Any]:
    view = _cycle_or_404(ctx, cycle_id)
    if view["joined"] < 2:
        raise HTTPException(409, f"cycle {cycle_id} has {view['joined']} joined time point(s); 2 are needed")
    publish = cycles.celery_publisher(ctx.settings)
    result_id = cycles.request_integration(ctx.store, cycle_id, trigger_job_id=None, publish=publish, again=True)
    ctx.store.audit(actor, "cycle_integrate_requested", cycle_id=cycle_id, result_id=result_id)
    return {"cycle_id": cycle_id, "result_id": result_id}


class Resolution(BaseModel):
    """An explicit decision on a study held as an identity conflict."""

    decision: str = Field(description="same_patient: the study is the recorded patient's (its name and birth date "
                                      "are accepted for that patient, and it is offered to the cycle again); "
                                      "other_patient: another person sharing the PatientID (rejected for good)",
                          examples=["other_patient"])


@router.post("/cycles/{cycle_id}/conflicts/{job_id}/resolve",
             responses=_AUTH | _NOT_FOUND | {409: {"model": ErrorOut, "description": "not held as a conflict"},
                                            422: {"model": ErrorOut, "description": "unknown decision"}},
             summary="Resolve a study held as an identity conflict (same_patient or other_patient)")
def resolve_conflict(ctx: Ctx, actor: Actor, cycle_id: CycleId,
                     job_id: Annotated[str, Path(max_length=32, description="the held study's job id")],
                     body: Annotated[Resolution, Body()]) -> dict[str, Any]:
    if body.decision not in cycles.RESOLUTIONS:
        raise HTTPException(422, f"decision must be one of {', '.join(cycles.RESOLUTIONS)}")
    try:
        return cycles.resolve_conflict(ctx.store, ctx.storage, ctx.settings, cycle_id, job_id,
                                       decision=body.decision, actor=actor)
    except cycles.ConflictError as exc:
        raise HTTPException(exc.status, str(exc)) from exc


@router.get("/patients/{patient_id}/cumulative", responses=_AUTH | _NOT_FOUND | _CumulativeDoc,
            summary="Cumulative kidney, red-marrow and lesion doses over a patient's cycles, kidney limits flagged")
def get_cumulative(ctx: Ctx, _actor: Actor,
                   patient_id: Annotated[str, Path(max_length=64, description="the DICOM PatientID")],
                   issuer: Annotated[str | None, Query(max_length=64, description="the IssuerOfPatientID; where "
                                                       "the study gives its issuer only in the Issuer of Patient ID "
                                                       "Qualifiers Sequence: UniversalEntityID&UniversalEntityIDType "
                                                       "(none: the ID without an issuer)")] = None,
                   ) -> dict[str, Any]:
    _redact_access_log()
    out = cycles.cumulative(ctx.store, patient_id, issuer)
    if out is None:
        raise HTTPException(404, "no cycle of this patient is known")  # the ID is not echoed
    return out

"""SQLAlchemy models of therapy cycles: cycles, their time points, their results, cycle ids asked for.

On :class:`service.db.Base`, so the job store creates them with its own tables; they hold job
ids, UIDs, times and states. A patient appears only as ``patient_key``, a SHA-256 of the
PatientID (and ``name_key`` of the PatientName): never the ID or name itself. A hash of a
short ID is a pseudonym, not anonymity (anyone holding the ID can recompute it), which is
what the cumulative route needs: it is asked with the ID and looks up its hash.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, DateTime, Float, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from .db import Base, utcnow

__all__ = ["Cycle", "CycleTimePoint", "CycleResult", "CycleRequest", "CYCLE_TABLES"]


class Cycle(Base):
    """One administration to one patient, imaged at several time points."""

    __tablename__ = "cycles"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the client's cycle_id, or derived
    patient_key: Mapped[str] = mapped_column(String(64), index=True)
    name_key: Mapped[str] = mapped_column(String(64))
    administration: Mapped[dt.datetime | None] = mapped_column(DateTime)  # naive, as the headers give it
    explicit: Mapped[int] = mapped_column(Integer, default=0)  # 1: named by a client's cycle_id
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # DoseOptions.to_dict() of the cycle jobs
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class CycleTimePoint(Base):
    """A finished dose job offered to a cycle: joined, rejected (with the reason) or replaced."""

    __tablename__ = "cycle_time_points"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    cycle_id: Mapped[str | None] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # joined | rejected | replaced
    reason: Mapped[str | None] = mapped_column(Text)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    hours: Mapped[float | None] = mapped_column(Float)  # after the administration
    acquisition: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class CycleResult(Base):
    """One integration of a cycle over a set of its time points (a cycle job and its RT Dose)."""

    __tablename__ = "cycle_results"
    __table_args__ = (UniqueConstraint("cycle_id", "set_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    cycle_id: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per cycle: higher is newer
    set_key: Mapped[str] = mapped_column(String(64))  # hash of the time points' job ids (and a retry tag)
    state: Mapped[str] = mapped_column(String(16), index=True)  # received | queued | running | done | failed
    stage: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    time_points: Mapped[list] = mapped_column(JSON, default=list)  # job ids asked for
    used: Mapped[list | None] = mapped_column(JSON(none_as_null=True))  # job ids integrated (in time order)
    excluded: Mapped[list] = mapped_column(JSON, default=list)  # [{job_id, reason}] left out while computing
    trigger_job_id: Mapped[str] = mapped_column(String(32))  # exports and own-output records go under it
    superseded_by: Mapped[str | None] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    transient_failures: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128))
    outputs: Mapped[dict] = mapped_column(JSON, default=dict)  # kind -> file name
    result: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))  # UIDs, time points, regions
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class CycleRequest(Base):
    """A cycle id a client named for a job (``POST /studies?cycle_id=``), recorded before it is queued."""

    __tablename__ = "cycle_requests"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    cycle_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


CYCLE_TABLES = [Cycle.__table__, CycleTimePoint.__table__, CycleResult.__table__, CycleRequest.__table__]

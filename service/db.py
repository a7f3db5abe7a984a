"""SQLAlchemy models of the job store: jobs, studies arriving over DICOM, exports, audit.

SQLite by default (one file under the data directory, WAL mode so the gateway, node and
worker processes can share it), PostgreSQL when ``SPECTDOSE_DATABASE_URL`` says so. The
tables hold UIDs, AE titles, counts and states, never patient names or IDs.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import time
from pathlib import Path

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

__all__ = [
    "Base",
    "JobState",
    "IncomingState",
    "ExportState",
    "Job",
    "IncomingStudy",
    "OutputInstance",
    "ExportRecord",
    "AuditEvent",
    "RegionSetRecord",
    "Cycle",
    "CycleTimePoint",
    "CycleResult",
    "CycleRequest",
    "CyclePatient",
    "CYCLE_TABLES",
    "make_engine",
    "make_sessionmaker",
    "utcnow",
]


def utcnow() -> dt.datetime:
    """Naive UTC (SQLite has no time zones; PostgreSQL columns are 'timestamp without time zone')."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class JobState(enum.StrEnum):
    """received -> queued -> running -> done | failed (running -> queued on retry or lost worker)."""

    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class IncomingState(enum.StrEnum):
    """A study arriving over DICOM: receiving until quiet, then dispatched to a job or set aside."""

    RECEIVING = "receiving"
    DISPATCHING = "dispatching"
    DISPATCHED = "dispatched"
    DUPLICATE = "duplicate"  # same input instances as an earlier job (e.g. a PACS routing loop)
    IGNORED = "ignored"  # nothing usable as input (e.g. only our own outputs came back)


class ExportState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    reason: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))  # "rest" or "dicom"
    submitted_by: Mapped[str] = mapped_column(String(64))  # token label or AE title, never a name
    calling_aet: Mapped[str | None] = mapped_column(String(16), index=True)
    remote_host: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)
    incoming_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # DoseOptions.to_dict()
    export: Mapped[list] = mapped_column(JSON, default=list)  # destinations (AE titles)
    queue: Mapped[str] = mapped_column(String(16), default="cpu")
    n_files: Mapped[int] = mapped_column(Integer, default=0)
    input_bytes: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # claims so far: the fencing token
    transient_failures: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128))
    outputs: Mapped[dict] = mapped_column(JSON, default=dict)  # kind -> file name
    # What the result says about itself (method, software, warnings, output UIDs) once done,
    # and which earlier result of the study it replaces (set when the worker computes).
    result: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    replaces: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    queued_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class IncomingStudy(Base):
    """One burst of instances of a study from the DICOM node, complete after a quiet period."""

    __tablename__ = "incoming_studies"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    calling_aet: Mapped[str] = mapped_column(String(16))
    remote_host: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    n_own_outputs: Mapped[int] = mapped_column(Integer, default=0)
    first_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    job_id: Mapped[str | None] = mapped_column(String(32))
    note: Mapped[str | None] = mapped_column(Text)


class OutputInstance(Base):
    """A DICOM instance we produced; recognised if a PACS sends it back to us."""

    __tablename__ = "output_instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))


class ExportRecord(Base):
    """One output instance to one destination: the 'already sent' record."""

    __tablename__ = "export_records"
    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(300))
    kind: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class RegionSetRecord(Base):
    """A region set (SEG or RT Structure Set) applied to a finished job: one version of its region outputs.

    Each version's outputs are new files and new DICOM objects beside the job's result
    (``jobs/<job>/regions/v<N>/``); nothing of an earlier version is overwritten.
    """

    __tablename__ = "region_sets"
    __table_args__ = (UniqueConstraint("job_id", "version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)  # JobState names: received .. done | failed
    reason: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))  # "rest" or "dicom"
    submitted_by: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # "SEG" or "RTSTRUCT"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)  # of the region set received
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of the file received
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))  # region rows, output UIDs, warnings
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class AuditEvent(Base):
    """Who sent what and when: actor (token label or AE title), action, UIDs and counts."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(48), index=True)
    job_id: Mapped[str | None] = mapped_column(String(32), index=True)
    remote_host: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)  # UIDs, AE titles, counts


# --- therapy cycles (service/cycles.py) ----------------------------------------------
# SQLAlchemy models of therapy cycles: cycles, their time points, their results, cycle ids asked for.
#
# On :class:`service.db.Base`, so the job store creates them with its own tables; they hold job
# ids, UIDs, times and states. A patient appears only as ``patient_key``, a SHA-256 of the
# PatientID (and ``name_key`` of the PatientName): never the ID or name itself. A hash of a
# short ID is a pseudonym, not anonymity (anyone holding the ID can recompute it), which is
# what the cumulative route needs: it is asked with the ID and looks up its hash.


class Cycle(Base):
    """One administration to one patient, imaged at several time points."""

    __tablename__ = "cycles"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the client's cycle_id, or derived
    patient_key: Mapped[str] = mapped_column(String(64), index=True)
    name_key: Mapped[str] = mapped_column(String(64))
    administration: Mapped[dt.datetime | None] = mapped_column(DateTime)  # naive, as the headers give it
    activity_mbq: Mapped[float | None] = mapped_column(Float)  # RadionuclideTotalDose of the administration
    explicit: Mapped[int] = mapped_column(Integer, default=0)  # 1: named by a client's cycle_id
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # DoseOptions.to_dict() of the cycle jobs
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class CycleTimePoint(Base):
    """A finished dose job offered to a cycle: joined, rejected (with the reason) or replaced."""

    __tablename__ = "cycle_time_points"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    cycle_id: Mapped[str | None] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # joined | rejected | replaced | conflict
    reason: Mapped[str | None] = mapped_column(Text)
    # The study's identity keys (patient_key, name_key, birth_key: hashes) while held as a conflict.
    identity: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
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


class CyclePatient(Base):
    """A patient of the cycles: PatientID with IssuerOfPatientID (``key``), and the name and birth date it came with.

    Only hashes (service.cycles): ``key`` of ID and issuer, ``id_key`` of the ID alone (to tell that
    other issuers use the same ID), ``name_key`` and ``birth_key``. A study whose ID and issuer
    match but whose name or birth date does not is held as a conflict; a resolution that says it
    is the same patient adds its name and birth keys to ``aliases``.
    """

    __tablename__ = "cycle_patients"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    id_key: Mapped[str] = mapped_column(String(64), index=True)
    name_key: Mapped[str] = mapped_column(String(64))
    birth_key: Mapped[str | None] = mapped_column(String(64))
    aliases: Mapped[list] = mapped_column(JSON, default=list)  # [{name_key, birth_key}] accepted by a resolution
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


CYCLE_TABLES = [Cycle.__table__, CycleTimePoint.__table__, CycleResult.__table__, CycleRequest.__table__,
                CyclePatient.__table__]



def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the one writer
    cur.execute("PRAGMA synchronous=FULL")  # a committed job survives a power cut
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn) -> None:
    """Writers take the lock at BEGIN: a deferred transaction that upgrades to a write can
    fail at once with 'database is locked' instead of waiting, when processes share a file."""
    readonly = conn.get_execution_options().get("spectdose_readonly", False)
    conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine for SQLite (WAL, busy timeout) or PostgreSQL (psycopg 3, pre-ping)."""
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               json_serializer=_json_dumps)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, json_serializer=_json_dumps)
    _create_tables(engine)
    return engine


def _json_dumps(value) -> str:
    """JSON columns are written with sorted keys: stored text, and the API's answers, keep one order."""
    return json.dumps(value, sort_keys=True)


# Columns changed after the first release, upgraded in place on an existing database:
# (table, column, its former name). A former text column holding JSON is renamed (and, on
# PostgreSQL, converted to json); a column a database lacks altogether is added (nullable).
_UPGRADED_COLUMNS = (
    ("jobs", "options", "options_json"),
    ("jobs", "export", "export_json"),
    ("jobs", "outputs", "outputs_json"),
    ("jobs", "result", "result_json"),
    ("jobs", "replaces", "replaces_json"),
    ("audit_events", "detail", "detail_json"),
)


# Columns added to a table after it was first released: (table, column, SQL type), added (nullable)
# to an existing database when a process opens it; older rows read them as NULL.
_ADDED_COLUMNS = (
    ("cycles", "activity_mbq", "FLOAT"),
    ("cycle_time_points", "identity", "JSON"),
)


def _upgrade_columns(engine: Engine) -> None:
    from sqlalchemy import inspect, text

    inspector = inspect(engine)
    present = {table: {c["name"] for c in inspector.get_columns(table)}
               for table in {t for t, _c, _f in _UPGRADED_COLUMNS} | {t for t, _c, _y in _ADDED_COLUMNS}}
    for table, column, sql_type in _ADDED_COLUMNS:
        if column not in present[table]:
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))
    for table, column, former in _UPGRADED_COLUMNS:
        if column in present[table]:
            continue
        with engine.begin() as conn:
            if former in present[table]:
                conn.execute(text(f"ALTER TABLE {table} RENAME COLUMN {former} TO {column}"))
                if engine.dialect.name == "postgresql":
                    conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE JSON USING {column}::json"))
            else:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} JSON"))


def _create_tables(engine: Engine) -> None:
    """Create missing tables (and added columns); tolerate another process doing it at the same moment."""
    for attempt in range(3):
        try:
            Base.metadata.create_all(engine)
            _upgrade_columns(engine)
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)

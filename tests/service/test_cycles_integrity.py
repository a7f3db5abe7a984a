"""One patient's cumulative dose is that patient's alone, counted once, and survives a crash (issue 19, cases 1-3).

Here on the job store (SQLite and PostgreSQL) and the real Redis, without computing a dose:
finished dose jobs are written as the worker leaves them (``test_cycles._finished_job``: the
stored SPECT header and summary.json) and offered to cycles by the production hook; cycle
results are claimed, lost and swept by the production functions. The same cases with the real
worker, DICOM node and gateway: ``test_e2e_cycles_integrity.py``.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import inspect, text

from service import cycles
from service.celery_app import make_celery
from service.jobs import JobStore
from service.queue import Enqueuer, reconcile_once, sweep_once
from service.storage import Storage

from .support import make_settings
from .test_cycles import _finished_job

T0 = dt.datetime(2026, 3, 2, 9, 30)


@pytest.fixture()
def world(db_url, tmp_path):
    settings = make_settings(tmp_path / "data", database_url=db_url)
    store, storage = JobStore(settings.db_url), Storage(settings.data_dir)
    published: list[str] = []

    def offer(**kw) -> str:
        kw.setdefault("patient_id", "P1")
        kw.setdefault("administration", T0)
        kw.setdefault("activity_mbq", 7400.0)
        job_id = _finished_job(store, storage, tmp_path, **kw)
        cycles.time_point_done(store, storage, settings, job_id, publish=lambda r: published.append(r) or True)
        return job_id

    yield store, storage, settings, offer, published
    store.close()


def _tp(store, job_id: str) -> dict:
    found = cycles.cycles_of_job(store, job_id)
    view = found[0] if found else None
    return next(t for t in view["time_points"] if t["job_id"] == job_id) | {"cycle_id": view["cycle_id"]}


def test_another_patient_under_the_same_patient_id_is_held_and_never_counted(world):
    """Case 1: same PatientID with another name (or birth date), another administration, or another issuer."""
    store, storage, settings, offer, published = world
    a1 = offer(hours=24.0, name="DOE^JANE", birth="19600101")
    a2 = offer(hours=72.0, name="doe^jane^^", birth="19600101")  # the same name written otherwise: same patient
    assert _tp(store, a2)["state"] == "joined" and len(published) == 1
    cycle_a = _tp(store, a1)["cycle_id"]
    # Another person carrying P1: another name, another administration (it would have formed a new cycle).
    later = T0 + dt.timedelta(days=56)
    b1 = offer(hours=24.0, name="ROE^RICHARD", birth="19710707", administration=later)
    b2 = offer(hours=72.0, name="ROE^RICHARD", birth="19710707", administration=later)
    # The same name with another birth date, at the administration of cycle A.
    c1 = offer(hours=96.0, name="DOE^JANE", birth="19650505")
    # P1 from another issuer: another patient altogether, its own cycle.
    d1 = offer(hours=24.0, name="DOE^JANE", birth="19600101", issuer="OTHER-HOSPITAL", administration=later)
    d2 = offer(hours=72.0, name="DOE^JANE", birth="19600101", issuer="OTHER-HOSPITAL", administration=later)
    assert len(published) == 2, "an integration for cycle A and one for the other issuer's patient; none for B or C"

    for job_id, fields in ((b1, ["PatientName", "PatientBirthDate"]), (b2, ["PatientName", "PatientBirthDate"]),
                           (c1, ["PatientBirthDate"])):
        tp = _tp(store, job_id)
        assert tp["state"] == "conflict", tp
        assert "identity conflict" in tp["reason"] and all(f in tp["reason"] for f in fields), tp["reason"]
        assert "ROE" not in tp["reason"] and "1971" not in tp["reason"] and "P1" not in tp["reason"]
        assert f"/conflicts/{job_id}/resolve" in tp["reason"]
    assert _tp(store, c1)["cycle_id"] == cycle_a
    assert {c["job_id"] for c in cycles.cycle_view(store, cycle_a)["conflicts"]} == {c1}
    assert cycles.cycle_view(store, cycle_a)["joined"] == 2
    assert not cycles.cycles_of_job(store, b1)[0]["results"], "no cycle formed from held studies"
    cycle_d = _tp(store, d1)["cycle_id"]
    assert _tp(store, d2)["state"] == "joined" and cycle_d != cycle_a

    summed = cycles.cumulative(store, "P1")
    assert [c["cycle_id"] for c in summed["cycles"]] == [cycle_a], "neither the held studies nor the other issuer"
    assert {h["job_id"] for h in summed["held_conflicts"]} == {b1, b2, c1}
    assert any("other patient(s) carry the same PatientID under another IssuerOfPatientID" in n
               for n in summed["notes"])
    other = cycles.cumulative(store, "P1", issuer="OTHER-HOSPITAL")
    assert [c["cycle_id"] for c in other["cycles"]] == [cycle_d] and other["held_conflicts"] == []

    events = store.audit_events(action="cycle_identity_conflict")
    assert {e.job_id for e in events} == {b1, b2, c1}
    assert {tuple(e.detail["fields"]) for e in events} == {("PatientName", "PatientBirthDate"), ("PatientBirthDate",)}
    assert "ROE" not in json.dumps([e.detail for e in events]) and "P1" not in json.dumps([e.detail for e in events])

    # Resolved explicitly: B is another person (rejected for good); C is Jane after all (a corrected birth date).
    with pytest.raises(cycles.ConflictError) as exc:
        cycles.resolve_conflict(store, storage, settings, cycle_a, b1, decision="other_patient", actor="token:t")
    assert exc.value.status == 404, "b1 is not held for cycle A"
    cb = _tp(store, b1)["cycle_id"]
    out = cycles.resolve_conflict(store, storage, settings, cb, b1, decision="other_patient", actor="token:t")
    assert out["state"] == "rejected" and "another patient sharing the PatientID" in out["reason"]
    with pytest.raises(cycles.ConflictError) as exc:
        cycles.resolve_conflict(store, storage, settings, cb, b1, decision="same_patient", actor="token:t")
    assert exc.value.status == 409
    n_published = len(published)
    out = cycles.resolve_conflict(store, storage, settings, cycle_a, c1, decision="same_patient", actor="token:t",
                                  publish=lambda r: published.append(r) or True)
    assert out["state"] == "joined" and out["cycle_id"] == cycle_a
    assert len(published) == n_published + 1, "cycle A integrated again with the study it now holds"
    # Jane's corrected birth date is hers from now on: another study with it joins without a conflict.
    c2 = offer(hours=144.0, name="DOE^JANE", birth="19650505")
    assert _tp(store, c2)["state"] == "joined"
    resolved = store.audit_events(action="cycle_conflict_resolved")
    assert [(e.detail["decision"], e.actor) for e in resolved] == [("other_patient", "token:t"),
                                                                    ("same_patient", "token:t")]
    assert {h["job_id"] for h in cycles.cumulative(store, "P1")["held_conflicts"]} == {b2}


def test_an_issuer_given_only_in_the_qualifiers_sequence_is_an_issuer(world):
    """Case 1 with the issuer in IssuerOfPatientIDQualifiersSequence alone: another hospital's P1, not ours."""
    store, storage, settings, offer, published = world
    ours = [offer(hours=h, name="DOE^JANE", birth="19600101") for h in (24.0, 72.0)]
    theirs = [offer(hours=h, name="ROE^RICHARD", birth="19710707", issuer_universal_id=("2.16.840.1.113883.3.99", "ISO"))
              for h in (24.0, 72.0)]
    assert all(_tp(store, j)["state"] == "joined" for j in ours + theirs), "two patients, no identity conflict"
    assert _tp(store, ours[0])["cycle_id"] != _tp(store, theirs[0])["cycle_id"]
    assert [c["cycle_id"] for c in cycles.cumulative(store, "P1")["cycles"]] == [_tp(store, ours[0])["cycle_id"]]
    other = cycles.cumulative(store, "P1", issuer="2.16.840.1.113883.3.99&ISO")
    assert [c["cycle_id"] for c in other["cycles"]] == [_tp(store, theirs[0])["cycle_id"]]


def test_one_administration_belongs_to_one_cycle(world):
    """Case 2: the same studies sent again naming a new cycle_id are refused with the existing cycle's id."""
    store, storage, settings, offer, published = world
    a1, a2 = offer(hours=24.0), offer(hours=72.0)
    cycle_a = _tp(store, a1)["cycle_id"]
    assert _tp(store, a2)["cycle_id"] == cycle_a and len(published) == 1
    d1, d2 = offer(hours=24.0, cycle_id="dup8"), offer(hours=72.0, cycle_id="dup8")
    for job_id in (d1, d2):
        tp = _tp(store, job_id)
        assert tp["state"] == "rejected" and tp["cycle_id"] == "dup8"
        assert f"already belongs to cycle {cycle_a}" in tp["reason"] and "one administration is one cycle" in tp["reason"]
    view = cycles.cycle_view(store, "dup8")
    assert view["joined"] == 0 and view["results"] == [] and view["explicit"], "says what happened, forms nothing"
    assert cycles.get_cycle(store, "dup8") is None
    assert len(published) == 1
    assert [c["cycle_id"] for c in cycles.cumulative(store, "P1")["cycles"]] == [cycle_a]
    # Naming the existing cycle joins it; another activity at the same start time is another administration.
    named = offer(hours=144.0, cycle_id=cycle_a)
    assert _tp(store, named)["state"] == "joined"
    odd = offer(hours=96.0, activity_mbq=5550.0)
    tp = _tp(store, odd)
    assert tp["state"] == "rejected" and "administered activity (RadionuclideTotalDose) differs" in tp["reason"]


def test_two_new_cycle_ids_for_one_administration_at_once_form_one_cycle(world, tmp_path, monkeypatch):
    """Case 2 under concurrency: two workers finish time points of one administration at the same moment,
    each named with a new cycle_id; the check for the administration's other cycle and the creation
    of a cycle must not interleave (PostgreSQL at READ COMMITTED would let both create one)."""
    import threading
    import time as _time

    store, storage, settings, offer, published = world
    earlier = offer(hours=24.0, administration=T0 - dt.timedelta(days=56))  # the patient is known already
    jobs = [_finished_job(store, storage, tmp_path, patient_id="P1", administration=T0, hours=h,
                          activity_mbq=7400.0, cycle_id=name) for h, name in ((24.0, "race-a"), (72.0, "race-b"))]
    looked = cycles._administration_elsewhere

    def slow_look(*args, **kwargs):  # widen the window between reading the cycles and writing one
        found = looked(*args, **kwargs)
        _time.sleep(0.5)
        return found

    monkeypatch.setattr(cycles, "_administration_elsewhere", slow_look)
    errors: list[BaseException] = []

    def finish(job_id: str) -> None:
        try:
            cycles.time_point_done(store, storage, settings, job_id, publish=lambda r: published.append(r) or True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    states = sorted(_tp(store, j)["state"] for j in jobs)
    assert states == ["joined", "rejected"], states
    formed = [c for c in ("race-a", "race-b") if cycles.get_cycle(store, c) is not None]
    assert len(formed) == 1, f"one administration formed {len(formed)} cycles"
    rejected = next(j for j in jobs if _tp(store, j)["state"] == "rejected")
    assert f"already belongs to cycle {formed[0]}" in _tp(store, rejected)["reason"]
    assert [c["cycle_id"] for c in cycles.cumulative(store, "P1")["cycles"]] == [_tp(store, earlier)["cycle_id"],
                                                                              *formed]


def test_a_cycle_result_lost_with_its_worker_is_requeued_after_its_lease_and_reconciled(world, redis_url):
    """Case 3 on the store and Redis: no cycle result stays ``running`` past its lease, none waits without a message."""
    import redis

    store, storage, settings, offer, published = world
    offer(hours=24.0)
    offer(hours=72.0)
    (result_id,) = published
    enqueuer = Enqueuer(make_celery(make_settings(settings.data_dir, redis_url=redis_url)), store)
    row = cycles.claim_result(store, result_id, "worker-killed", lease_s=60)
    assert row is not None and row.attempt == 1
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert sweep_once(store, enqueuer, lease_s=60, visibility_timeout_s=3600, now=now)["cycle_requeued_lost"] == 0
    later = now + dt.timedelta(seconds=61)
    with store.session() as s:  # the worker died: its heartbeat stops at claim time
        s.execute(text("UPDATE cycle_results SET heartbeat_at = :t WHERE id = :i"),
                  {"t": now - dt.timedelta(seconds=120), "i": result_id})
    counts = sweep_once(store, enqueuer, lease_s=60, visibility_timeout_s=3600, now=later)
    assert counts["cycle_requeued_lost"] == 1
    again = cycles.get_result(store, result_id)
    assert again.state == "queued" and "worker lost" in again.reason
    assert enqueuer.broker_job_ids(cycles.CYCLE_TASK_NAME) == {result_id}
    assert [e.detail["result_id"] for e in store.audit_events(action="cycle_result_requeued")] == [result_id]
    # The killed worker, were it only slow, is fenced off: its attempt can no longer write.
    assert not cycles.result_heartbeat(store, result_id, 1)
    # Redis loses the message: the reconciler republishes the queued result, once.
    with redis.Redis.from_url(redis_url) as r:
        r.flushdb()
    assert reconcile_once(store, enqueuer, grace_s=0) == 1
    assert enqueuer.broker_job_ids(cycles.CYCLE_TASK_NAME) == {result_id}
    assert reconcile_once(store, enqueuer, grace_s=0) == 0, "present now: not published twice"
    # A worker restarting under its name takes back the results it held at once.
    assert cycles.claim_result(store, result_id, "serve@host", lease_s=60).attempt == 2
    assert cycles.requeue_results_of_worker(store, "serve@host") == [result_id]
    assert cycles.get_result(store, result_id).state == "queued"


def test_an_earlier_job_store_gains_the_identity_columns(tmp_path):
    """A SQLite store of the previous release (cycles without activity, time points without identity) opens."""
    from sqlalchemy import create_engine

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE cycles (id VARCHAR(64) PRIMARY KEY, patient_key VARCHAR(64), "
                          "name_key VARCHAR(64), administration DATETIME, explicit INTEGER, options JSON, "
                          "created_at DATETIME, updated_at DATETIME)"))
        conn.execute(text("CREATE TABLE cycle_time_points (job_id VARCHAR(32) PRIMARY KEY, cycle_id VARCHAR(64), "
                          "state VARCHAR(16), reason TEXT, study_instance_uid VARCHAR(64), hours FLOAT, "
                          "acquisition DATETIME, created_at DATETIME, updated_at DATETIME)"))
        conn.execute(text("INSERT INTO cycles VALUES ('c-old', :k, :n, '2025-01-01 09:00:00', 0, '{}', "
                          "'2025-01-01 10:00:00', '2025-01-01 10:00:00')"),
                     {"k": cycles.patient_key("P1"), "n": cycles._name_key("DOE^JANE")})
    engine.dispose()
    store = JobStore(url)
    try:
        columns = {t: {c["name"] for c in inspect(store.engine).get_columns(t)} for t in ("cycles", "cycle_time_points")}
        assert "activity_mbq" in columns["cycles"] and "identity" in columns["cycle_time_points"]
        assert cycles.get_cycle(store, "c-old").activity_mbq is None
        assert [c["cycle_id"] for c in cycles.cumulative(store, "P1")["cycles"]] == ["c-old"]
    finally:
        store.close()


def test_a_region_not_reported_in_a_cycle_is_said_in_the_cumulative(world):
    """A kidney partly outside one time point's SPECT has no cycle dose (spectdose.timeseries): the
    cumulative over the patient's cycles says that cycle is missing from it, not a silently lower sum."""
    store, storage, settings, offer, published = world
    offer(hours=24.0)
    offer(hours=72.0)
    (result_id,) = published
    row = cycles.claim_result(store, result_id, "w", lease_s=60)
    cycle_id = row.cycle_id
    reason = "only partly inside the SPECT (or CT) at t2 41%: its mean there counts no activity"
    assert cycles.finish_result(store, result_id, row.attempt, outputs={}, used=list(row.time_points), result={
        "regions": [{"region": "kidney_right", "volume_ml": 150.0, "absorbed_dose_gy": 3.1, "bed_gy": 3.4}],
        "regions_not_reported": [{"region": "kidney_left", "volume_ml": 160.0, "reason": reason}]})
    summed = cycles.cumulative(store, "P1")
    assert [r["region"] for r in summed["regions"]] == ["kidney_right"]
    assert any(n.startswith(f"kidney_left is not counted for cycle {cycle_id}: {reason}") for n in summed["notes"])

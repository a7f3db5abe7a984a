"""The job store on SQLite and PostgreSQL: life cycle, claims, fencing, exports, audit."""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest

from service.db import JobState, utcnow
from service.jobs import ALLOWED_TRANSITIONS, ExportItem, IllegalTransition, JobStore, token_label


def _new(store: JobStore, **kw) -> str:
    job_id = uuid.uuid4().hex
    args = dict(source="rest", submitted_by="token:abc", options={"method": "dvk"}, export=[], queue="cpu", n_files=3)
    args.update(kw)
    store.create_job(job_id, **args)
    return job_id


@pytest.fixture()
def store(db_url):
    s = JobStore(db_url)
    yield s
    s.close()


def test_life_cycle_received_queued_running_done(store):
    job_id = _new(store)
    assert store.get(job_id).state == JobState.RECEIVED
    assert store.mark_queued(job_id)
    assert not store.mark_queued(job_id), "a job is queued once"
    attempt = store.claim(job_id, "w1", lease_s=60, max_attempts=3)
    assert attempt == 1
    assert store.set_progress(job_id, attempt, "dose_rate", 0.35)
    job = store.get(job_id)
    assert (job.state, job.stage, job.progress, job.worker) == ("running", "dose_rate", 0.35, "w1")
    assert store.finish(job_id, attempt, {"rtdose": "rtdose.dcm"})
    job = store.get(job_id)
    assert job.state == "done" and job.finished_at is not None and job.outputs == {"rtdose": "rtdose.dcm"}
    assert store.claim(job_id, "w2", lease_s=60, max_attempts=3) is None, "a finished job is never run again"
    assert not store.fail(job_id, "late failure"), "done is final"


def test_every_state_change_goes_through_the_allowed_transitions(store):
    job_id = _new(store)
    with store.session() as s:
        for target in (JobState.DONE, JobState.RECEIVED):  # received -> done skips the work; nothing goes back
            assert target not in ALLOWED_TRANSITIONS[JobState.RECEIVED]
            with pytest.raises(IllegalTransition, match="received -> "):
                store._transition(s, job_id, [JobState.RECEIVED], target)
        with pytest.raises(IllegalTransition, match="done -> running"):
            store._transition(s, job_id, [JobState.DONE], JobState.RUNNING)
    assert store.get(job_id).state == JobState.RECEIVED, "a refused transition writes nothing"


def test_only_one_of_many_concurrent_claims_wins(store):
    job_id = _new(store)
    store.mark_queued(job_id)
    results = []
    barrier = threading.Barrier(6)

    def claim(name):
        barrier.wait()
        results.append(store.claim(job_id, name, lease_s=60, max_attempts=3))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r for r in results if r is not None) == [1]


def test_stale_claim_is_taken_over_and_the_old_owner_is_fenced_off(store):
    job_id = _new(store)
    first = store.claim(job_id, "w1", lease_s=60, max_attempts=5)
    assert store.claim(job_id, "w2", lease_s=60, max_attempts=5) is None, "live heartbeat: not taken"
    # the first worker froze: its heartbeat is older than the lease
    with store.session() as s:
        from service.db import Job

        s.get(Job, job_id).heartbeat_at = utcnow() - dt.timedelta(seconds=120)
    second = store.claim(job_id, "w2", lease_s=60, max_attempts=5)
    assert second == first + 1
    assert not store.heartbeat(job_id, first)
    assert not store.set_progress(job_id, first, "export", 0.9)
    assert not store.finish(job_id, first, {}), "the old attempt cannot finish the job"
    assert store.finish(job_id, second, {"rtdose": "rtdose.dcm"})


def test_a_job_that_keeps_losing_its_worker_fails_with_a_reason(store):
    job_id = _new(store)
    for _ in range(2):
        store.claim(job_id, "w", lease_s=60, max_attempts=2)
        assert store.requeue_of_worker("w") == [job_id]
    assert store.claim(job_id, "w", lease_s=60, max_attempts=2) is None
    job = store.get(job_id)
    assert job.state == "failed" and "started 2 times" in job.reason


def test_transient_failures_count_and_requeue(store):
    job_id = _new(store)
    a = store.claim(job_id, "w", lease_s=60, max_attempts=5)
    assert store.retry_later(job_id, a, "transient error, will retry: OSError") == 1
    job = store.get(job_id)
    assert job.state == "queued" and "OSError" in job.reason
    b = store.claim(job_id, "w", lease_s=60, max_attempts=5)
    assert store.retry_later(job_id, b, "again") == 2
    assert store.retry_later(job_id, b, "not mine any more") is None


def test_sweep_lists_unpublished_lost_and_stuck_jobs(store):
    received = _new(store)
    lost = _new(store)
    store.claim(lost, "w", lease_s=60, max_attempts=5)
    later = utcnow() + dt.timedelta(seconds=600)
    r, l_, w = store.jobs_to_sweep(received_before=later, heartbeat_before=later, queued_before=later)
    assert r == [received] and l_ == [lost] and w == []
    assert store.requeue_if_stale(lost, lease_s=-700, reason="worker lost")
    assert store.get(lost).state == "queued"


def test_export_records_are_unique_per_instance_and_destination(store):
    job_id = _new(store)
    item = ExportItem("rtdose", "1.2.3.4")
    store.record_export(job_id, "PACS@h:104", item, sent=False, attempts=1, error="refused")
    assert not store.export_sent(job_id, "PACS@h:104", "1.2.3.4")
    store.record_export(job_id, "PACS@h:104", item, sent=True, attempts=1)
    records = store.exports_of(job_id)
    assert len(records) == 1 and records[0].state == "sent" and records[0].attempts == 2
    assert store.export_sent(job_id, "PACS@h:104", "1.2.3.4")
    assert not store.export_sent(job_id, "OTHER@h:104", "1.2.3.4")


def test_list_filters_and_counts(store):
    a = _new(store, source="rest")
    b = _new(store, source="dicom", calling_aet="ORTHANC", study_instance_uid="1.2.3")
    store.fail(b, "no CT")
    jobs, total = store.list_jobs(source="dicom")
    assert total == 1 and jobs[0].id == b
    assert [j.id for j in store.list_jobs(state="received")[0]] == [a]
    assert store.list_jobs(calling_aet="ORTHANC")[1] == 1
    assert store.list_jobs(study_instance_uid="1.2.3")[0][0].id == b
    assert store.list_jobs(since=utcnow() + dt.timedelta(hours=1))[1] == 0
    counts = store.counts_by_state()
    assert counts["received"] == 1 and counts["failed"] == 1 and counts["done"] == 0


def test_audit_records_actors_as_labels_not_tokens(store):
    token = "a-secret-token-1234567890"
    label = token_label(token)
    assert token not in label and label.startswith("token:")
    job_id = _new(store, submitted_by=label)
    events = store.audit_events(job_id=job_id)
    assert [e.action for e in events] == ["job_created"]
    assert events[0].actor == label and token not in repr(events[0].detail)


def test_incoming_bursts_are_taken_once(store):
    first = store.note_arrival("1.2.3", "MODALITY", "127.0.0.1", n_instances=5, n_own_outputs=0, new_id="a" * 32)
    again = store.note_arrival("1.2.3", "MODALITY", "127.0.0.1", n_instances=2, n_own_outputs=1, new_id="b" * 32)
    assert first == again, "instances of an open burst join it"
    cutoff = utcnow() + dt.timedelta(seconds=1)
    assert [i.n_instances for i in store.quiet_studies(cutoff)] == [7]
    assert store.take_incoming(first, cutoff)
    assert not store.take_incoming(first, cutoff)
    assert store.reset_dispatching() == 1, "a crash between take and dispatch reopens the burst"

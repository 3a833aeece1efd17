"""The claim pipeline under real concurrency: several worker connections."""
import threading
import time

import psycopg
import pytest

from ffhelp import run_parallel


def create_many(conn, lane, n, **kw):
    extra = "".join(f", {k} => %({k})s" for k in kw)
    conn.execute(f"SELECT ff_create_execution(%(lane)s{extra}) FROM generate_series(1, %(n)s)",
                 dict(lane=lane, n=n, **kw))


def test_concurrent_workers_claim_each_execution_exactly_once(cluster, db):
    total, workers = 400, 8
    with cluster.connect(db) as c:
        create_many(c, "jobs", total)
    claimed, lock = [], threading.Lock()

    def worker(i):
        with cluster.connect(db) as c:
            while True:
                row = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('jobs', %s, %s)",
                                (f"w{i}", f"w{i}-1")).fetchone()
                if row is None:
                    return
                c.execute("SELECT ff_complete_execution(%s, %s)", row)
                with lock:
                    claimed.append(row[0])

    run_parallel(workers, worker)
    assert len(claimed) == total
    assert len(set(claimed)) == total
    with cluster.connect(db) as c:
        assert c.execute("SELECT count(*) FROM ff_exec_core WHERE public_state = 'completed'").fetchone()[0] == total
        assert c.execute("SELECT count(*) FROM ff_completion_event WHERE outcome = 'success'").fetchone()[0] == total
        assert c.execute("SELECT count(*) FROM ff_attempt").fetchone()[0] == total


def test_claims_held_open_never_overlap(cluster, db):
    """Workers keep their claim transactions open while others claim."""
    with cluster.connect(db) as c:
        create_many(c, "hold", 20)
    results, lock = [], threading.Lock()
    barrier = threading.Barrier(10)

    def worker(i):
        with cluster.connect(db, autocommit=False) as c:
            rows = [c.execute("SELECT execution_id FROM ff_claim_for_worker('hold', %s, 'i')", (f"w{i}",)).fetchone()
                    for _ in range(3)]
            barrier.wait()
            c.commit()
            with lock:
                results.extend(r[0] for r in rows if r)

    run_parallel(10, worker)
    assert len(results) == 20 and len(set(results)) == 20


def test_rolled_back_claim_stays_claimable(cluster, db):
    with cluster.connect(db) as c:
        eid = c.execute("SELECT ff_create_execution('rb')").fetchone()[0]
    with cluster.connect(db, autocommit=False) as c:
        assert c.execute("SELECT execution_id FROM ff_claim_for_worker('rb', 'w', 'i')").fetchone()[0] == eid
        c.rollback()
    with cluster.connect(db) as c:
        assert c.execute("SELECT public_state FROM ff_exec_core").fetchone()[0] == "waiting"
        assert c.execute("SELECT count(*) FROM ff_claim_grant").fetchone()[0] == 0
        assert c.execute("SELECT execution_id FROM ff_claim_for_worker('rb', 'w', 'i')").fetchone()[0] == eid


def test_quota_concurrency_cap_holds_under_parallel_claims(cluster, db):
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_quota_policy('cap3', 60, 0, 3)")
        create_many(c, "q", 30, quota_policy_id="cap3")
    got, lock = [], threading.Lock()

    def worker(i):
        with cluster.connect(db) as c:
            for _ in range(5):
                row = c.execute("SELECT execution_id FROM ff_claim_for_worker('q', %s, 'i')", (f"w{i}",)).fetchone()
                if row:
                    with lock:
                        got.append(row[0])

    run_parallel(8, worker)
    assert len(got) == 3
    with cluster.connect(db) as c:
        assert c.execute("SELECT count(*) FROM ff_quota_admitted WHERE quota_policy_id = 'cap3'").fetchone()[0] == 3


def test_claim_and_own_writes_commit_together(cluster, db):
    """A worker claims, records usage and completes in one transaction."""
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('b', '{tokens}', '{100}', '{0}')")
        c.execute("SELECT ff_create_execution('tx', budget_ids => '{b}')")
        c.execute("CREATE TABLE app_log (execution_id text)")
    with cluster.connect(db, autocommit=False) as c:
        eid, grant = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('tx', 'w', 'i')").fetchone()
        c.execute("SELECT * FROM ff_record_spend('b', %s, '{\"tokens\": 30}', 'spend-1')", (eid,))
        c.execute("INSERT INTO app_log VALUES (%s)", (eid,))
        c.execute("SELECT ff_complete_execution(%s, %s, '{\"ok\": true}')", (eid, grant))
        c.commit()
        assert c.execute("SELECT count(*) FROM app_log").fetchone()[0] == 1
        assert c.execute("SELECT result->>'ok' FROM ff_exec_core").fetchone()[0] == "true"


def test_stale_grant_after_reclaim_is_refused(cluster, db):
    with cluster.connect(db) as c:
        eid = c.execute("SELECT ff_create_execution('st', max_attempts => 3)").fetchone()[0]
        _, g1 = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('st', 'w1', 'i')").fetchone()
        c.execute("SELECT ff_fail_execution(%s, %s, 'transient')", (eid, g1))
        c.execute("UPDATE ff_exec_core SET eligible_at_ms = 0")
        _, g2 = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('st', 'w2', 'i')").fetchone()
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            c.execute("SELECT ff_complete_execution(%s, %s)", (eid, g1))
        c.execute("SELECT ff_complete_execution(%s, %s)", (eid, g2))
        assert c.execute("SELECT current_worker_id, attempt_index FROM ff_exec_core").fetchone() == ("w2", 2)


def seq_scans(c, tables):
    c.execute("SELECT pg_stat_clear_snapshot()")
    return dict(c.execute("SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname = ANY(%s)",
                          (tables,)).fetchall())


def test_a_long_lived_worker_session_keeps_using_the_indexes(cluster, db):
    """A worker connects while the attempt and grant tables are empty and
    vacuumed (a fresh install), then works through a growing queue: its
    claims and completions must keep finding rows by key, not scan the
    tables they were planned against when those held nothing."""
    tables = ["ff_attempt", "ff_claim_grant", "ff_exec_core", "ff_completion_event"]
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_execution('grow')")
        c.execute("VACUUM ANALYZE")
    with cluster.connect(db) as w, cluster.connect(db) as c:
        def cycle():
            eid, grant = w.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('grow', 'w', 'i')").fetchone()
            w.execute("SELECT ff_complete_execution(%s, %s)", (eid, grant))
        cycle()   # plans every statement of both calls while the tables are empty
        c.execute("SELECT ff_create_executions('grow', array_fill('{}'::jsonb, ARRAY[1733]))")
        w.execute("SELECT pg_stat_force_next_flush()")
        time.sleep(0.3)
        before = seq_scans(c, tables)
        for _ in range(257):
            cycle()
        w.execute("SELECT pg_stat_force_next_flush()")
        deadline = time.time() + 10
        while True:
            after = seq_scans(c, tables)
            moved = c.execute("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'ff_attempt'").fetchone()[0]
            if moved >= 258 or time.time() > deadline:
                break
            time.sleep(0.1)
        assert moved >= 258, "the worker's statistics never arrived"
        grew = {t: after.get(t, 0) - before.get(t, 0) for t in tables}
        assert all(n == 0 for n in grew.values()), f"sequential scans during 257 cycles: {grew}"


def test_the_same_grant_signed_again_is_a_claim_not_a_conflict(conn):
    """A worker instance that gets an execution back and is given the same
    expiry millisecond as its earlier lease signs the very same grant key
    (the key signs execution, worker, instance, expiry and kid). That claim
    succeeds (it was 23505, found by the model test) and the key fences the
    new lease: it completes it."""
    eid = conn.execute("SELECT ff_create_execution('same-grant')").fetchone()[0]
    first = None
    for _ in range(200):
        if first is None:
            first = conn.execute("SELECT grant_key, expires_at_ms FROM ff_claim_for_worker('same-grant', 'w', 'w-1', "
                                 "grant_ttl_ms => 60000)").fetchone()
            conn.execute("SELECT ff_cancel_execution(%s)", (eid,))
            conn.execute("SELECT ff_retry_execution(%s)", (eid,))
        # The ttl that lands on the first lease's expiry, computed in the statement.
        again = conn.execute(
            "SELECT grant_key, expires_at_ms FROM ff_claim_for_worker('same-grant', 'w', 'w-1', "
            "grant_ttl_ms => %s - (extract(epoch FROM clock_timestamp()) * 1000)::bigint)", (first[1],)).fetchone()
        if again[0] == first[0]:
            assert again[1] == first[1]
            conn.execute("SELECT ff_complete_execution(%s, %s)", (eid, again[0]))
            assert conn.execute("SELECT ff_get_execution(%s) ->> 'public_state'", (eid,)).fetchone()[0] == "completed"
            return
        conn.execute("SELECT ff_cancel_execution(%s)", (eid,))
        conn.execute("SELECT ff_retry_execution(%s)", (eid,))
    pytest.fail("no claim landed on the first lease's expiry millisecond in 200 tries")

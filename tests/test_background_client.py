"""Reconcilers as other processes see them: the background worker on a
cluster that preloads the library, pg_cron, concurrent runners, and
LISTEN/NOTIFY delivery."""
import os
import select
import time

import psycopg
import pytest

from cluster import Cluster, wait_for
from ffhelp import build_flow, make_stale_work, run_parallel, settled


@pytest.fixture(scope="module")
def bg_cluster():
    c = Cluster("bgworker", int(os.environ.get("FF_BG_PORT", "54330")), conf={
        "shared_preload_libraries": "'flowfabric'",
        "flowfabric.database": "'postgres'",
        "flowfabric.reconciler_interval_ms": 100,
    }).init().start()
    yield c
    c.stop()


def worker_pid(conn):
    row = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'flowfabric reconciler'").fetchone()
    return row[0] if row else None


def passes(conn):
    row = conn.execute("SELECT passes FROM ff_reconciler_status WHERE runner = 'bgworker'").fetchone()
    return row[0] if row else 0


def test_background_worker_settles_stale_work_without_any_call(bg_cluster):
    with bg_cluster.connect() as c:
        pid = wait_for(lambda: worker_pid(c), timeout=10)
        assert pid, "the reconciler worker did not start"
        # Before CREATE EXTENSION the worker idles quietly.
        time.sleep(0.5)
        assert "ERROR" not in bg_cluster.log()
        c.execute("CREATE EXTENSION flowfabric")
        downstreams, leased = make_stale_work(c, events=3, leases=3)
        assert wait_for(lambda: settled(c, downstreams, leased), timeout=10), bg_cluster.log()[-2000:]
        assert passes(c) > 0
        status = c.execute("SELECT last_counts, last_error FROM ff_reconciler_status").fetchone()
        assert "lease_expiry" in status[0] and status[1] is None
        assert worker_pid(c) == pid


def test_a_broken_row_does_not_crash_loop_the_worker(bg_cluster):
    with bg_cluster.connect() as c:
        pid = wait_for(lambda: worker_pid(c), timeout=10)
        c.execute("""CREATE OR REPLACE FUNCTION break_dispatch() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN IF NEW.outcome = 'poison' THEN RAISE EXCEPTION 'poisoned event'; END IF;
                     RETURN NEW; END $$""")
        c.execute("CREATE TRIGGER break_dispatch BEFORE UPDATE ON ff_completion_event FOR EACH ROW "
                  "EXECUTE FUNCTION break_dispatch()")
        try:
            c.execute("""INSERT INTO ff_completion_event (partition_key, execution_id, outcome, occurred_at_ms,
                         committed_at_ms) VALUES (0, gen_random_uuid(), 'poison', 0, 0)""")
            downstreams, leased = make_stale_work(c, events=2, leases=2, lane="after-poison")
            assert wait_for(lambda: settled(c, downstreams, leased), timeout=10)
            assert wait_for(lambda: c.execute("SELECT count(*) FROM ff_stale_completion_events "
                                              "WHERE outcome = 'poison'").fetchone()[0] == 1)
            before = passes(c)
            assert wait_for(lambda: passes(c) > before + 3, timeout=10)
            assert worker_pid(c) == pid, "the worker restarted"
            assert "poisoned event" in bg_cluster.log()
        finally:
            c.execute("DROP TRIGGER break_dispatch ON ff_completion_event")
            c.execute("DELETE FROM ff_completion_event WHERE outcome = 'poison'")


def test_sighup_changes_the_interval_and_the_switch(bg_cluster):
    with bg_cluster.connect() as c:
        wait_for(lambda: worker_pid(c), timeout=10)
        c.execute("ALTER SYSTEM SET flowfabric.enable_reconciler = off")
        c.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)
        frozen = passes(c)
        time.sleep(1.0)
        assert passes(c) == frozen, "the worker ran while disabled"
        c.execute("ALTER SYSTEM SET flowfabric.enable_reconciler = on")
        c.execute("ALTER SYSTEM SET flowfabric.reconciler_interval_ms = 2000")
        c.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)
        start = passes(c)
        time.sleep(2.5)
        slow = passes(c) - start
        assert 1 <= slow <= 2, slow
        c.execute("ALTER SYSTEM RESET flowfabric.reconciler_interval_ms")
        c.execute("ALTER SYSTEM RESET flowfabric.enable_reconciler")
        c.execute("SELECT pg_reload_conf()")
        time.sleep(2.5)
        start = passes(c)
        time.sleep(1.0)
        assert passes(c) - start >= 4


def test_sigterm_stops_the_worker_promptly(bg_cluster):
    with bg_cluster.connect() as c:
        pid = wait_for(lambda: worker_pid(c), timeout=10)
        started = time.time()
        c.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert wait_for(lambda: worker_pid(c) is None, timeout=5)
        assert time.time() - started < 2
    started = time.time()
    bg_cluster.stop()
    assert time.time() - started < 10
    bg_cluster.start()


def test_two_concurrent_runners_share_the_work(cluster, db):
    with cluster.connect(db) as c:
        downstreams, leased = make_stale_work(c, events=150, leases=150)
    totals = []

    def runner(i):
        with cluster.connect(db) as c:
            for _ in range(6):
                totals.append(c.execute("SELECT ff_run_reconcilers()").fetchone()[0])

    run_parallel(4, runner)
    with cluster.connect(db) as c:
        assert settled(c, downstreams, leased)
    assert sum(t["dependency"]["reconciled"] for t in totals) == 150
    assert sum(t["lease_expiry"]["reclaimed"] for t in totals) == 150
    assert sum(t["dependency"]["errors"] + t["lease_expiry"]["errors"] for t in totals) == 0


class Listener:
    """A LISTENing connection that collects notifications."""

    def __init__(self, cluster, db, channel):
        self.conn = cluster.connect(db)
        self.got = []
        self.conn.add_notify_handler(lambda n: self.got.append((n.channel, n.payload)))
        self.conn.execute(f'LISTEN "{channel}"')

    def poll(self, wait=0.3):
        select.select([self.conn.fileno()], [], [], wait)
        self.conn.execute("SELECT 1")  # lets psycopg read pending notifications
        got, self.got = self.got, []
        return got


def test_notify_on_new_eligible_work_only_at_commit(cluster, db):
    with cluster.connect(db) as c:
        channel = c.execute("SELECT ff_lane_channel('jobs')").fetchone()[0]
    assert channel == "ff_lane_jobs"
    listener = Listener(cluster, db, channel)
    with cluster.connect(db, autocommit=False) as c:
        c.execute("SELECT ff_create_execution('jobs') FROM generate_series(1, 5)")
        assert listener.poll() == []
        c.commit()
        assert listener.poll() == [(channel, "jobs")]  # one per lane and transaction
        c.execute("SELECT ff_create_execution('jobs')")
        c.rollback()
        assert listener.poll() == []
        c.execute("SELECT ff_create_execution('jobs', delay_until_ms => 1e15::bigint)")
        c.commit()
        assert listener.poll() == [], "a delayed execution is not eligible yet"


def test_notify_on_cascade_retry_lease_expiry_and_promotion(cluster, db):
    with cluster.connect(db) as c:
        channel = c.execute("SELECT ff_lane_channel('casc')").fetchone()[0]
        flow, (a, b) = build_flow(c, "casc", 2, [(0, 1)])
        listener = Listener(cluster, db, channel)
        listener.poll()
        eid, grant = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('casc', 'w', 'i')").fetchone()
        c.execute("SELECT ff_complete_execution(%s, %s)", (eid, grant))
        assert listener.poll() == [(channel, "casc")], "cascade made the child eligible"
        c.execute("SELECT ff_create_execution('casc', max_attempts => 3, "
                  "retry_policy => '{\"base_ms\": 1, \"jitter\": false}')")
        listener.poll()
        c.execute("SELECT 1 FROM ff_claim_for_worker('casc', 'w', 'i')")  # the child
        eid, grant = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('casc', 'w', 'i')").fetchone()
        c.execute("SELECT ff_fail_execution(%s, %s, 'again')", (eid, grant))
        assert listener.poll() == [], "the retry is announced when its backoff ends"
        c.execute("UPDATE ff_exec_core SET eligible_at_ms = 0 WHERE eligibility_state = 'not_eligible_until_time'")
        c.execute("SELECT ff_run_reconcilers()")
        assert listener.poll() == [(channel, "casc")], "delayed promotion"
        c.execute("SELECT 1 FROM ff_claim_for_worker('casc', 'w', 'i', grant_ttl_ms => 1)")
        time.sleep(0.01)
        c.execute("SELECT ff_run_reconcilers()")  # the expired lease counts as a failed attempt: backoff
        time.sleep(0.01)
        c.execute("SELECT ff_run_reconcilers()")
        assert listener.poll() == [(channel, "casc")], "lease expiry, then the end of its backoff"


@pytest.mark.skipif(not os.path.exists("/usr/share/postgresql/15/extension/pg_cron.control"),
                    reason="pg_cron is not installed")
def test_pg_cron_drains_stale_work_within_about_a_minute():
    """pg_cron 1.4 schedules by the minute, so this waits up to ~75 s."""
    cron = Cluster("cron", int(os.environ.get("FF_CRON_PORT", "54331")), conf={
        "shared_preload_libraries": "'pg_cron'",
        "cron.database_name": "'postgres'",
        "cron.use_background_workers": "on",
        "max_worker_processes": 32,
    }).init().start()
    try:
        with cron.connect() as c:
            c.execute("CREATE EXTENSION pg_cron")
            c.execute("CREATE EXTENSION flowfabric")
            downstreams, leased = make_stale_work(c, events=2, leases=2)
            c.execute("SELECT cron.schedule('ff', '* * * * *', 'SELECT flowfabric.ff_run_reconcilers()')")
            assert wait_for(lambda: settled(c, downstreams, leased), timeout=80, interval=1), cron.log()[-2000:]
            status = c.execute("SELECT status FROM cron.job_run_details ORDER BY runid DESC LIMIT 1").fetchone()
            assert status == ("succeeded",)
    finally:
        cron.stop()

"""Faults: backends killed in the middle of an operation, and a server crash
(pg_ctl stop -m immediate) under concurrent load. Committed work survives,
uncommitted work leaves no trace, and reconcilers settle the rest."""
import os
import threading
import time

import psycopg
import pytest
from psycopg.types.json import Jsonb

from cluster import Cluster, wait_for
from ffhelp import build_flow, invariant_violations, states


def kill(cluster, db, conn):
    pid = conn.info.backend_pid
    with cluster.connect(db) as c:
        assert c.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        wait_for(lambda: not c.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone())
    try:
        conn.close()
    except Exception:
        pass


@pytest.mark.parametrize("operation", ["claim", "report", "complete", "cascade", "cancel"])
def test_backend_killed_mid_operation_leaves_no_trace(cluster, db, operation):
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('b', '{t}', '{100}', '{0}')")
        flow, ids = build_flow(c, "k", 4, [(0, 1), (0, 2), (1, 3), (2, 3)], budget_ids=["b"])
        eid, grant = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('k', 'w', 'i')").fetchone()
        before = {t: c.execute(f"SELECT md5(string_agg(x::text, '|' ORDER BY x::text)) FROM {t} x").fetchone()[0]
                  for t in ("ff_exec_core", "ff_budget_usage", "ff_completion_event", "ff_edge_group",
                            "ff_budget_usage_dedup", "ff_attempt", "ff_flow_core")}
    victim = psycopg.connect(cluster.dsn(db))
    victim.execute("BEGIN")
    if operation == "claim":
        victim.execute("SELECT ff_create_execution('k2')")
        victim.execute("SELECT * FROM ff_claim_for_worker('k2', 'w', 'i')")
    elif operation == "report":
        victim.execute("SELECT * FROM ff_report_usage('b', '{\"t\": 50}', 'once')")
        victim.execute("SELECT * FROM ff_record_spend('b', %s, '{\"t\": 5}', 'spend')", (eid,))
    elif operation == "complete":
        victim.execute("SELECT ff_complete_execution(%s, %s)", (eid, grant))
    elif operation == "cascade":
        victim.execute("SELECT ff_fail_execution(%s, %s, 'fatal', false)", (eid, grant))
    else:
        victim.execute("SELECT ff_cancel_flow(%s, 'stop')", (flow,))
    kill(cluster, db, victim)
    with cluster.connect(db) as c:
        after = {t: c.execute(f"SELECT md5(string_agg(x::text, '|' ORDER BY x::text)) FROM {t} x").fetchone()[0]
                 for t in before}
        assert after == before
        assert invariant_violations(c) == []
        # The interrupted work can be done again, whole.
        c.execute("SELECT ff_complete_execution(%s, %s)", (eid, grant))
        assert set(states(c, flow).values()) == {"completed", "waiting", "waiting_children"}


def test_server_crash_under_load_loses_no_committed_work():
    crash = Cluster("crash", int(os.environ.get("FF_CRASH_PORT", "54332"))).init().start()
    try:
        with crash.connect() as c:
            c.execute("CREATE EXTENSION flowfabric")
            c.execute("SELECT ff_create_budget('b', '{tokens}', '{0}', '{0}')")
            c.execute("SELECT ff_create_quota_policy('q', 60, 0, 4)")
            quick_retry = Jsonb({"base_ms": 1, "jitter": False})
            flows = [build_flow(c, "crash", 12, [(0, i) for i in range(1, 11)] + [(i, 11) for i in range(1, 11)],
                                budget_ids=["b"], retry_policy=quick_retry)
                     for _ in range(6)]
            c.execute("SELECT ff_create_execution('crash', quota_policy_id => 'q', max_attempts => 3, budget_ids => '{b}', "
                      "retry_policy => %s) FROM generate_series(1, 200)", (quick_retry,))
            # Leases cut by the crash must be retried, not expire for good.
            c.execute("UPDATE ff_exec_core SET max_attempts = 3")
        committed, lock, stop = [], threading.Lock(), threading.Event()

        def worker(i):
            try:
                with crash.connect(autocommit=False) as w:
                    while not stop.is_set():
                        row = w.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('crash', %s, 'i', "
                                        "grant_ttl_ms => 500)", (f"w{i}",)).fetchone()
                        w.commit()
                        if row is None:
                            continue
                        w.execute("SELECT * FROM ff_record_spend('b', %s, '{\"tokens\": 3}', %s)", (row[0], row[0]))
                        w.execute("SELECT ff_complete_execution(%s, %s)", row)
                        w.commit()
                        with lock:
                            committed.append(row[0])
            except psycopg.OperationalError:
                pass  # the server went away

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: len(committed) > 60, timeout=30)
        crash.stop(mode="immediate")
        stop.set()
        for t in threads:
            t.join()
        crash.start()
        with crash.connect() as c:
            done = {r[0] for r in c.execute(
                "SELECT e.execution_id::text FROM ff_completion_event e WHERE e.outcome = 'success'").fetchall()}
            assert {eid.split("}:")[1] for eid in committed} <= done
            assert invariant_violations(c) == []
            ledger = c.execute("SELECT coalesce(sum(delta_total), 0) FROM ff_budget_usage_by_exec").fetchone()[0]
            assert c.execute("SELECT current_value FROM ff_budget_usage").fetchone()[0] == ledger
            # Leases cut by the crash expire and return to the queue; then everything can finish.
            time.sleep(0.6)
            report = c.execute("SELECT ff_run_reconcilers()").fetchone()[0]
            assert report["lease_expiry"]["errors"] == 0
            assert c.execute("SELECT count(*) FROM ff_exec_core WHERE lifecycle_phase = 'active'").fetchone()[0] == 0
            deadline = time.time() + 30
            while time.time() < deadline:
                row = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('crash', 'w', 'i')").fetchone()
                if row:
                    c.execute("SELECT ff_complete_execution(%s, %s)", row)
                    continue
                if not c.execute("SELECT count(*) FROM ff_exec_core WHERE lifecycle_phase <> 'terminal'").fetchone()[0]:
                    break
                c.execute("SELECT ff_run_reconcilers()")  # promotes retries whose backoff ended
            assert c.execute("SELECT count(*) FROM ff_exec_core WHERE lifecycle_phase <> 'terminal'").fetchone()[0] == 0
            assert c.execute("SELECT count(*) FROM ff_stale_completion_events").fetchone()[0] == 0
            assert c.execute("SELECT count(*) FROM ff_quota_admitted").fetchone()[0] == 0
            assert invariant_violations(c) == []
            for flow, _ in flows:
                assert set(states(c, flow).values()) == {"completed"}
    finally:
        crash.stop(quiet=True)

"""Budgets through real client connections: transactions, concurrency,
partitions as other languages compute them."""
import binascii
import threading
import uuid

import psycopg
import pytest

from ffhelp import run_parallel


def usage(conn, budget, dim):
    row = conn.execute("SELECT (ff_get_budget_status(%s) -> 'usage' ->> %s)::bigint", (budget, dim)).fetchone()
    return row[0] or 0


def test_partitions_match_an_independent_crc16(conn):
    # binascii.crc_hqx is CRC-CCITT with the given init: with init 0 it is XMODEM.
    assert binascii.crc_hqx(b"123456789", 0) == 0x31C3
    for budget in ["workers-a", "default", "b-\u00e9t\u00e9", str(uuid.UUID(int=7))]:
        conn.execute("SELECT ff_create_budget(%s, '{t}', '{1}', '{0}')", (budget,))
        conn.execute("SELECT ff_create_quota_policy(%s, 60, 1, 1)", (budget,))
        expected = binascii.crc_hqx(budget.encode(), 0)
        got = conn.execute("SELECT partition_key FROM ff_budget_policy WHERE budget_id = %s", (budget,)).fetchone()[0]
        assert got == expected % 32
        got = conn.execute("SELECT partition_key FROM ff_quota_policy WHERE quota_policy_id = %s", (budget,)).fetchone()[0]
        assert got == expected % 32


def test_report_then_rollback_leaves_no_trace(cluster, db):
    with cluster.connect(db, autocommit=False) as c:
        c.execute("SELECT ff_create_budget('b', '{t}', '{100}', '{0}')")
        c.execute("SELECT ff_create_execution('rb', budget_ids => '{b}')")
        eid = c.execute("SELECT execution_id FROM ff_claim_for_worker('rb', 'w', 'i')").fetchone()[0]
        c.commit()
        c.execute("SELECT * FROM ff_report_usage('b', '{\"t\": 5}', 'k1')")
        c.execute("SELECT * FROM ff_record_spend('b', %s, '{\"t\": 5}', 'k2')", (eid,))
        c.rollback()
        assert usage(c, "b", "t") == 0
        assert c.execute("SELECT count(*) FROM ff_budget_usage_dedup").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM ff_budget_usage_by_exec").fetchone()[0] == 0
        # The same dedup key is free again, and two reports in one transaction both apply.
        c.execute("SELECT * FROM ff_report_usage('b', '{\"t\": 5}', 'k1')")
        c.execute("SELECT * FROM ff_report_usage('b', '{\"t\": 6}')")
        c.commit()
        assert usage(c, "b", "t") == 11


def test_error_leaves_the_transaction_unchanged(cluster, db):
    with cluster.connect(db, autocommit=False) as c:
        c.execute("SELECT ff_create_budget('b', '{t}', '{0}', '{0}')")
        c.commit()
        c.execute("SELECT * FROM ff_report_usage('b', '{\"t\": 5}')")
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            c.execute("SELECT * FROM ff_report_usage('b', '{\"t\": -5}')")
        assert '"t"' in str(e.value) and "-5" in str(e.value)
        c.rollback()
        assert usage(c, "b", "t") == 0


def test_concurrent_reports_never_pass_the_hard_limit(cluster, db):
    limit, workers, per_worker = 150, 10, 25
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('b', '{tokens}', %s, '{0}')", ([limit],))
    outcomes = []
    lock = threading.Lock()

    def worker(i):
        with cluster.connect(db) as c:
            for _ in range(per_worker):
                o = c.execute("SELECT outcome FROM ff_report_usage('b', '{\"tokens\": 1}')").fetchone()[0]
                with lock:
                    outcomes.append(o)

    run_parallel(workers, worker)
    with cluster.connect(db) as c:
        assert usage(c, "b", "tokens") == limit
        assert outcomes.count("ok") == limit
        assert outcomes.count("hard_breach") == workers * per_worker - limit
        breaches = c.execute("SELECT breach_count FROM ff_budget_policy").fetchone()[0]
        assert breaches == workers * per_worker - limit


def test_concurrent_reports_lose_no_increment(cluster, db):
    workers, per_worker = 10, 40
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('free', '{}', '{}', '{}')")

    def worker(i):
        with cluster.connect(db) as c:
            for j in range(per_worker):
                c.execute("SELECT * FROM ff_report_usage('free', %s)",
                          (psycopg.types.json.Jsonb({"a": i + 1, "b": 1, f"w{i}": j}),))

    run_parallel(workers, worker)
    with cluster.connect(db) as c:
        assert c.execute("SELECT current_value FROM ff_budget_usage WHERE dimensions_key = 'a'").fetchone()[0] \
            == per_worker * sum(range(1, workers + 1))
        assert c.execute("SELECT current_value FROM ff_budget_usage WHERE dimensions_key = 'b'").fetchone()[0] \
            == per_worker * workers
        assert c.execute("SELECT current_value FROM ff_budget_usage WHERE dimensions_key = 'w3'").fetchone()[0] \
            == sum(range(per_worker))


def test_concurrent_reports_with_one_dedup_key_apply_once(cluster, db):
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('b', '{t}', '{0}', '{5}')")
    results = []

    def worker(i):
        with cluster.connect(db) as c:
            for k in range(20):
                row = c.execute("SELECT outcome, current_usage FROM ff_report_usage('b', '{\"t\": 7}', %s)",
                                (f"key-{k}",)).fetchone()
                results.append((k, row))

    run_parallel(8, worker)
    with cluster.connect(db) as c:
        assert usage(c, "b", "t") == 7 * 20
    by_key = {}
    for k, row in results:
        by_key.setdefault(k, set()).add(row)
    # Every caller of one key saw the same, first outcome.
    assert all(len(v) == 1 for v in by_key.values()), by_key


def test_concurrent_record_spend_and_release(cluster, db):
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('b', '{t}', '{0}', '{0}')")
        c.execute("SELECT ff_create_execution('sp', budget_ids => '{b}') FROM generate_series(1, 8)")
        execs = [r[0] for r in c.execute("SELECT execution_id FROM ff_claim_batch('{sp}', 'w', 'i', max_count => 8)")]
    assert len(execs) == 8

    def worker(i):
        with cluster.connect(db) as c:
            for k in range(10):
                c.execute("SELECT * FROM ff_record_spend('b', %s, '{\"t\": 3}', %s)", (execs[i], f"{i}-{k}"))
                c.execute("SELECT * FROM ff_record_spend('b', %s, '{\"t\": 3}', %s)", (execs[i], f"{i}-{k}"))
            if i % 2 == 0:
                c.execute("SELECT ff_release_budget('b', %s)", (execs[i],))

    run_parallel(8, worker)
    with cluster.connect(db) as c:
        assert usage(c, "b", "t") == 4 * 10 * 3


def test_reset_racing_reports_stays_consistent(cluster, db):
    """Each report and reset takes a ticket from a sequence while it holds
    the budget's lock, so tickets give the order in which they serialised;
    the final usage must equal the reports after the last reset."""
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('b', '{t}', '{0}', '{0}')")
        c.execute("CREATE SEQUENCE ticket")
    log = []
    lock = threading.Lock()

    def worker(i):
        with cluster.connect(db, autocommit=False) as c:
            for k in range(30):
                if i == 0 and k % 3 == 0:
                    c.execute("SELECT ff_reset_budget('b')")
                    kind = "reset"
                else:
                    c.execute("SELECT * FROM ff_report_usage('b', '{\"t\": 1}')")
                    kind = "report"
                t = c.execute("SELECT nextval('ticket')").fetchone()[0]
                c.commit()
                with lock:
                    log.append((t, kind))

    run_parallel(6, worker)
    log.sort()
    last_reset = max(t for t, kind in log if kind == "reset")
    expected = sum(1 for t, kind in log if kind == "report" and t > last_reset)
    with cluster.connect(db) as c:
        assert usage(c, "b", "t") == expected

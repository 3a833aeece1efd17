"""A bounded soak: concurrent producers/workers, usage reports and
reconcilers for FF_SOAK_SECONDS (20 s in CI; run longer with e.g.
`FF_SOAK_SECONDS=600 /usr/bin/python3 -m pytest tests/test_soak_client.py`).
With retention and autovacuum doing their job, table and index sizes level
off and backend memory stays flat."""
import os
import threading
import time

import psycopg

from cluster import Cluster
from ffhelp import build_flow, invariant_violations

SECONDS = float(os.environ.get("FF_SOAK_SECONDS", "20"))
TABLES = ["ff_exec_core", "ff_attempt", "ff_claim_grant", "ff_completion_event", "ff_budget_usage",
          "ff_budget_usage_dedup", "ff_budget_usage_by_exec", "ff_quota_window", "ff_flow_core", "ff_edge",
          "ff_edge_group"]


def engine_bytes(conn):
    return conn.execute("SELECT sum(pg_total_relation_size(t::regclass))::bigint FROM unnest(%s::text[]) t",
                        (TABLES,)).fetchone()[0]


def backend_bytes(conn):
    return conn.execute("SELECT sum(total_bytes)::bigint FROM pg_backend_memory_contexts").fetchone()[0]


def test_soak_sizes_and_memory_stay_bounded():
    soak = Cluster("soak", int(os.environ.get("FF_SOAK_PORT", "54334")), conf={
        "autovacuum_naptime": "1s",
        "shared_buffers": "256MB",
    }).init().start()
    try:
        with soak.connect() as c:
            c.execute("CREATE EXTENSION flowfabric")
            c.execute("ALTER DATABASE postgres SET flowfabric.retention_s = 2")
            c.execute("ALTER DATABASE postgres SET flowfabric.dedup_ttl_s = 2")
            c.execute("SELECT ff_create_budget('b', '{tokens}', '{0}', '{0}')")
            c.execute("SELECT ff_create_quota_policy('q', 2, 0, 0)")
        stop = threading.Event()
        errors, memory, sizes = [], {}, []

        def worker(i):
            try:
                with soak.connect() as w:
                    n = 0
                    while not stop.is_set():
                        if n % 10 == 0:
                            build_flow(w, "soak", 4, [(0, 1), (0, 2), (1, 3), (2, 3)], budget_ids=["b"])
                        w.execute("SELECT ff_create_execution('soak', quota_policy_id => 'q', budget_ids => '{b}')")
                        row = w.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('soak', %s, 'i')",
                                        (f"w{i}",)).fetchone()
                        if row:
                            w.execute("SELECT * FROM ff_record_spend('b', %s, '{\"tokens\": 1}', %s)", (row[0], row[0]))
                            w.execute("SELECT ff_complete_execution(%s, %s)", row)
                        n += 1
                        if n % 200 == 0:
                            memory.setdefault(i, []).append(backend_bytes(w))
            except Exception as e:  # surfaced below
                errors.append(e)

        def reconciler():
            try:
                with soak.connect() as r:
                    while not stop.is_set():
                        r.execute("SELECT ff_run_reconcilers()")
                        sizes.append((time.time(), engine_bytes(r)))
                        time.sleep(0.5)
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)] + [threading.Thread(target=reconciler)]
        for t in threads:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        with soak.connect() as c:
            assert invariant_violations(c) == []
            done = c.execute("SELECT current_value FROM ff_budget_usage").fetchone()[0]
            by_table = c.execute("SELECT c.relname, pg_relation_size(c.oid) / 1024 FROM pg_class c "
                                 "JOIN pg_class t ON t.relname = ANY(%s) AND (c.oid = t.oid OR c.oid IN "
                                 "(SELECT indexrelid FROM pg_index WHERE indrelid = t.oid)) "
                                 "ORDER BY 2 DESC LIMIT 8", (TABLES,)).fetchall()
        assert done > 500, f"only {done} executions completed"
        # After the first third (retention and autovacuum warming up) sizes level off.
        warm = [s for t, s in sizes if t >= sizes[0][0] + SECONDS / 3]
        print("soak engine KiB:", [s // 1024 for _, s in sizes][::4], "completed:", done, by_table)
        assert max(warm) <= 1.5 * warm[0] + 4 * 1024 * 1024, [s // 1024 for _, s in sizes]
        for samples in memory.values():
            settled = samples[len(samples) // 3:]
            assert max(settled) <= settled[0] + 2 * 1024 * 1024, samples
    finally:
        soak.stop(quiet=True)

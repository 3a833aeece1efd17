#!/usr/bin/env python3
"""flowfabric demo: an LLM-style fan-out flow under a token budget.

Starts (or reuses) a private PostgreSQL 15 cluster, creates the extension,
and runs:
  plan -> 8 x summarize-chunk -> merge -> publish       (tokens on budget "flow-tokens")
  plan -> safety-audit (fails) -> audit-report          (skipped by the cascade)
  8 x enrich (low priority, 500 tokens each)             (budget "enrichment", hard limit 2000)
Python and Node workers claim concurrently (LISTEN wake-up), report token
usage, and complete or fail. The enrichment budget runs out, so admission
stops and the rest of the enrichment stays queued. Prints a summary and
leaves the cluster running.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from cluster import Cluster, wait_for  # noqa: E402

import psycopg  # noqa: E402
from psycopg.types.json import Jsonb  # noqa: E402

LANE = "llm"
DB = "flowfabric_demo"


def demo_cluster():
    return Cluster("demo", int(os.environ.get("FF_DEMO_PORT", "54340")))


def start_cluster():
    c = demo_cluster()
    if os.path.exists(os.path.join(c.data, "PG_VERSION")):
        c.stop(quiet=True)
        c.start()
    else:
        c.init().start()
    c.create_db(DB)
    return c


def build(conn):
    flow = uuid.uuid4()
    ids = {}
    with conn.transaction():
        conn.execute("SELECT ff_create_budget('flow-tokens', '{tokens}', '{100000}', '{8000}')")
        conn.execute("SELECT ff_create_budget('enrichment', '{tokens}', '{2000}', '{1500}')")
        conn.execute("SELECT ff_create_flow(%s, namespace => 'demo')", (flow,))

        def node(name, priority=10, **payload):
            payload.setdefault("work_ms", 120)
            eid = conn.execute(
                "SELECT ff_create_execution(%s, payload => %s, priority => %s, flow_id => %s, budget_ids => %s)",
                (LANE, Jsonb(dict(name=name, **payload)), priority, flow,
                 [payload["budget"]] if "budget" in payload else []),
            ).fetchone()[0]
            conn.execute("SELECT ff_add_execution_to_flow(%s, %s)", (flow, eid))
            ids[name] = eid

        node("plan", budget="flow-tokens", tokens=300)
        for i in range(1, 9):
            node(f"summarize-chunk-{i}", budget="flow-tokens", tokens=400)
        node("merge", budget="flow-tokens", tokens=600)
        node("publish", tokens=0)
        node("safety-audit", fail=True, error="policy checker unavailable")
        node("audit-report")
        edges = [("plan", f"summarize-chunk-{i}") for i in range(1, 9)]
        edges += [(f"summarize-chunk-{i}", "merge") for i in range(1, 9)]
        edges += [("merge", "publish"), ("plan", "safety-audit"), ("safety-audit", "audit-report")]
        rev = conn.execute("SELECT graph_revision FROM ff_flow_core WHERE flow_id = %s", (flow,)).fetchone()[0]
        for up, down in edges:
            edge = uuid.uuid4()
            rev = conn.execute("SELECT ff_stage_dependency_edge(%s, %s, %s, %s, %s)",
                               (flow, edge, ids[up], ids[down], rev)).fetchone()[0]
            conn.execute("SELECT ff_apply_dependency_to_child(%s, %s, %s)", (flow, edge, ids[down]))
        for i in range(1, 9):
            eid = conn.execute(
                "SELECT ff_create_execution(%s, payload => %s, priority => 1, budget_ids => '{enrichment}')",
                (LANE, Jsonb({"name": f"enrich-{i}", "budget": "enrichment", "tokens": 500, "work_ms": 80})),
            ).fetchone()[0]
            ids[f"enrich-{i}"] = eid
    return flow, ids


def start_workers(dsn):
    procs = []
    for i in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "python", "worker.py"), "--dsn", dsn, "--lane", LANE,
             "--worker-id", f"py-{i + 1}", "--idle-exit-s", "2"], stdout=subprocess.PIPE, text=True))
    node = shutil.which("node")
    if node and os.path.isdir(os.path.join(HERE, "node", "node_modules")):
        procs.append(subprocess.Popen(
            [node, os.path.join(HERE, "node", "worker.js"), "--dsn", dsn, "--lane", LANE,
             "--worker-id", "node-1", "--idle-exit-s", "2"], stdout=subprocess.PIPE, text=True))
    return procs


def summarize(conn, flow, ids, workers):
    rows = conn.execute(
        "SELECT id, ff_get_execution(id) FROM unnest(%s::text[]) AS id", (list(ids.values()),)).fetchall()
    by_id = {r[0]: r[1] for r in rows}
    print("\n== executions ==")
    for name, eid in ids.items():
        info = by_id[eid]
        who = (info.get("result") or {}).get("worker", "")
        note = info.get("last_error") or info.get("cancellation_reason") or ""
        print(f"  {name:<20} {info['public_state']:<17} {who:<8} {note}")
    print("\n== workers ==")
    for w in workers:
        print(f"  {w['worker']:<8} ({w['lang']}): completed {w['completed']}, failed {w['failed']}, "
              f"refused by budget {w['budget_refused']}, lost lease {w['lost']}")
    print("\n== budgets ==")
    for b in ("flow-tokens", "enrichment"):
        s = conn.execute("SELECT ff_get_budget_status(%s)", (b,)).fetchone()[0]
        print(f"  {b:<12} usage {s['usage']} hard {s['hard_limits']} soft {s['soft_limits']} "
              f"breaches {s['breach_count']} soft breaches {s['soft_breach_count']}")
    print("\n== queue ==")
    for lane, state, n in conn.execute("SELECT lane_id, public_state, executions FROM ff_queue_depth ORDER BY 1, 2"):
        print(f"  {lane}: {n} {state}")
    return by_id


def check(by_id, ids, conn):
    """What must hold after every demo run (used by the test suite)."""
    state = {name: by_id[eid]["public_state"] for name, eid in ids.items()}
    flow_nodes = ["plan", "merge", "publish"] + [f"summarize-chunk-{i}" for i in range(1, 9)]
    assert all(state[n] == "completed" for n in flow_nodes), state
    assert state["safety-audit"] == "failed" and state["audit-report"] == "skipped", state
    enrich = [state[f"enrich-{i}"] for i in range(1, 9)]
    assert set(enrich) <= {"completed", "failed", "waiting"}, enrich
    assert "waiting" in enrich, "the enrichment budget should have stopped admission"
    usage = conn.execute("SELECT ff_get_budget_status('enrichment') -> 'usage' ->> 'tokens'").fetchone()[0]
    assert int(usage) <= 2000 and enrich.count("completed") * 500 == int(usage), (usage, enrich)


def main():
    p = argparse.ArgumentParser(description="flowfabric demo")
    p.add_argument("--check", action="store_true", help="assert the outcome and stop the cluster (for tests)")
    p.add_argument("--stop", action="store_true", help="stop the demo cluster")
    args = p.parse_args()
    if args.stop:
        demo_cluster().stop(quiet=True)
        print("demo cluster stopped")
        return 0
    cluster = start_cluster()
    dsn = cluster.dsn(DB)
    with psycopg.connect(dsn, autocommit=True) as conn:
        flow, ids = build(conn)
        print(f"created flow {flow}: {len(ids) - 8} executions in the DAG, 8 enrichment executions")
        procs = start_workers(dsn)
        print(f"started {len(procs)} workers ({', '.join('node' if 'node' in p.args[0] else 'python' for p in procs)})")
        stats = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
        by_id = summarize(conn, flow, ids, stats)
        if args.check:
            check(by_id, ids, conn)
    if args.check:
        cluster.stop()
        print("\ndemo check passed")
    else:
        print(f"\nThe cluster keeps running. Connect with:\n  psql \"{dsn}\"\n"
              f"Stop it with:\n  scripts/demo.sh stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""flowfabric demo: an LLM-style flow and token budgets that stop admission.

Starts (or reuses) a private PostgreSQL 15 cluster, creates the extension,
and runs, with two Python workers and one Node worker claiming concurrently
(LISTEN wake-up, batch claims):

  one flow, submitted in one call (ff_submit_flow):
    plan -> 8 x summarize-chunk -> merge -> publish     (tokens on "flow-tokens";
                                                         merge reads its parents' results)
    plan -> safety-audit (fails) -> audit-report        (skipped by the cascade)
  20 x enrich, low priority, 120-380 tokens each        (budget "enrichment": 4,000
                                                         tokens, 400 reserved per claim)

Each enrichment claim reserves 400 tokens, so admission stops while the
budget can still pay for everything already running: no spend is refused,
and the rest of the enrichment stays queued. Crossing the soft limit is
announced on ff_budget_events, and the flow's end on ff_flow_events; the
demo prints both. Prints a summary and leaves the cluster running.
"""
import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import threading
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from cluster import Cluster  # noqa: E402

import psycopg  # noqa: E402
from psycopg.types.json import Jsonb  # noqa: E402

LANE = "llm"
DB = "flowfabric_demo"
ENRICH_LIMIT, ENRICH_SOFT, RESERVE = 4_000, 3_000, 400
CHUNKS, ENRICH = 8, 20


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


def build(conn, rng):
    """Budgets, the flow (one ff_submit_flow call) and the enrichment batch."""
    conn.execute("SELECT flowfabric.ff_create_budget('flow-tokens', '{tokens}', '{100000}', '{8000}')")
    conn.execute("SELECT flowfabric.ff_create_budget('enrichment', '{tokens}', %s, %s, on_soft_limit => 'notify')",
                 ([ENRICH_LIMIT], [ENRICH_SOFT]))

    def node(name, priority=10, **payload):
        payload.setdefault("work_ms", 120)
        n = {"name": name, "lane": LANE, "priority": priority, "payload": dict(name=name, **payload)}
        if "budget" in payload:
            n["budget_ids"] = [payload["budget"]]
        return n

    nodes = [node("plan", budget="flow-tokens", tokens=rng.randint(200, 400))]
    nodes += [node(f"summarize-chunk-{i}", budget="flow-tokens", tokens=rng.randint(200, 600))
              for i in range(1, CHUNKS + 1)]
    nodes += [node("merge", budget="flow-tokens", tokens=rng.randint(400, 800), inputs=True),
              node("publish", inputs=True),
              node("safety-audit", fail=True, error="policy checker unavailable"),
              node("audit-report")]
    edges = [("plan", f"summarize-chunk-{i}") for i in range(1, CHUNKS + 1)]
    edges += [(f"summarize-chunk-{i}", "merge") for i in range(1, CHUNKS + 1)]
    edges += [("merge", "publish"), ("plan", "safety-audit"), ("safety-audit", "audit-report")]
    spec = {"flow_id": str(uuid.uuid4()), "namespace": "demo", "nodes": nodes,
            "edges": [{"from": a, "to": b} for a, b in edges]}
    answer = conn.execute("SELECT flowfabric.ff_submit_flow(%s)", (Jsonb(spec),)).fetchone()[0]
    ids = dict(answer["executions"])
    payloads = [Jsonb({"name": f"enrich-{i}", "budget": "enrichment", "tokens": rng.randint(120, 380),
                       "work_ms": 80}) for i in range(1, ENRICH + 1)]
    enrich = conn.execute(
        "SELECT flowfabric.ff_create_executions(%s, %s::jsonb[], priority => 1, budget_ids => '{enrichment}', "
        "budget_reserve => %s)", (LANE, payloads, Jsonb({"tokens": RESERVE}))).fetchone()[0]
    ids.update({f"enrich-{i}": eid for i, eid in enumerate(enrich, 1)})
    return answer["flow_id"], ids


class Alerts(threading.Thread):
    """Collects ff_budget_events and ff_flow_events as they arrive."""

    def __init__(self, dsn):
        super().__init__(daemon=True)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.events, self.stop = [], threading.Event()
        self.conn.add_notify_handler(self.arrived)
        self.conn.execute("LISTEN ff_budget_events")
        self.conn.execute("LISTEN ff_flow_events")

    def arrived(self, n):
        event = json.loads(n.payload)
        self.events.append((n.channel, event))
        if n.channel == "ff_budget_events":
            print(f"  ALERT {event['budget_id']}: {event['event']} on {event['dimension']}, "
                  f"usage {event['usage']} > limit {event['limit']}", flush=True)
        else:
            print(f"  flow {event['flow_id']} ended {event['state']}", flush=True)

    def run(self):
        while not self.stop.is_set():
            select.select([self.conn.fileno()], [], [], 0.2)
            self.conn.execute("SELECT 1")  # lets psycopg read what arrived


def start_workers(dsn):
    procs = []
    for i in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "python", "worker.py"), "--dsn", dsn, "--lane", LANE,
             "--worker-id", f"py-{i + 1}", "--batch", "4", "--idle-exit-s", "2"], stdout=subprocess.PIPE, text=True))
    node = shutil.which("node")
    if node and os.path.isdir(os.path.join(HERE, "node", "node_modules")):
        procs.append(subprocess.Popen(
            [node, os.path.join(HERE, "node", "worker.js"), "--dsn", dsn, "--lane", LANE,
             "--worker-id", "node-1", "--batch", "4", "--idle-exit-s", "2"], stdout=subprocess.PIPE, text=True))
    return procs


def summarize(conn, flow, ids, workers):
    rows = conn.execute(
        "SELECT id, flowfabric.ff_get_execution(id) FROM unnest(%s::text[]) AS id", (list(ids.values()),)).fetchall()
    by_id = {r[0]: r[1] for r in rows}
    print("\n== executions ==")
    for name, eid in ids.items():
        info = by_id[eid]
        who = (info.get("result") or {}).get("worker", "")
        note = info.get("last_error") or info.get("cancellation_reason") or ""
        tokens = (info.get("payload") or {}).get("tokens", "")
        print(f"  {name:<20} {info['public_state']:<17} {who:<8} {str(tokens):>5} {note}")
    print("\n== workers ==")
    for w in workers:
        print(f"  {w['worker']:<8} ({w['lang']}): completed {w['completed']}, failed {w['failed']}, "
              f"tokens {w['tokens']}, refused by budget {w['budget_refused']}, lost lease {w['lost']}")
    print("\n== budgets ==")
    for b in ("flow-tokens", "enrichment"):
        s = conn.execute("SELECT flowfabric.ff_get_budget_status(%s)", (b,)).fetchone()[0]
        print(f"  {b:<12} usage {s['usage']} reserved {s['reserved']} hard {s['hard_limits']} "
              f"soft {s['soft_limits']} breaches {s['breach_count']} soft breaches {s['soft_breach_count']}")
    f = conn.execute("SELECT flowfabric.ff_get_flow(%s)", (flow,)).fetchone()[0]
    print(f"\n== flow ==\n  {flow}: {f['state']} {f['counts']}")
    print("\n== queue ==")
    for lane, state, n in conn.execute(
            "SELECT lane_id, public_state, executions FROM flowfabric.ff_queue_depth ORDER BY 1, 2"):
        print(f"  {lane}: {n} {state}")
    return by_id, f


def check(by_id, ids, flow, events, conn):
    """What must hold after every demo run (used by the test suite)."""
    state = {name: by_id[eid]["public_state"] for name, eid in ids.items()}
    flow_nodes = ["plan", "merge", "publish"] + [f"summarize-chunk-{i}" for i in range(1, CHUNKS + 1)]
    assert all(state[n] == "completed" for n in flow_nodes), state
    assert state["safety-audit"] == "failed" and state["audit-report"] == "skipped", state
    merge_inputs = by_id[ids["merge"]]["result"]["inputs"]
    assert merge_inputs == sorted(f"summarize-chunk-{i}" for i in range(1, CHUNKS + 1)), merge_inputs
    assert flow["state"] == "failed", flow
    assert ("ff_flow_events", {"flow_id": flow["flow_id"], "state": "failed"}) in events, events
    enrich = {name: by_id[eid] for name, eid in ids.items() if name.startswith("enrich-")}
    states = [e["public_state"] for e in enrich.values()]
    assert set(states) <= {"completed", "waiting"}, states
    assert "waiting" in states, "the enrichment budget should have stopped admission"
    status = conn.execute("SELECT flowfabric.ff_get_budget_status('enrichment')").fetchone()[0]
    used = sum(e["payload"]["tokens"] for e in enrich.values() if e["public_state"] == "completed")
    assert status["usage"]["tokens"] == used <= ENRICH_LIMIT, (status, used)
    assert status["breach_count"] == 0, "reservations kept every spend within the limit"
    assert status["reserved"] == {}, status
    alerts = [e for ch, e in events if ch == "ff_budget_events" and e["budget_id"] == "enrichment"]
    assert used <= ENRICH_SOFT or any(a["event"] == "soft_breach" for a in alerts), alerts


def main():
    p = argparse.ArgumentParser(description="flowfabric demo")
    p.add_argument("--check", action="store_true", help="assert the outcome and stop the cluster (for tests)")
    p.add_argument("--stop", action="store_true", help="stop the demo cluster")
    p.add_argument("--seed", type=int, default=int(os.environ.get("FF_DEMO_SEED", "42")))
    args = p.parse_args()
    if args.stop:
        demo_cluster().stop(quiet=True)
        print("demo cluster stopped")
        return 0
    cluster = start_cluster()
    dsn = cluster.dsn(DB, search_path=None)
    alerts = Alerts(dsn)
    alerts.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        flow, ids = build(conn, random.Random(args.seed))
        print(f"submitted flow {flow} ({len(ids) - ENRICH} steps) and {ENRICH} enrichment executions")
        procs = start_workers(dsn)
        print(f"started {len(procs)} workers ({', '.join('node' if 'node' in p.args[0] else 'python' for p in procs)})")
        stats = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
        alerts.stop.set()
        alerts.join()
        by_id, f = summarize(conn, flow, ids, stats)
        if args.check:
            check(by_id, ids, f, alerts.events, conn)
    if args.check:
        cluster.stop()
        print("\ndemo check passed")
    else:
        print(f"\nThe cluster keeps running. Connect with:\n  psql \"{dsn}\"\n"
              f"and SET search_path = flowfabric, public; to call the API unqualified.\n"
              f"Stop it with:\n  scripts/demo.sh stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())

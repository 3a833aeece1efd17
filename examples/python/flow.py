#!/usr/bin/env python3
"""Submit a flow in one call and wait for it to finish, with psycopg 3.

Builds a small document pipeline with ff_submit_flow:

    fetch -> summarize --\\
          -> classify  ---> report (all_of)

LISTENs on ff_flow_events, waits for the flow's terminal notification
(completed, failed or cancelled) and prints the flow and the report's
result. The report step reads its parents' results with ff_get_inputs.

Run it next to workers serving --lane (e.g. examples/python/worker.py), or
pass --work to run a worker in this process.
"""
import argparse
import json
import select
import sys
import threading
import time
import uuid

import psycopg
from psycopg.types.json import Jsonb


def spec(lane, document):
    return {
        "flow_id": str(uuid.uuid4()),
        "namespace": "examples",
        "nodes": [
            {"name": "fetch", "lane": lane, "payload": {"step": "fetch", "document": document}},
            {"name": "summarize", "lane": lane, "payload": {"step": "summarize", "inputs": True}},
            {"name": "classify", "lane": lane, "payload": {"step": "classify", "inputs": True}},
            {"name": "report", "lane": lane, "payload": {"step": "report", "inputs": True}, "priority": 10},
        ],
        "edges": [
            {"from": "fetch", "to": "summarize"},
            {"from": "fetch", "to": "classify"},
            {"from": "summarize", "to": "report"},
            {"from": "classify", "to": "report"},
        ],
    }


def work(dsn, lane, stop):
    """A minimal in-process worker: each step's result names the step and
    what it received from its parents."""
    with psycopg.connect(dsn, autocommit=True) as c:
        while not stop.is_set():
            rows = c.execute("SELECT execution_id, grant_key, payload FROM flowfabric.ff_claim_batch("
                             "ARRAY[%s], 'flow-example', 'flow-example-1')", (lane,)).fetchall()
            if not rows:
                time.sleep(0.05)
                continue
            for eid, grant, payload in rows:
                inputs = c.execute("SELECT flowfabric.ff_get_inputs(%s)", (eid,)).fetchone()[0]
                result = {"step": payload["step"], "from_parents": inputs}
                c.execute("SELECT flowfabric.ff_complete_execution(%s, %s, %s)", (eid, grant, Jsonb(result)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--lane", default="documents")
    p.add_argument("--document", default="https://example.org/annual-report.pdf")
    p.add_argument("--work", action="store_true", help="run a worker for --lane in this process")
    p.add_argument("--timeout-s", type=float, default=60)
    args = p.parse_args()

    listener = psycopg.connect(args.dsn, autocommit=True)
    events = []
    listener.add_notify_handler(lambda n: events.append(json.loads(n.payload)))
    listener.execute("LISTEN ff_flow_events")
    with psycopg.connect(args.dsn, autocommit=True) as c:
        answer = c.execute("SELECT flowfabric.ff_submit_flow(%s)", (Jsonb(spec(args.lane, args.document)),)).fetchone()[0]
    flow_id = answer["flow_id"]
    print(f"submitted flow {flow_id}: {', '.join(answer['executions'])}", flush=True)

    stop = threading.Event()
    if args.work:
        threading.Thread(target=work, args=(args.dsn, args.lane, stop), daemon=True).start()

    state, deadline = None, time.time() + args.timeout_s
    while state is None and time.time() < deadline:
        select.select([listener.fileno()], [], [], 1.0)
        listener.execute("SELECT 1")  # lets psycopg read what arrived
        state = next((e["state"] for e in events if e["flow_id"] == flow_id), None)
    stop.set()
    if state is None:
        print("the flow did not finish in time", file=sys.stderr)
        return 1
    with psycopg.connect(args.dsn, autocommit=True) as c:
        flow = c.execute("SELECT flowfabric.ff_get_flow(%s)", (flow_id,)).fetchone()[0]
        report = c.execute("SELECT flowfabric.ff_get_execution(%s) -> 'result'",
                           (answer["executions"]["report"],)).fetchone()[0]
    print(f"flow {flow_id} is {state}: {flow['counts']}")
    print(f"report result: {json.dumps(report)}")
    return 0 if state == "completed" else 2


if __name__ == "__main__":
    sys.exit(main())

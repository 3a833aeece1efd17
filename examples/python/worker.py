#!/usr/bin/env python3
"""A flowfabric worker in Python with psycopg 3.

It LISTENs on its lanes' channels instead of polling, and claims up to
--batch executions at a time with ff_claim_batch (each row carries the
payload, so no second round trip). For each one it does the "work",
renews the lease on long work, reads its upstream results with
ff_get_inputs when the payload asks for them, then records token spend
and completes in one transaction. A spend refused with hard_breach means
the budget is exhausted: the execution is failed for good instead.

Calls are schema-qualified (flowfabric.ff_...), so the worker does not
depend on its search_path.

Payload keys it understands (all optional):
  work_ms  how long the "work" takes          tokens  usage to record
  budget   budget to record the tokens on     fail    fail for good
  inputs   read upstream results first        error   the failure message
Prints one JSON summary line when it exits.
"""
import argparse
import json
import select
import signal
import sys
import time

import psycopg
from psycopg.types.json import Jsonb

LEASE_MS = 10_000


class Worker:
    def __init__(self, dsn, lanes, worker_id, capabilities=(), batch=10):
        self.lanes, self.worker_id, self.caps, self.batch = list(lanes), worker_id, list(capabilities), batch
        self.instance = f"{worker_id}-{int(time.time() * 1000)}"
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.listener = psycopg.connect(dsn, autocommit=True)
        self.stats = {"worker": worker_id, "lang": "python", "completed": 0, "failed": 0, "lost": 0,
                      "budget_refused": 0, "tokens": 0}
        self.stopping = False
        for lane in self.lanes:
            channel = self.conn.execute("SELECT flowfabric.ff_lane_channel(%s)", (lane,)).fetchone()[0]
            self.listener.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))

    def wait_for_work(self, timeout):
        """Sleeps until a notification for one of the lanes arrives or `timeout` passes."""
        ready, _, _ = select.select([self.listener.fileno()], [], [], timeout)
        if ready:
            self.listener.execute("SELECT 1")  # consume the notifications

    def claim(self):
        """One transaction of its own: the lease is held once it commits."""
        return self.conn.execute(
            "SELECT execution_id, grant_key, payload, attempt FROM flowfabric.ff_claim_batch("
            "%s, %s, %s, %s, grant_ttl_ms => %s, max_count => %s)",
            (self.lanes, self.worker_id, self.instance, self.caps, LEASE_MS, self.batch)).fetchall()

    def handle(self, execution_id, grant, payload, attempt):
        payload = payload or {}
        try:
            work_ms = int(payload.get("work_ms", 0))
            time.sleep(work_ms / 2000)
            if work_ms > 0:
                self.conn.execute("SELECT flowfabric.ff_renew_lease(%s, %s, %s)", (execution_id, grant, LEASE_MS))
            time.sleep(work_ms / 2000)
            inputs = {}
            if payload.get("inputs"):
                inputs = self.conn.execute("SELECT flowfabric.ff_get_inputs(%s)", (execution_id,)).fetchone()[0]
            if payload.get("fail"):
                self.conn.execute("SELECT flowfabric.ff_fail_execution(%s, %s, %s, false)",
                                  (execution_id, grant, payload.get("error", "task failed")))
                self.stats["failed"] += 1
                return
            result = {"worker": self.worker_id, "lang": "python", "attempt": attempt, "inputs": sorted(inputs)}
            with self.conn.transaction():
                if payload.get("budget") and payload.get("tokens"):
                    tokens = int(payload["tokens"])
                    outcome = self.conn.execute(
                        "SELECT outcome FROM flowfabric.ff_record_spend(%s, %s, %s, %s)",
                        (payload["budget"], execution_id, Jsonb({"tokens": tokens}),
                         f"{execution_id}/attempt-{attempt}")).fetchone()[0]
                    if outcome == "hard_breach":
                        # The spend was not booked: the budget is exhausted.
                        self.conn.execute("SELECT flowfabric.ff_fail_execution(%s, %s, 'budget exhausted', false)",
                                          (execution_id, grant))
                        self.stats["budget_refused"] += 1
                        return
                    self.stats["tokens"] += tokens
                self.conn.execute("SELECT flowfabric.ff_complete_execution(%s, %s, %s)",
                                  (execution_id, grant, Jsonb(result)))
            self.stats["completed"] += 1
        except psycopg.errors.ObjectNotInPrerequisiteState:
            # The lease is gone: the execution was cancelled or reclaimed.
            self.stats["lost"] += 1

    def run(self, idle_exit_s=None, max_wait_s=5.0):
        idle_since = time.time()
        while not self.stopping:
            rows = self.claim()
            for row in rows:
                self.handle(*row)
            if rows:
                idle_since = time.time()
                continue
            if idle_exit_s is not None and time.time() - idle_since >= idle_exit_s:
                break
            self.wait_for_work(max_wait_s if idle_exit_s is None else min(max_wait_s, idle_exit_s))
        return self.stats


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--lane", action="append", required=True, help="a lane to serve; repeat for several, in order")
    p.add_argument("--worker-id", default="py-worker")
    p.add_argument("--capability", action="append", default=[])
    p.add_argument("--batch", type=int, default=10, help="most executions claimed at once")
    p.add_argument("--idle-exit-s", type=float, default=None, help="exit after this long without work")
    args = p.parse_args()
    worker = Worker(args.dsn, args.lane, args.worker_id, args.capability, args.batch)
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "stopping", True))
    stats = worker.run(idle_exit_s=args.idle_exit_s)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

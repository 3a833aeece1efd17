#!/usr/bin/env python3
"""A flowfabric worker in Python with psycopg 3.

It LISTENs on its lane's channel instead of polling, claims one execution at
a time, renews the lease on long work, reports token usage against the
budget named in the payload, then completes or fails the execution.

Payload keys it understands (all optional):
  work_ms  how long the "work" takes            tokens  usage to report
  budget   budget to report the tokens against  fail    fail for good
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
    def __init__(self, dsn, lane, worker_id, capabilities=()):
        self.lane, self.worker_id, self.caps = lane, worker_id, list(capabilities)
        self.instance = f"{worker_id}-{int(time.time() * 1000)}"
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.listener = psycopg.connect(dsn, autocommit=True)
        self.stats = {"worker": worker_id, "lang": "python", "completed": 0, "failed": 0, "lost": 0,
                      "budget_refused": 0}
        self.stopping = False
        channel = self.conn.execute("SELECT ff_lane_channel(%s)", (lane,)).fetchone()[0]
        self.listener.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))

    def wait_for_work(self, timeout):
        """Sleeps until a notification for the lane arrives or `timeout` passes."""
        ready, _, _ = select.select([self.listener.fileno()], [], [], timeout)
        if ready:
            self.listener.execute("SELECT 1")  # consume the notifications

    def claim(self):
        return self.conn.execute(
            "SELECT execution_id, grant_key FROM ff_claim_for_worker(%s, %s, %s, %s, grant_ttl_ms => %s)",
            (self.lane, self.worker_id, self.instance, self.caps, LEASE_MS)).fetchone()

    def handle(self, execution_id, grant):
        payload = self.conn.execute("SELECT ff_get_execution(%s) -> 'payload'", (execution_id,)).fetchone()[0] or {}
        try:
            work_ms = int(payload.get("work_ms", 0))
            time.sleep(work_ms / 2000)
            if work_ms > 0:
                self.conn.execute("SELECT ff_renew_lease(%s, %s, %s)", (execution_id, grant, LEASE_MS))
            time.sleep(work_ms / 2000)
            if payload.get("fail"):
                self.conn.execute("SELECT ff_fail_execution(%s, %s, %s, false)",
                                  (execution_id, grant, payload.get("error", "task failed")))
                self.stats["failed"] += 1
                return
            if payload.get("budget") and payload.get("tokens"):
                outcome = self.conn.execute(
                    "SELECT outcome FROM ff_record_spend(%s, %s, %s, %s)",
                    (payload["budget"], execution_id, Jsonb({"tokens": int(payload["tokens"])}),
                     f"{execution_id}/{grant[-16:]}")).fetchone()[0]
                if outcome == "hard_breach":
                    self.conn.execute("SELECT ff_fail_execution(%s, %s, 'budget exhausted', false)",
                                      (execution_id, grant))
                    self.stats["budget_refused"] += 1
                    return
            self.conn.execute("SELECT ff_complete_execution(%s, %s, %s)",
                              (execution_id, grant, Jsonb({"worker": self.worker_id, "lang": "python"})))
            self.stats["completed"] += 1
        except psycopg.errors.ObjectNotInPrerequisiteState:
            # The lease is gone: the execution was cancelled or reclaimed.
            self.stats["lost"] += 1

    def run(self, idle_exit_s=None, max_wait_s=5.0):
        idle_since = time.time()
        while not self.stopping:
            row = self.claim()
            if row:
                self.handle(*row)
                idle_since = time.time()
                continue
            if idle_exit_s is not None and time.time() - idle_since >= idle_exit_s:
                break
            self.wait_for_work(max_wait_s if idle_exit_s is None else min(max_wait_s, idle_exit_s))
        return self.stats


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--lane", required=True)
    p.add_argument("--worker-id", default="py-worker")
    p.add_argument("--capability", action="append", default=[])
    p.add_argument("--idle-exit-s", type=float, default=None, help="exit after this long without work")
    args = p.parse_args()
    worker = Worker(args.dsn, args.lane, args.worker_id, args.capability)
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "stopping", True))
    stats = worker.run(idle_exit_s=args.idle_exit_s)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

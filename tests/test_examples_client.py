"""The example workers in other languages, run as real programs against a
real cluster: Python (psycopg 3) and Node (pg)."""
import json
import os
import shutil
import subprocess
import sys
import time

import psycopg
import pytest
from psycopg.types.json import Jsonb

from cluster import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = {
    "python": [sys.executable, os.path.join(ROOT, "examples", "python", "worker.py")],
    "node": [shutil.which("node") or "node", os.path.join(ROOT, "examples", "node", "worker.js")],
}


def start(lang, cluster, db, lane, worker_id, idle_exit_s, batch=10):
    # The examples call flowfabric.ff_... and need nothing on their search_path.
    dsn = cluster.dsn(db, search_path=None)
    return subprocess.Popen(WORKERS[lang] + ["--dsn", dsn, "--lane", lane, "--worker-id", worker_id,
                                             "--batch", str(batch), "--idle-exit-s", str(idle_exit_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("lang", ["python", "node"])
def test_worker_claims_renews_reports_and_finishes(cluster, db, lang):
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('tok', '{tokens}', '{1000}', '{0}')")
        ok = [c.execute("SELECT ff_create_execution('ex', payload => %s, budget_ids => '{tok}')",
                        (Jsonb({"work_ms": 30, "budget": "tok", "tokens": 100 + i}),)).fetchone()[0] for i in range(6)]
        bad = c.execute("SELECT ff_create_execution('ex', payload => '{\"fail\": true}')").fetchone()[0]
    procs = [start(lang, cluster, db, "ex", f"{lang}-{i}", 1.5, batch=2) for i in range(2)]
    stats = [finish(p) for p in procs]
    assert sum(s["completed"] for s in stats) == 6
    assert sum(s["failed"] for s in stats) == 1
    assert all(s["lang"] == lang for s in stats)
    with cluster.connect(db) as c:
        for eid in ok:
            info = c.execute("SELECT ff_get_execution(%s)", (eid,)).fetchone()[0]
            assert info["public_state"] == "completed" and info["result"]["lang"] == lang
        assert c.execute("SELECT ff_get_execution(%s) ->> 'public_state'", (bad,)).fetchone()[0] == "failed"
        assert c.execute("SELECT ff_get_budget_status('tok') -> 'usage' ->> 'tokens'").fetchone()[0] == "615"
        renewed = c.execute("SELECT count(*) FROM ff_attempt WHERE lease_epoch > 1").fetchone()[0]
        assert renewed == 6


@pytest.mark.parametrize("lang", ["python", "node"])
def test_worker_stops_at_the_budget(cluster, db, lang):
    """A batch claim admits work before any of it spends; a reserve per
    execution is what keeps admission honest: two fit, the rest wait, and no
    spend is refused."""
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('small', '{tokens}', '{250}', '{0}')")
        c.execute("SELECT ff_create_execution('bud', budget_ids => '{small}', budget_reserve => '{\"tokens\": 100}', "
                  "payload => %s) FROM generate_series(1, 5)", (Jsonb({"budget": "small", "tokens": 97}),))
    stats = finish(start(lang, cluster, db, "bud", "solo", 1.0))
    assert stats["completed"] == 2 and stats["budget_refused"] == 0, stats
    with cluster.connect(db) as c:
        assert c.execute("SELECT count(*) FROM ff_exec_core WHERE public_state = 'waiting'").fetchone()[0] == 3
        assert c.execute("SELECT ff_get_budget_status('small') -> 'usage' ->> 'tokens'").fetchone()[0] == "194"


@pytest.mark.parametrize("lang", ["python", "node"])
def test_worker_passes_results_down_a_flow(cluster, db, lang):
    with cluster.connect(db) as c:
        answer = c.execute("SELECT ff_submit_flow(%s)", (Jsonb({
            "nodes": [{"name": "a", "lane": "fl"}, {"name": "b", "lane": "fl"},
                      {"name": "join", "lane": "fl", "payload": {"inputs": True}}],
            "edges": [{"from": "a", "to": "join"}, {"from": "b", "to": "join"}]}),)).fetchone()[0]
    stats = finish(start(lang, cluster, db, "fl", "flow-worker", 1.0))
    assert stats["completed"] == 3
    with cluster.connect(db) as c:
        result = c.execute("SELECT ff_get_execution(%s) -> 'result'", (answer["executions"]["join"],)).fetchone()[0]
        assert result["inputs"] == ["a", "b"]
        assert c.execute("SELECT ff_get_flow(%s) ->> 'state'", (answer["flow_id"],)).fetchone()[0] == "completed"


def test_flow_example_submits_and_waits_for_the_end(cluster, db):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "python", "flow.py"),
                          "--dsn", cluster.dsn(db, search_path=None), "--work", "--timeout-s", "30"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "is completed" in out.stdout, out.stdout
    assert '"from_parents": {"classify"' in out.stdout, out.stdout


@pytest.mark.parametrize("lang", ["python", "node"])
def test_worker_wakes_on_notify(cluster, db, lang):
    """The worker waits up to 5 s between polls, so finishing new work well
    inside that shows it was woken by the lane notification."""
    proc = start(lang, cluster, db, "wake", "sleeper", 8)
    with cluster.connect(db) as c:
        time.sleep(1.5)  # the worker is idle and LISTENing now
        eid = c.execute("SELECT ff_create_execution('wake')").fetchone()[0]
        created = time.time()
        done = wait_for(lambda: c.execute("SELECT ff_get_execution(%s) ->> 'public_state'",
                                          (eid,)).fetchone()[0] == "completed", timeout=10, interval=0.02)
        woke_after = time.time() - created
    proc.terminate()
    assert finish(proc)["completed"] == 1
    assert done and woke_after < 2.5, woke_after

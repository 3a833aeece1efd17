"""Flows end to end through SQL: concurrent workers in random order, deep
graphs, and a backend killed in the middle of a cascade."""
import threading
import time
import uuid

import psycopg
from psycopg.types.json import Jsonb
import pytest

from cluster import wait_for
from ffhelp import build_flow, run_parallel, state_of, states, work


def run_workers(cluster, db, lane, flow, n=8, timeout=120):
    """n workers drain `lane` until every member of `flow` is terminal."""
    deadline = time.time() + timeout
    with cluster.connect(db) as c:
        def settled():
            left = c.execute("SELECT count(*) FROM ff_exec_core WHERE flow_id = %s AND lifecycle_phase <> 'terminal'",
                             (flow,)).fetchone()[0]
            return left == 0 or time.time() > deadline

        lock = threading.Lock()

        def stop():
            with lock:
                return settled()

        run_parallel(n, lambda i: work(cluster.dsn(db), lane, stop, f"w{i}"))
        assert time.time() <= deadline, "flow did not settle in time"


def test_diamond_in_random_order(cluster, db):
    for round_ in range(5):
        with cluster.connect(db) as c:
            flow, (a, b, cc, d) = build_flow(c, f"dia{round_}", 4, [(0, 1), (0, 2), (1, 3), (2, 3)])
        run_workers(cluster, db, f"dia{round_}", flow, n=4)
        with cluster.connect(db) as c:
            assert set(states(c, flow).values()) == {"completed"}
            order = [r[0] for r in c.execute(
                "SELECT execution_id::text FROM ff_completion_event WHERE flow_id = %s ORDER BY event_id",
                (flow,)).fetchall()]
            assert order[0] == a.split("}:")[1] and order[-1] == d.split("}:")[1]


def test_any_of_fan_in_with_cancel_remaining(cluster, db):
    with cluster.connect(db) as c:
        flow, ids = build_flow(c, "anyof", 6, [(i, 5) for i in range(5)],
                               policies={5: {"kind": "any_of", "on_satisfied": "cancel_remaining"}})
    run_workers(cluster, db, "anyof", flow)
    with cluster.connect(db) as c:
        st = [state_of(c, e) for e in ids]
        assert st[5] == "completed"
        assert all(s in ("completed", "cancelled") for s in st[:5]), st
        assert "completed" in st[:5]
        assert c.execute("SELECT group_state FROM ff_edge_group WHERE flow_id = %s", (flow,)).fetchone()[0] == "satisfied"
        # Every member ended with exactly one completion event, all dispatched.
        assert c.execute("SELECT count(*), count(DISTINCT execution_id), count(dispatched_at_ms) "
                         "FROM ff_completion_event WHERE flow_id = %s", (flow,)).fetchone() == (6, 6, 6)


def test_quorum_two_of_three(cluster, db):
    with cluster.connect(db) as c:
        flow, ids = build_flow(c, "quorum", 4, [(0, 3), (1, 3), (2, 3)],
                               policies={3: {"kind": "quorum", "k": 2, "on_satisfied": "let_run"}},
                               payloads={0: {"fail": True}})
    run_workers(cluster, db, "quorum", flow)
    with cluster.connect(db) as c:
        assert [state_of(c, e) for e in ids] == ["failed", "completed", "completed", "completed"]


def test_thousand_wide_fan_out_fan_in(cluster, db):
    width = 1000
    edges = [(0, i) for i in range(1, width + 1)] + [(i, width + 1) for i in range(1, width + 1)]
    with cluster.connect(db) as c:
        flow, ids = build_flow(c, "wide", width + 2, edges)
    run_workers(cluster, db, "wide", flow)
    with cluster.connect(db) as c:
        assert set(states(c, flow).values()) == {"completed"}
        g = c.execute("SELECT success_count, running_count, group_state FROM ff_edge_group "
                      "WHERE flow_id = %s AND downstream_eid = split_part(%s, '}:', 2)::uuid", (flow, ids[-1])).fetchone()
        assert g == (width, 0, "satisfied")


def test_one_failure_in_a_wide_fan_in_skips_the_sink_and_below(cluster, db):
    width = 200
    edges = [(0, i) for i in range(1, width + 1)] + [(i, width + 1) for i in range(1, width + 1)] + [(width + 1, width + 2)]
    with cluster.connect(db) as c:
        flow, ids = build_flow(c, "wide-fail", width + 3, edges, payloads={17: {"fail": True}})
    run_workers(cluster, db, "wide-fail", flow)
    with cluster.connect(db) as c:
        st = states(c, flow)
        values = list(st.values())
        assert values.count("failed") == 1
        assert values.count("skipped") == 2
        assert state_of(c, ids[width + 1]) == "skipped" and state_of(c, ids[width + 2]) == "skipped"
        assert values.count("completed") + values.count("skipped") + 1 == width + 3


def build_chain(conn, flow, n, backwards=False):
    """A chain of n executions linked i -> i+1, staged first to last or last
    to first, built server-side so the test is about staging, not round
    trips. Leaves the ids in temp table chain_ids(id, pos)."""
    order = "REVERSE {} - 1..1".format(n) if backwards else "1..{} - 1".format(n)
    conn.execute("""
        DO $$
        DECLARE f uuid := {}; ids text[] := '{{}}'; rev bigint; i int;
        BEGIN
          PERFORM ff_create_flow(f);
          FOR i IN 1..{} LOOP
            ids := ids || ff_create_execution('chain', flow_id => f);
            PERFORM ff_add_execution_to_flow(f, ids[i]);
          END LOOP;
          rev := {};
          FOR i IN {} LOOP
            rev := ff_stage_dependency_edge(f, gen_random_uuid(), ids[i], ids[i + 1], rev);
          END LOOP;
          CREATE TEMP TABLE chain_ids AS SELECT * FROM unnest(ids) WITH ORDINALITY AS t(id, pos);
        END $$""".format(f"'{flow}'", n, n, order))
    return conn.execute("SELECT graph_revision FROM ff_flow_core WHERE flow_id = %s", (flow,)).fetchone()[0]


def test_chain_of_ten_thousand_nodes_refuses_the_closing_cycle(cluster, db):
    """A 10,000-node chain submitted in one call; closing it anywhere is a
    cycle, found by a search that stays cheap on a long chain."""
    n = 10_000
    flow = uuid.uuid4()
    spec = {"flow_id": str(flow),
            "nodes": [{"name": f"n{i}", "lane": "chain"} for i in range(1, n + 1)],
            "edges": [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(1, n)]}
    with cluster.connect(db) as c:
        answer = c.execute("SELECT ff_submit_flow(%s)", (Jsonb(spec),)).fetchone()[0]
        rev, ids = answer["graph_revision"], answer["executions"]
        first, middle, last = ids["n1"], ids[f"n{n // 2}"], ids[f"n{n}"]
        for up, down in ((last, first), (last, middle)):
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="cycle"):
                c.execute("SELECT ff_stage_dependency_edge(%s, gen_random_uuid(), %s, %s, %s)", (flow, up, down, rev))
        # A shortcut that keeps it acyclic is fine.
        assert c.execute("SELECT ff_stage_dependency_edge(%s, gen_random_uuid(), %s, %s, %s)",
                         (flow, first, last, rev)).fetchone()[0] == rev + 1


def test_chain_built_backwards_stays_cheap(cluster, db):
    """Built call by call in one transaction (each call re-reads the flow row,
    whose versions pile up inside the transaction: large flows belong in
    ff_submit_flow), staged last to first so the cycle check walks a chain."""
    n = 1000
    with cluster.connect(db) as c:
        assert build_chain(c, uuid.uuid4(), n, backwards=True) == 2 * n - 1


def test_killed_backend_leaves_no_half_cascade(cluster, db):
    """A worker completes the root of a deep skip chain and is killed before
    COMMIT: nothing of the cascade may survive, and a retry settles it whole."""
    with cluster.connect(db) as c:
        flow, ids = build_flow(c, "kill", 300, [(i, i + 1) for i in range(299)], payloads={0: {"fail": True}})
    victim = psycopg.connect(cluster.dsn(db), autocommit=False)
    eid, grant = victim.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('kill', 'w', 'i')").fetchone()
    victim.commit()
    assert eid == ids[0]
    pid = victim.info.backend_pid
    victim.execute("SELECT ff_fail_execution(%s, %s, 'fatal', false)", (eid, grant))
    with cluster.connect(db) as c:
        assert c.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        wait_for(lambda: c.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == 0)
        assert state_of(c, ids[0]) == "active"
        assert c.execute("SELECT count(*) FROM ff_completion_event").fetchone()[0] == 0
        assert set(states(c, flow).values()) == {"active", "waiting_children"}
        c.execute("SELECT ff_fail_execution(%s, %s, 'fatal', false)", (eid, grant))
        st = states(c, flow)
        assert list(st.values()).count("skipped") == 299
        assert c.execute("SELECT count(*) FROM ff_completion_event WHERE dispatched_at_ms IS NULL").fetchone()[0] == 0
    try:
        victim.close()
    except Exception:
        pass


def test_cancel_flow_settles_a_running_flow(cluster, db):
    with cluster.connect(db) as c:
        flow, ids = build_flow(c, "cf", 5, [(0, 1), (1, 2), (0, 3), (3, 4)])
        eid, grant = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('cf', 'w', 'i')").fetchone()
        assert c.execute("SELECT ff_cancel_flow(%s, 'operator')", (flow,)).fetchone()[0] == 5
        assert set(states(c, flow).values()) == {"cancelled"}
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            c.execute("SELECT ff_complete_execution(%s, %s)", (eid, grant))
        assert c.execute("SELECT public_flow_state FROM ff_flow_core").fetchone()[0] == "cancelled"

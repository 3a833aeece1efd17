"""Helpers shared by the client tests: parallel runners, flow builders and
a minimal worker loop, all through plain SQL."""
import random
import threading
import uuid

import psycopg


def run_parallel(n, fn):
    """Runs fn(0..n-1) in n threads released together; re-raises any error."""
    errors = []
    barrier = threading.Barrier(n)

    def wrap(i):
        try:
            barrier.wait()
            fn(i)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def build_flow(conn, lane, nodes, edges, policies=None, payloads=None, **create_args):
    """Creates a flow with `nodes` executions (random priorities, so claims
    come in random order), stages and applies `edges` [(up, down)], in one
    transaction, through the incremental API. `create_args` go to every
    ff_create_execution (e.g. budget_ids). Returns (flow_id, [execution ids])."""
    flow = uuid.uuid4()
    payloads = payloads or {}
    extra = "".join(f", {k} => %s" for k in create_args)
    with conn.transaction():
        conn.execute("SELECT ff_create_flow(%s)", (flow,))
        ids = []
        for i in range(nodes):
            eid = conn.execute(
                f"SELECT ff_create_execution(%s, flow_id => %s, priority => %s, payload => %s{extra})",
                (lane, flow, random.randint(0, 1000), psycopg.types.json.Jsonb(payloads.get(i, {})),
                 *create_args.values()),
            ).fetchone()[0]
            conn.execute("SELECT ff_add_execution_to_flow(%s, %s)", (flow, eid))
            ids.append(eid)
        for node, policy in (policies or {}).items():
            conn.execute("SELECT ff_set_edge_group_policy(%s, %s, %s)", (flow, ids[node], psycopg.types.json.Jsonb(policy)))
        rev = nodes
        for up, down in edges:
            edge = uuid.uuid4()
            rev = conn.execute("SELECT ff_stage_dependency_edge(%s, %s, %s, %s, %s)",
                               (flow, edge, ids[up], ids[down], rev)).fetchone()[0]
            conn.execute("SELECT ff_apply_dependency_to_child(%s, %s, %s)", (flow, edge, ids[down]))
    return flow, ids


def work(dsn, lane, stop, worker_id="w"):
    """Claims and finishes executions of `lane` until stop() says so. The
    payload decides: {"fail": true} fails for good, otherwise completes. A
    lease lost to a cancellation (55000) is simply dropped."""
    done = []
    with psycopg.connect(dsn, autocommit=True) as c:
        while not stop():
            row = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker(%s, %s, %s)",
                            (lane, worker_id, worker_id + "-1")).fetchone()
            if row is None:
                continue
            eid, grant = row
            payload = c.execute("SELECT ff_get_execution(%s) -> 'payload'", (eid,)).fetchone()[0] or {}
            try:
                if payload.get("fail"):
                    c.execute("SELECT ff_fail_execution(%s, %s, 'planned failure', false)", (eid, grant))
                else:
                    c.execute("SELECT ff_complete_execution(%s, %s, %s)",
                              (eid, grant, psycopg.types.json.Jsonb({"by": worker_id})))
                done.append(eid)
            except psycopg.errors.ObjectNotInPrerequisiteState:
                pass
    return done


def states(conn, flow):
    return dict(conn.execute(
        "SELECT x.execution_id::text, x.public_state FROM ff_exec_core x WHERE x.flow_id = %s", (flow,)).fetchall())


def state_of(conn, eid):
    return conn.execute("SELECT ff_get_execution(%s) ->> 'public_state'", (eid,)).fetchone()[0]


def make_stale_work(conn, events=1, leases=1, lane="stale"):
    """Leaves work only a reconciler can finish: `events` two-node flows
    whose root ended with an undispatched completion event committed a
    minute ago, and `leases` claims whose lease already expired. Returns
    (downstream ids, leased ids)."""
    downstreams, leased = [], []
    with conn.transaction():
        for _ in range(events):
            flow, (a, b) = build_flow(conn, lane + "-flow", 2, [(0, 1)])
            conn.execute("""
                UPDATE ff_exec_core SET lifecycle_phase = 'terminal', eligibility_state = 'not_applicable',
                    public_state = 'completed', terminal_outcome = 'success'
                WHERE execution_id = split_part(%s, '}:', 2)::uuid""", (a,))
            conn.execute("""
                INSERT INTO ff_completion_event (partition_key, execution_id, flow_id, outcome, occurred_at_ms,
                    committed_at_ms)
                VALUES (0, split_part(%s, '}:', 2)::uuid, %s, 'success', 0,
                        (extract(epoch FROM clock_timestamp()) * 1000)::bigint - 60000)""", (a, flow))
            downstreams.append(b)
        for _ in range(leases):
            eid = conn.execute("SELECT ff_create_execution(%s, max_attempts => 2, "
                               "retry_policy => '{\"base_ms\": 1, \"jitter\": false}')", (lane,)).fetchone()[0]
            got = conn.execute("SELECT execution_id FROM ff_claim_for_worker(%s, 'w', 'i', grant_ttl_ms => 1)",
                               (lane,)).fetchone()[0]
            assert got == eid
            leased.append(eid)
    return downstreams, leased


def settled(conn, downstreams, leased):
    """True when every downstream became claimable and every lease was reclaimed."""
    ids = downstreams + leased
    rows = conn.execute("SELECT ff_get_execution(id) ->> 'public_state' FROM unnest(%s::text[]) id", (ids,)).fetchall()
    return all(r[0] == "waiting" for r in rows)


INVARIANTS = {
    "no execution is leased under two grants": """
        SELECT count(*) FROM (SELECT current_grant_id FROM ff_exec_core WHERE current_grant_id IS NOT NULL
                              GROUP BY 1 HAVING count(*) > 1) d""",
    "active executions hold a grant and a lease": """
        SELECT count(*) FROM ff_exec_core
        WHERE lifecycle_phase = 'active' AND (current_grant_id IS NULL OR lease_expires_at_ms IS NULL)""",
    "open attempts only on active executions, one each": """
        SELECT count(*) FROM ff_attempt a JOIN ff_exec_core x USING (execution_id)
        WHERE a.terminal_at_ms IS NULL AND (x.lifecycle_phase <> 'active' OR a.attempt_index <> x.attempt_index)""",
    "edge group counters match their edges": """
        SELECT count(*) FROM ff_edge_group g LEFT JOIN (
            SELECT flow_id, downstream_eid,
                   count(*) FILTER (WHERE edge_state = 'pending') AS p,
                   count(*) FILTER (WHERE edge_state = 'applied' AND resolution = 'success') AS s,
                   count(*) FILTER (WHERE edge_state = 'applied' AND resolution = 'fail') AS f,
                   count(*) FILTER (WHERE edge_state = 'applied' AND resolution = 'skip') AS k,
                   count(*) FILTER (WHERE edge_state = 'applied' AND resolution IS NULL) AS r
            FROM ff_edge GROUP BY flow_id, downstream_eid) c USING (flow_id, downstream_eid)
        WHERE (g.pending_count, g.success_count, g.fail_count, g.skip_count, g.running_count)
              IS DISTINCT FROM (coalesce(c.p, 0), coalesce(c.s, 0), coalesce(c.f, 0), coalesce(c.k, 0),
                                coalesce(c.r, 0))""",
    "no unresolved applied edge whose upstream ended": """
        SELECT count(*) FROM ff_edge e JOIN ff_exec_core x ON x.execution_id = e.upstream_eid
        WHERE e.edge_state = 'applied' AND e.resolution IS NULL AND x.lifecycle_phase = 'terminal'""",
    "terminal executions have a dispatched completion event": """
        SELECT count(*) FROM ff_exec_core x WHERE x.lifecycle_phase = 'terminal'
          AND NOT EXISTS (SELECT 1 FROM ff_completion_event e
                          WHERE e.execution_id = x.execution_id AND e.dispatched_at_ms IS NOT NULL)""",
    "no completion event is left undispatched": """
        SELECT count(*) FROM ff_completion_event WHERE dispatched_at_ms IS NULL""",
    "only terminal executions have completion events": """
        SELECT count(*) FROM ff_completion_event e JOIN ff_exec_core x USING (execution_id)
        WHERE x.lifecycle_phase <> 'terminal'""",
    "satisfied groups released their downstream": """
        SELECT count(*) FROM ff_edge_group g JOIN ff_exec_core x ON x.execution_id = g.downstream_eid
        WHERE g.group_state = 'satisfied' AND x.eligibility_state = 'blocked_by_dependencies'""",
    "impossible groups ended their downstream": """
        SELECT count(*) FROM ff_edge_group g JOIN ff_exec_core x ON x.execution_id = g.downstream_eid
        WHERE g.group_state = 'impossible' AND x.lifecycle_phase <> 'terminal'""",
    "blocked executions wait on an undecided group": """
        SELECT count(*) FROM ff_exec_core x
        WHERE x.eligibility_state = 'blocked_by_dependencies'
          AND NOT EXISTS (SELECT 1 FROM ff_edge_group g WHERE g.downstream_eid = x.execution_id
                          AND g.group_state = 'pending')""",
    "flow counters match their members": """
        SELECT count(*) FROM ff_flow_core f CROSS JOIN LATERAL (
            SELECT count(*) FILTER (WHERE lifecycle_phase <> 'terminal') AS live,
                   count(*) FILTER (WHERE terminal_outcome IN ('failed', 'expired')) AS failed
            FROM ff_exec_core x WHERE x.flow_id = f.flow_id) m
        WHERE (f.live_count, f.failed_count) <> (m.live, m.failed)""",
    "a terminal flow has no live member": """
        SELECT count(*) FROM ff_flow_core WHERE public_flow_state <> 'open' AND live_count <> 0""",
    "quota slots are held by active executions only": """
        SELECT count(*) FROM ff_quota_admitted a LEFT JOIN ff_exec_core x USING (execution_id)
        WHERE x.lifecycle_phase IS DISTINCT FROM 'active'""",
    "reservations are held by active executions only": """
        SELECT count(*) FROM ff_budget_usage_by_exec l LEFT JOIN ff_exec_core x USING (execution_id)
        WHERE l.reserved > 0 AND x.lifecycle_phase IS DISTINCT FROM 'active'""",
    "no usage above the hard limit of a budget that rejects": """
        SELECT count(*) FROM ff_budget_usage u JOIN ff_budget_policy p USING (budget_id)
        WHERE p.enforcement_mode = 'strict' AND p.on_hard_limit = 'reject'
          AND u.hard_limit > 0 AND u.current_value > u.hard_limit""",
}


def invariant_violations(conn):
    """Names of the engine invariants that do not hold (empty when all do)."""
    return [name for name, sql in INVARIANTS.items() if conn.execute(sql).fetchone()[0] != 0]

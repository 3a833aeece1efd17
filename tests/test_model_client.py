"""Concurrency tests: a randomized, seeded, model-based test and targeted
deadlock / race scenarios, all through plain SQL from several connections.

test_randomized_model runs rounds. Each round gets a fresh database and
starts FF_MODEL_THREADS worker threads (own connection, own random.Random
derived from the seed, the round and the thread) that for FF_MODEL_SECONDS
build flows (whole in one transaction, or grown node by node and edge by edge
across transactions while their members run), claim and complete / fail /
renew / abandon (short leases) / spend and complete in one transaction, cancel
executions and flows; two threads run ff_run_reconcilers() and one kills
backends in the middle of their work. Then the round quiesces (reconcilers,
builders apply what they staged, everything claimable is completed) and is
checked: the engine invariants of ffhelp, a model of what the workers saw
commit, that every flow and execution ended, that the repair reconciler never
had to resolve a lost edge or decide a forgotten group, and zero
deadlocks (40P01) and internal errors (XX000/XX001). Problems of all rounds
are collected and asserted at the end, with a per-round summary on stdout
(run pytest with -s to see it).

Environment (defaults in brackets):
  FF_MODEL_SEED             global seed [1]
  FF_MODEL_ROUNDS           rounds of test_randomized_model [4]
  FF_MODEL_SECONDS          seconds of random operations per round [5]
  FF_MODEL_THREADS          worker threads per round [7]
  FF_MODEL_QUIESCE_SECONDS  how long a round may take to settle [25]
  FF_MODEL_CYCLES           cycles of test_one_transaction_workers [500]
  FF_MODEL_RACES            races in test_apply_races_cancel_of_downstream [150]
  FF_MODEL_PORT             port of the private cluster "model" [FF_TEST_PORT + 6]
  FF_MODEL_LOG_STATEMENTS   1: the model's sessions log every statement, so each
                            deadlock in the summary comes with the statements
                            (and parameters) of the processes involved [0]

The seed fixes every random choice (operations, graphs, policies, leases,
kill times); thread interleavings still vary from run to run, so a failing
seed is rerun a few times (or with more rounds) to reproduce.

Default run (75-100 s on 2 cores):
  FF_TEST_PORT=54370 /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/test_model_client.py -s
Longer run of the model (about 20 minutes), a new seed each time:
  FF_MODEL_ROUNDS=60 FF_MODEL_SECONDS=15 FF_MODEL_THREADS=8 FF_MODEL_SEED=$RANDOM FF_TEST_PORT=54370 \\
    /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/test_model_client.py -k randomized -s
"""
import collections
import contextlib
import os
import random
import re
import threading
import time
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from cluster import Cluster
from ffhelp import INVARIANTS, invariant_violations

SEED = int(os.environ.get("FF_MODEL_SEED", "1"))
ROUNDS = int(os.environ.get("FF_MODEL_ROUNDS", "4"))
SECONDS = float(os.environ.get("FF_MODEL_SECONDS", "5"))
THREADS = int(os.environ.get("FF_MODEL_THREADS", "7"))
QUIESCE_SECONDS = float(os.environ.get("FF_MODEL_QUIESCE_SECONDS", "25"))
CYCLES = int(os.environ.get("FF_MODEL_CYCLES", "500"))
RACES = int(os.environ.get("FF_MODEL_RACES", "150"))
LOG_STATEMENTS = os.environ.get("FF_MODEL_LOG_STATEMENTS", "") not in ("", "0")
PORT = int(os.environ.get("FF_MODEL_PORT", str(int(os.environ.get("FF_TEST_PORT", "54329")) + 6)))

# SQLSTATEs that are never acceptable, whatever the operation.
FORBIDDEN = {"40P01": "deadlock_detected", "XX000": "internal_error", "XX001": "data_corrupted",
             "57014": "statement timeout (a hang)"}


# ---------------------------------------------------------------------------
# Cluster, connections, transactions
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mc():
    c = Cluster("model", PORT, conf={"deadlock_timeout": "100ms", "max_connections": 150,
                                         "log_lock_waits": "on"}).init().start()
    yield c
    c.stop()


def new_db(mc):
    name = "model_" + uuid.uuid4().hex[:10]
    mc.create_db(name)
    return name


def drop_db(mc, name):
    with mc.connect() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def mdb(mc):
    name = new_db(mc)
    yield name
    drop_db(mc, name)


def connect(mc, db, timeout_s=20, log_statements=False):
    """An autocommit connection with a statement timeout, so a hang fails
    the test (57014) instead of blocking it."""
    conn = mc.connect(db)
    conn.execute(f"SET statement_timeout = '{int(timeout_s * 1000)}ms'")
    if log_statements:
        conn.execute("SET log_statement = 'all'")
    return conn


def rollback_quietly(conn):
    try:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
    except psycopg.Error:
        pass


@contextlib.contextmanager
def tx(conn):
    """BEGIN ... COMMIT on an autocommit connection; ROLLBACK on any error."""
    conn.execute("BEGIN")
    try:
        yield conn
    except BaseException:
        rollback_quietly(conn)
        raise
    conn.execute("COMMIT")


def first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def is_connection_loss(e, conn):
    """A backend we (or the killer) terminated, not an engine error."""
    state = getattr(e, "sqlstate", None)
    if state is None:
        return conn.closed or isinstance(e, psycopg.OperationalError)
    return conn.closed or state.startswith("08") or state in ("57P01", "57P02", "57P03")


def now_ms():
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------
# Engine calls
# ---------------------------------------------------------------------------

QUICK_RETRY = {"base_ms": 10, "jitter": False}


def create_exec(conn, lane, flow=None, **kw):
    args = {"retry_policy": Jsonb(QUICK_RETRY)}
    if flow is not None:
        args["flow_id"] = flow
    args.update(kw)
    sql = "SELECT ff_create_execution(%s" + "".join(f", {k} => %s" for k in args) + ")"
    return conn.execute(sql, (lane, *args.values())).fetchone()[0]


def add_member(conn, flow, eid):
    return conn.execute("SELECT * FROM ff_add_execution_to_flow(%s, %s)", (flow, eid)).fetchone()


def set_policy(conn, flow, eid, policy):
    conn.execute("SELECT ff_set_edge_group_policy(%s, %s, %s)", (flow, eid, Jsonb(policy)))


def revision(conn, flow):
    return conn.execute("SELECT graph_revision FROM ff_flow_core WHERE flow_id = %s", (flow,)).fetchone()[0]


def stage(conn, flow, up, down, rev=None, edge=None):
    edge = edge or uuid.uuid4()
    rev = revision(conn, flow) if rev is None else rev
    new_rev = conn.execute("SELECT ff_stage_dependency_edge(%s, %s, %s, %s, %s)",
                           (flow, edge, up, down, rev)).fetchone()[0]
    return edge, new_rev


def apply_edge(conn, flow, edge, down):
    return conn.execute("SELECT * FROM ff_apply_dependency_to_child(%s, %s, %s)", (flow, edge, down)).fetchone()


def claim(conn, lane, worker="w", ttl=30000):
    return conn.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker(%s, %s, %s, grant_ttl_ms => %s)",
                        (lane, worker, worker + "-1", ttl)).fetchone()


def claim_batch(conn, lanes, worker="w", ttl=30000, max_count=10):
    return conn.execute("SELECT execution_id, grant_key FROM ff_claim_batch(%s, %s, %s, grant_ttl_ms => %s, "
                        "max_count => %s)", (list(lanes), worker, worker + "-1", ttl, max_count)).fetchall()


def complete(conn, eid, grant, result=None):
    conn.execute("SELECT ff_complete_execution(%s, %s, %s)", (eid, grant, Jsonb(result or {"ok": True})))


def fail(conn, eid, grant, retryable=False):
    return conn.execute("SELECT ff_fail_execution(%s, %s, 'planned failure', %s)",
                        (eid, grant, retryable)).fetchone()[0]


def end(conn, eid, grant, how):
    """how: 'complete' or 'fail' (for good)."""
    if how == "complete":
        complete(conn, eid, grant)
    else:
        assert fail(conn, eid, grant) == "failed"


def spend(conn, budget, eid, deltas, key=None):
    return conn.execute("SELECT outcome FROM ff_record_spend(%s, %s, %s, %s)",
                        (budget, eid, Jsonb(deltas), key or uuid.uuid4().hex)).fetchone()[0]


def state_of(conn, eid):
    return conn.execute("SELECT ff_get_execution(%s) ->> 'public_state'", (eid,)).fetchone()[0]


def flow_state(conn, flow):
    return conn.execute("SELECT public_flow_state FROM ff_flow_core WHERE flow_id = %s", (flow,)).fetchone()[0]


def reconcile(conn):
    return conn.execute("SELECT ff_run_reconcilers()").fetchone()[0]


def has_function(conn, name):
    return conn.execute("SELECT EXISTS (SELECT FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                        "WHERE n.nspname = 'flowfabric' AND p.proname = %s)", (name,)).fetchone()[0]


def settle(conn, lanes, timeout=30):
    """Reconcilers, then claim and complete everything claimable on `lanes`,
    until nothing on them is live (or the timeout passes). Returns the
    reconciler reports."""
    reports = []
    deadline = time.time() + timeout
    while True:
        reports.append(reconcile(conn))
        rows = claim_batch(conn, lanes, "settler", max_count=100)
        for eid, grant in rows:
            try:
                complete(conn, eid, grant)
            except psycopg.errors.ObjectNotInPrerequisiteState:
                pass  # a member of a flow being cancelled
        live = conn.execute("SELECT count(*) FROM ff_exec_core WHERE lane_id = ANY(%s) AND lifecycle_phase <> 'terminal'",
                            (list(lanes),)).fetchone()[0]
        if (live == 0 and not rows) or time.time() > deadline:
            reports.append(reconcile(conn))
            return reports
        if not rows:
            time.sleep(0.05)


# ---------------------------------------------------------------------------
# Checks beyond ffhelp.INVARIANTS (they assume nothing is live any more)
# ---------------------------------------------------------------------------

EID = "'{fp:' || x.partition_key || '}:' || x.execution_id"

MODEL_CHECKS = {
    "every terminal execution has exactly one completion event": f"""
        SELECT {EID} FROM ff_exec_core x WHERE x.lifecycle_phase = 'terminal'
          AND (SELECT count(*) FROM ff_completion_event e WHERE e.execution_id = x.execution_id) <> 1""",
    "edge resolutions match how their upstream ended": """
        SELECT e.edge_id::text FROM ff_edge e JOIN ff_exec_core x ON x.execution_id = e.upstream_eid
        WHERE e.resolution IS NOT NULL AND (x.lifecycle_phase <> 'terminal' OR e.resolution <>
              CASE x.terminal_outcome WHEN 'success' THEN 'success' WHEN 'skipped' THEN 'skip' ELSE 'fail' END)""",
    "no undecided group with nothing left to wait for": """
        SELECT g.downstream_eid::text FROM ff_edge_group g
        WHERE g.group_state = 'pending' AND g.pending_count = 0 AND g.running_count = 0
          AND g.success_count + g.fail_count + g.skip_count > 0""",
    "decided groups agree with their policy and final counts": """
        SELECT g.downstream_eid::text || ' ' || g.group_state || ' ' || g.policy::text FROM ff_edge_group g
        WHERE g.group_state <> 'pending' AND NOT coalesce(CASE g.policy ->> 'kind'
            WHEN 'all_of' THEN CASE g.group_state
                WHEN 'satisfied' THEN g.success_count > 0
                     AND g.pending_count + g.running_count + g.fail_count + g.skip_count = 0
                ELSE g.fail_count + g.skip_count > 0 END
            WHEN 'any_of' THEN CASE g.group_state
                WHEN 'satisfied' THEN g.success_count >= 1
                ELSE g.success_count = 0 AND g.pending_count + g.running_count = 0 END
            WHEN 'quorum' THEN CASE g.group_state
                WHEN 'satisfied' THEN g.success_count >= (g.policy ->> 'k')::int
                ELSE g.success_count < (g.policy ->> 'k')::int END
            END, false)""",
    "downstreams ended as their group decided": f"""
        SELECT {EID} || ' ' || g.group_state || ' ' || coalesce(x.terminal_outcome, x.public_state)
        FROM ff_edge_group g JOIN ff_exec_core x ON x.execution_id = g.downstream_eid
        WHERE (g.group_state = 'satisfied' AND x.terminal_outcome = 'skipped')
           OR (g.group_state = 'impossible' AND x.terminal_outcome NOT IN ('skipped', 'cancelled'))
           OR (g.group_state = 'pending' AND x.lifecycle_phase = 'terminal' AND x.terminal_outcome <> 'cancelled'
               AND g.running_count + g.success_count + g.fail_count + g.skip_count > 0)""",
    "terminal flows agree with their members": """
        SELECT f.flow_id::text || ' ' || f.public_flow_state FROM ff_flow_core f
        WHERE f.public_flow_state <> 'open' AND f.public_flow_state <> CASE
            WHEN f.cancel_requested_at_ms IS NOT NULL THEN 'cancelled'
            WHEN EXISTS (SELECT FROM ff_exec_core x WHERE x.flow_id = f.flow_id
                         AND x.terminal_outcome IN ('failed', 'expired')) THEN 'failed'
            ELSE 'completed' END""",
    "every flow ended": """
        SELECT f.flow_id::text || ' live=' || f.live_count || ' nodes=' || f.node_count FROM ff_flow_core f
        WHERE f.public_flow_state = 'open'""",
    "every execution ended": f"""
        SELECT {EID} || ' ' || x.public_state FROM ff_exec_core x WHERE x.lifecycle_phase <> 'terminal'""",
    "no reservation left": """
        SELECT budget_id || '/' || dimensions_key FROM ff_budget_usage_by_exec WHERE reserved > 0""",
    "no quota slot left": """
        SELECT quota_policy_id FROM ff_quota_admitted""",
}


def quiet_pass_problems(conn):
    """Once everything ended, a reconciler pass finds nothing left to do (a
    group it "settles" on every pass was never carried out for good)."""
    reconcile(conn)
    rep = reconcile(conn)
    busy = {f"{section}.{k}": v for section in ("dependency", "lease_expiry", "graph_repair")
            for k, v in rep.get(section, {}).items() if v}
    return [f"a reconciler pass over a settled database still works: {busy}"] if busy else []


def model_check_failures(conn):
    out = quiet_pass_problems(conn)
    for name, sql in MODEL_CHECKS.items():
        rows = conn.execute(sql).fetchall()
        if rows:
            out.append(f"{name}: {len(rows)} offender(s), e.g. {[r[0] for r in rows[:4]]}")
    return out


def invariant_problems(conn):
    """ffhelp's violated invariants, each with up to three offending rows
    (its count query turned into a select)."""
    out = []
    for name in invariant_violations(conn):
        sql = INVARIANTS[name].replace("SELECT count(*) FROM", "SELECT * FROM", 1) + " LIMIT 3"
        try:
            rows = [str(tuple(r))[:300] for r in conn.execute(sql).fetchall()]
        except psycopg.Error as e:
            rows = [first_line(e)]
        out.append(f"invariant: {name}; e.g. {rows}")
    return out


def assert_clean(conn):
    """Everything ended and every invariant and model check holds."""
    problems = invariant_problems(conn) + model_check_failures(conn)
    assert problems == [], problems


def assert_no_deadlock(**errors):
    bad = {who: f"{e.sqlstate} {first_line(e)}" for who, e in errors.items()
           if e is not None and getattr(e, "sqlstate", None) in FORBIDDEN}
    assert not bad, f"forbidden errors: {bad}"


def repair_totals(reports):
    total = collections.Counter()
    for r in reports:
        for k, v in r.get("graph_repair", {}).items():
            total[k] += v
    return total


def assert_no_lost_cascade(reports):
    t = repair_totals(reports)
    assert t["edges_resolved"] == 0 and t["groups_decided"] == 0 and t["errors"] == 0, dict(t)


# ---------------------------------------------------------------------------
# Threads for the scenarios
# ---------------------------------------------------------------------------

class Bg:
    """Runs fn() in a thread; join() fails the test when it hangs."""

    def __init__(self, fn):
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as e:  # reported by the test
            self.error = e

    def join(self, timeout=30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background statement hangs"
        return self

    @property
    def sqlstate(self):
        return getattr(self.error, "sqlstate", None) if self.error is not None else None


def wait_blocked(admin, conn, bg, timeout=5):
    """Waits until `conn` waits for a lock, or bg finished. True if it blocked."""
    pid = conn.info.backend_pid
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not bg.thread.is_alive():
            return False
        row = admin.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        if row and row[0] == "Lock":
            return True
        time.sleep(0.01)
    return False


def in_tx(conn, fn):
    """A function for Bg: fn(conn) in its own transaction."""
    def run():
        with tx(conn):
            return fn(conn)
    return run


def commit_or_error(conn):
    """COMMIT; returns the error (after a rollback) instead of raising."""
    try:
        conn.execute("COMMIT")
        return None
    except psycopg.Error as e:
        rollback_quietly(conn)
        return e


def attempt(conn, fn):
    """fn(conn) in an open transaction; returns (result, error). On an error
    the transaction is rolled back."""
    try:
        return fn(conn), None
    except psycopg.Error as e:
        rollback_quietly(conn)
        return None, e


def make_flow(conn, n, edges=(), policies=None, apply=True, **create_kw):
    """A flow of n members, member i on its own lane "n<i>" so a claim names
    the execution it gets. Edges (i, j) are staged, and applied when `apply`.
    Returns (flow, ids, {(i, j): edge_id})."""
    flow = uuid.uuid4()
    staged = {}
    with tx(conn):
        conn.execute("SELECT ff_create_flow(%s)", (flow,))
        ids = []
        for i in range(n):
            ids.append(create_exec(conn, f"n{i}", flow, **create_kw))
            add_member(conn, flow, ids[-1])
        for i, p in (policies or {}).items():
            set_policy(conn, flow, ids[i], p)
        rev = revision(conn, flow)
        for i, j in edges:
            edge, rev = stage(conn, flow, ids[i], ids[j], rev)
            staged[(i, j)] = edge
            if apply:
                apply_edge(conn, flow, edge, ids[j])
    return flow, ids, staged


def claim_node(conn, ids, i, ttl=30000, worker="w"):
    row = claim(conn, f"n{i}", worker, ttl)
    assert row is not None and row[0] == ids[i], (row, ids[i])
    return row


def lanes_of(n):
    return [f"n{i}" for i in range(n)]


# ===========================================================================
# 1. The randomized model-based test
# ===========================================================================

POLICIES = [
    lambda k, rng: {"kind": "all_of"},
    lambda k, rng: {"kind": "any_of", "on_satisfied": "cancel_remaining"},
    lambda k, rng: {"kind": "any_of", "on_satisfied": "let_run"},
    lambda k, rng: {"kind": "quorum", "k": rng.randint(1, max(1, k)),
                    "on_satisfied": rng.choice(["cancel_remaining", "let_run"])},
]


class Model:
    """What the round's threads did and saw commit."""

    MAX_OPEN_FLOWS = 25     # new flows are built while fewer are open
    MAX_FLOWS = 400         # and at most this many per round

    def __init__(self, rnd, lanes, has_submit):
        self.rnd, self.lanes, self.has_submit = rnd, lanes, has_submit
        self.lock = threading.Lock()
        self.flows = {}          # flow -> member ids, in the order they were added
        self.staged = []         # (flow, edge, downstream) staged and not applied by their builder
        self.execs = []          # every execution known to be committed
        self.ops = collections.Counter()
        self.errors = collections.Counter()
        self.errors_by_op = collections.Counter()
        self.unexpected = []     # (op, sqlstate, message)
        self.ended = collections.defaultdict(list)  # execution -> outcomes its workers saw commit
        self.cancelled_flows = set()
        self.reconciler = collections.Counter()
        self.kills = collections.Counter()

    def count(self, what, n=1):
        with self.lock:
            self.ops[what] += n

    def error(self, op, e, expected):
        state = getattr(e, "sqlstate", None) or ("none" if isinstance(e, psycopg.Error) else "python")
        with self.lock:
            self.errors[state] += 1
            self.errors_by_op[f"{op.split('.')[0]}:{state}"] += 1
            if state not in expected:
                self.unexpected.append((op, state, first_line(e)))

    def add_flow(self, flow, ids):
        with self.lock:
            self.flows[flow] = list(ids)
            self.execs.extend(ids)

    def add_node(self, flow, eid):
        with self.lock:
            self.flows.setdefault(flow, []).append(eid)

    def add_exec(self, eid):
        with self.lock:
            self.execs.append(eid)

    def saw(self, eid, outcome):
        with self.lock:
            self.ended[eid].append(outcome)

    def pick_flow(self, rng):
        with self.lock:
            if not self.flows:
                return None, []
            flow = rng.choice(list(self.flows))
            return flow, list(self.flows[flow])

    def pick_exec(self, rng):
        with self.lock:
            return rng.choice(self.execs) if self.execs else None

    def add_report(self, rep):
        with self.lock:
            for section, values in rep.items():
                if isinstance(values, dict):
                    for k, v in values.items():
                        if isinstance(v, int):
                            self.reconciler[f"{section}.{k}"] += v


def random_exec(conn, rng, m, flow=None):
    kw = {"payload": Jsonb({"r": rng.randint(0, 1 << 30)}), "priority": rng.randint(0, 9),
          "max_attempts": rng.choice([1, 1, 2, 3])}
    b = rng.random()
    budgets = ["mb-a", "mb-b"] if b < 0.2 else ["mb-a"] if b < 0.3 else ["mb-b"] if b < 0.4 else []
    if budgets:
        kw["budget_ids"] = budgets
        if rng.random() < 0.4:
            kw["budget_reserve"] = Jsonb({"tokens": rng.randint(100, 500)})
    q = rng.random()
    if q < 0.3:
        kw["quota_policy_id"] = "mq-1" if q < 0.15 else "mq-2"
    if rng.random() < 0.08:
        kw["delay_until_ms"] = now_ms() + rng.randint(20, 300)
    return create_exec(conn, rng.choice(m.lanes), flow, **kw)


def spend_all(conn, rng, eid):
    """Spends on every budget the execution names, in ascending budget id."""
    budgets = conn.execute("SELECT ff_get_execution(%s) -> 'budget_ids'", (eid,)).fetchone()[0] or []
    for b in sorted(budgets):
        deltas = {"tokens": rng.randint(1, 40)}
        if b == "mb-b":
            deltas["calls"] = 1
        spend(conn, b, eid, deltas)


def op_build(m, conn, rng, w):
    """A new flow: whole in one transaction (1-6 nodes, random DAG and group
    policies), or a single node that grow operations extend later."""
    if m.has_submit and rng.random() < 0.3:
        return op_submit(m, conn, rng, w)
    n = 1 if rng.random() < 0.3 else rng.randint(2, 6)
    edges = [(i, j) for j in range(1, n) for i in range(j) if rng.random() < 0.45]
    indeg = collections.Counter(j for _, j in edges)
    policies = {j: rng.choice(POLICIES)(k, rng) for j, k in indeg.items() if k >= 2 and rng.random() < 0.6}
    flow = uuid.uuid4()
    with tx(conn):
        conn.execute("SELECT ff_create_flow(%s)", (flow,))
        ids = []
        for _ in range(n):
            ids.append(random_exec(conn, rng, m, flow))
            add_member(conn, flow, ids[-1])
        for j, p in policies.items():
            set_policy(conn, flow, ids[j], p)
        rev = revision(conn, flow)
        if rng.random() < 0.5:
            for i, j in edges:
                edge, rev = stage(conn, flow, ids[i], ids[j], rev)
                apply_edge(conn, flow, edge, ids[j])
        else:
            staged = []
            for i, j in edges:
                edge, rev = stage(conn, flow, ids[i], ids[j], rev)
                staged.append((edge, ids[j]))
            rng.shuffle(staged)
            for edge, down in staged:
                apply_edge(conn, flow, edge, down)
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0, 0.03))
    m.add_flow(flow, ids)
    m.count("build.whole" if n > 1 else "build.seed")


def op_submit(m, conn, rng, w):
    n = rng.randint(1, 6)
    edges = [(i, j) for j in range(1, n) for i in range(j) if rng.random() < 0.45]
    indeg = collections.Counter(j for _, j in edges)
    nodes = []
    for i in range(n):
        node = {"name": f"s{i}", "lane": rng.choice(m.lanes), "priority": rng.randint(0, 9),
                "max_attempts": rng.choice([1, 2]), "payload": {"r": rng.randint(0, 1 << 30)}}
        if rng.random() < 0.3:
            node["budget_ids"] = ["mb-a"]
        if indeg[i] >= 2 and rng.random() < 0.6:
            node["policy"] = rng.choice(POLICIES)(indeg[i], rng)
        nodes.append(node)
    spec = {"nodes": nodes, "edges": [{"from": f"s{i}", "to": f"s{j}"} for i, j in edges]}
    answer = conn.execute("SELECT ff_submit_flow(%s)", (Jsonb(spec),)).fetchone()[0]
    m.add_flow(uuid.UUID(answer["flow_id"]), [answer["executions"][f"s{i}"] for i in range(n)])
    m.count("build.submit")


def open_flow(conn, rng):
    """A random open flow and its members in creation order (edges from
    earlier to later members keep the graph acyclic, whoever stages them)."""
    row = conn.execute("SELECT flow_id FROM ff_flow_core WHERE public_flow_state = 'open' "
                       "AND cancel_requested_at_ms IS NULL ORDER BY random() LIMIT 1").fetchone()
    if row is None:
        return None, []
    nodes = [r[0] for r in conn.execute(
        f"SELECT {EID} FROM ff_exec_core x WHERE x.flow_id = %s ORDER BY x.created_at_ms, x.execution_id",
        (row[0],)).fetchall()]
    return row[0], nodes


def op_grow(m, conn, rng, w):
    """Grows a flow whose members may be running (mostly an open one; now
    and then any flow of the round, which may have ended)."""
    flow, nodes = open_flow(conn, rng) if rng.random() < 0.85 else m.pick_flow(rng)
    if flow is None or not nodes:
        return op_build(m, conn, rng, w)
    r = rng.random()
    if r < 0.25 or len(nodes) < 2 and r < 0.65:
        # A new node in one transaction, maybe downstream of running members.
        with tx(conn):
            eid = random_exec(conn, rng, m, flow)
            add_member(conn, flow, eid)
            ups = rng.sample(nodes, rng.randint(1, min(3, len(nodes)))) if nodes and rng.random() < 0.7 else []
            if len(ups) >= 2 and rng.random() < 0.5:
                set_policy(conn, flow, eid, rng.choice(POLICIES)(len(ups), rng))
            rev = revision(conn, flow)
            for up in ups:
                edge, rev = stage(conn, flow, up, eid, rev)
                apply_edge(conn, flow, edge, eid)
        m.add_exec(eid)
        m.add_node(flow, eid)
        m.count("grow.node")
    elif r < 0.35:
        # Create and add in separate transactions: in between it is a solo
        # execution that workers may claim.
        eid = random_exec(conn, rng, m, flow)
        m.add_exec(eid)
        time.sleep(rng.uniform(0, 0.03))
        add_member(conn, flow, eid)
        m.add_node(flow, eid)
        m.count("grow.node_two_tx")
    elif r < 0.65:
        # Stage an edge between members (earlier -> later keeps it acyclic;
        # now and then the other way, which may be refused as a cycle), and
        # apply it in the same transaction or leave it for later.
        i, j = sorted(rng.sample(range(len(nodes)), 2))
        up, down = (nodes[i], nodes[j]) if rng.random() < 0.95 else (nodes[j], nodes[i])
        apply_now = rng.random() < 0.5
        edge = uuid.uuid4()
        for retry in range(5):
            try:
                with tx(conn):
                    stage(conn, flow, up, down, edge=edge)
                    if apply_now:
                        apply_edge(conn, flow, edge, down)
                break
            except psycopg.Error as e:
                if e.sqlstate != "40001" or retry == 4:
                    raise
                m.count("grow.stale_revision_retry")
        if not apply_now:
            with m.lock:
                m.staged.append((flow, edge, down))
        m.count("grow.stage_apply" if apply_now else "grow.stage")
    elif r < 0.85:
        with m.lock:
            if not m.staged:
                return
            flow, edge, down = m.staged.pop(rng.randrange(len(m.staged)))
        apply_edge(conn, flow, edge, down)
        m.count("grow.apply_staged")
    else:
        # A new node upstream of an existing member (which may be claimed or
        # cancelled at this moment), all in one transaction.
        down = rng.choice(nodes)
        with tx(conn):
            eid = random_exec(conn, rng, m, flow)
            add_member(conn, flow, eid)
            edge, _ = stage(conn, flow, eid, down)
            apply_edge(conn, flow, edge, down)
        m.add_exec(eid)
        m.add_node(flow, eid)
        m.count("grow.new_upstream")


def op_work(m, conn, rng, w):
    """Claims (one or a batch) in autocommit, then per claim: complete, fail
    (retryable or not), renew, spend, or abandon the lease."""
    ttl = rng.randint(50, 300) if rng.random() < 0.35 else rng.randint(1000, 3000)
    if rng.random() < 0.5:
        row = claim(conn, rng.choice(m.lanes), w, ttl)
        rows = [row] if row else []
    else:
        lanes = list(m.lanes)
        rng.shuffle(lanes)
        rows = claim_batch(conn, lanes, w, ttl, rng.randint(1, 3))
    m.count("work.claimed", len(rows))
    for eid, grant in rows:
        act = rng.choices(["complete", "fail_retry", "fail_final", "renew", "spend", "abandon", "late"],
                          [40, 14, 8, 10, 12, 10, 6])[0]
        if act == "late" and ttl > 300:
            act = "complete"  # only short leases are outlived (keeps rounds short)
        m.count(f"work.{act}")
        try:
            if act == "complete":
                complete(conn, eid, grant)
                m.saw(eid, "success")
            elif act in ("fail_retry", "fail_final"):
                if fail(conn, eid, grant, act == "fail_retry") == "failed":
                    m.saw(eid, "failed")
            elif act == "renew":
                conn.execute("SELECT ff_renew_lease(%s, %s, %s)", (eid, grant, ttl))
                complete(conn, eid, grant)
                m.saw(eid, "success")
            elif act == "spend":
                spend_all(conn, rng, eid)
                complete(conn, eid, grant)
                m.saw(eid, "success")
            elif act == "late":
                time.sleep(ttl / 1000 * rng.uniform(0.5, 1.5))
                complete(conn, eid, grant)
                m.saw(eid, "success")
            # abandon: the lease runs out and the reconciler takes it back
        except psycopg.Error as e:
            if is_connection_loss(e, conn):
                raise
            m.error(f"work.{act}", e, {"55000"})


def op_one_tx(m, conn, rng, w):
    """The README's one-transaction worker: claim, spend on each budget in
    ascending id, hold it a little, complete (or fail), all in one transaction."""
    ttl = rng.randint(100, 200) if rng.random() < 0.15 else rng.randint(2000, 4000)
    seen = None
    with tx(conn):
        if rng.random() < 0.7:
            row = claim(conn, rng.choice(m.lanes), w, ttl)
        else:
            rows = claim_batch(conn, m.lanes, w, ttl, 1)
            row = rows[0] if rows else None
        if row is None:
            m.count("one_tx.empty")
            return
        eid, grant = row
        spend_all(conn, rng, eid)
        time.sleep(rng.uniform(0.2, 0.4) if rng.random() < 0.05 else rng.uniform(0, 0.06))
        act = rng.choices(["complete", "fail_final", "fail_retry"], [75, 10, 15])[0]
        if act == "complete":
            complete(conn, eid, grant)
            seen = "success"
        elif fail(conn, eid, grant, act == "fail_retry") == "failed":
            seen = "failed"
    if seen:
        m.saw(eid, seen)
    m.count(f"one_tx.{act}")


def op_cancel(m, conn, rng, w):
    """ff_cancel_execution, mostly on a live execution (any state), now and
    then on any execution of the round."""
    row = None
    if rng.random() < 0.8:
        row = conn.execute(f"SELECT {EID} FROM ff_exec_core x WHERE x.lifecycle_phase <> 'terminal' "
                           "ORDER BY random() LIMIT 1").fetchone()
    eid = row[0] if row else m.pick_exec(rng)
    if eid is None:
        return
    if conn.execute("SELECT ff_cancel_execution(%s, 'model')", (eid,)).fetchone()[0] == "cancelled":
        m.saw(eid, "cancelled")
    m.count("cancel_execution")


def op_cancel_flow(m, conn, rng, w):
    flow, _ = m.pick_flow(rng)
    if flow is None:
        return
    if conn.execute("SELECT ff_cancel_flow(%s, 'model')", (flow,)).fetchone()[0] > 0:
        with m.lock:
            m.cancelled_flows.add(flow)
    m.count("cancel_flow")


OPS = [  # name, function, weight, SQLSTATEs it may meet in a correct engine
    ("build", op_build, 8, set()),
    # 55P03: an apply whose downstream another transaction holds (documented: retry).
    ("grow", op_grow, 22, {"55000", "55P03", "40001", "22023"}),
    ("work", op_work, 30, {"55000"}),
    ("one_tx", op_one_tx, 20, {"55000"}),
    ("cancel", op_cancel, 5, set()),
    ("cancel_flow", op_cancel_flow, 1.2, set()),
]


def worker_thread(m, mc, db, idx, stop, pids):
    rng = random.Random(f"{SEED}/{m.rnd}/{idx}")
    w = f"w{idx}"
    conn = None
    names, weights = [o[0] for o in OPS], [o[2] for o in OPS]
    by_name = {o[0]: o for o in OPS}
    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = connect(mc, db, log_statements=LOG_STATEMENTS)
                pids[w] = conn.info.backend_pid
        except psycopg.Error:
            time.sleep(0.05)
            continue
        name = rng.choices(names, weights)[0]
        expected = by_name[name][3]
        try:
            if name == "build" and (len(m.flows) >= Model.MAX_FLOWS or conn.execute(
                    "SELECT count(*) FROM ff_flow_core WHERE public_flow_state = 'open'").fetchone()[0]
                    >= Model.MAX_OPEN_FLOWS):
                name = "grow"
            _, fn, _, expected = by_name[name]
            fn(m, conn, rng, w)
        except psycopg.Error as e:
            if is_connection_loss(e, conn):
                m.count("killed_mid_op")
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
                continue
            m.error(name, e, expected)
            rollback_quietly(conn)
        except Exception as e:  # a bug of the test itself: reported, never hidden
            m.error(name, e, set())
            rollback_quietly(conn)
        time.sleep(rng.uniform(0, 0.004))
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


def reconciler_thread(m, mc, db, idx, stop, pids):
    rng = random.Random(f"{SEED}/{m.rnd}/reconciler{idx}")
    conn = None
    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = connect(mc, db, log_statements=LOG_STATEMENTS)
                pids[f"r{idx}"] = conn.info.backend_pid
            m.add_report(reconcile(conn))
            m.count("reconcile")
        except psycopg.Error as e:
            if conn is not None and is_connection_loss(e, conn):
                conn = None
                continue
            m.error("reconcile", e, set())
        except Exception as e:  # a bug of the test itself: reported, never hidden
            m.error("reconcile", e, set())
        stop.wait(rng.uniform(0.05, 0.3))
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


def killer_thread(m, mc, db, stop, pids):
    """Terminates a worker backend now and then, preferably one inside a
    transaction or a statement."""
    rng = random.Random(f"{SEED}/{m.rnd}/killer")
    with connect(mc, db) as admin:
        while not stop.wait(rng.uniform(0.3, 1.0)):
            try:
                items = list(pids.items())
            except RuntimeError:
                continue
            candidates = [p for k, p in items if k.startswith("w") or rng.random() < 0.1]
            try:
                rows = admin.execute("SELECT pid, state FROM pg_stat_activity WHERE pid = ANY(%s) "
                                     "AND state IN ('active', 'idle in transaction')", (candidates,)).fetchall()
                if not rows:
                    continue
                pid, st = rng.choice(rows)
                if admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]:
                    m.kills[st] += 1
            except psycopg.Error as e:
                m.error("kill", e, set())


def quiesce(m, conn):
    """After the threads: builders apply what they staged, reconcilers run,
    and everything claimable is completed, until nothing is live."""
    start = time.time()
    while True:
        pending = conn.execute(f"""
            SELECT e.flow_id, e.edge_id, {EID} FROM ff_edge e
            JOIN ff_exec_core x ON x.execution_id = e.downstream_eid
            JOIN ff_flow_core f ON f.flow_id = e.flow_id
            JOIN ff_edge_group g ON g.flow_id = e.flow_id AND g.downstream_eid = e.downstream_eid
            WHERE e.edge_state = 'pending' AND x.lifecycle_phase <> 'terminal' AND x.lifecycle_phase <> 'active'
              AND f.public_flow_state = 'open' AND f.cancel_requested_at_ms IS NULL
              AND g.group_state = 'pending'""").fetchall()
        for flow, edge, down in pending:
            try:
                apply_edge(conn, flow, edge, down)
                m.count("quiesce.apply_staged")
            except psycopg.Error as e:
                m.error("quiesce.apply", e, {"55000", "55P03"})
        m.add_report(reconcile(conn))
        rows = claim_batch(conn, m.lanes, "quiesce", 30000, 100)
        for eid, grant in rows:
            try:
                complete(conn, eid, grant)
                m.saw(eid, "success")
                m.count("quiesce.complete")
            except psycopg.Error as e:
                m.error("quiesce.complete", e, {"55000"})
        live = conn.execute("SELECT count(*) FROM ff_exec_core WHERE lifecycle_phase <> 'terminal'").fetchone()[0]
        if (live == 0 and not rows and not pending) or time.time() - start > QUIESCE_SECONDS:
            m.add_report(reconcile(conn))
            return time.time() - start
        if not rows:
            time.sleep(0.05)


def describe_stuck(conn):
    """Details of what did not end, for the report."""
    out = []
    rows = conn.execute(f"""
        SELECT {EID}, x.public_state, x.flow_id, f.public_flow_state, f.cancel_requested_at_ms IS NOT NULL,
               g.policy::text, g.group_state, g.pending_count, g.running_count, g.success_count, g.fail_count,
               g.skip_count, g.settled
        FROM ff_exec_core x LEFT JOIN ff_flow_core f ON f.flow_id = x.flow_id
        LEFT JOIN ff_edge_group g ON g.flow_id = x.flow_id AND g.downstream_eid = x.execution_id
        WHERE x.lifecycle_phase <> 'terminal' LIMIT 5""").fetchall()
    for r in rows:
        out.append("stuck execution {} {} flow={} ({}, cancelling={}) group={} {} p/r/s/f/k={}/{}/{}/{}/{} settled={}"
                   .format(*r))
    return out


def _log_ms(line):
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)", line)
    if not m:
        return None
    t = time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")
    return time.mktime(t) * 1000 + float("0." + m.group(1)[20:]) * 1000


def deadlock_details(log_text, keep=3):
    """Each 'deadlock detected' in a server log slice, with what each process
    involved was last seen running in the 2 s before (from lock-wait and error
    reports; with FF_MODEL_LOG_STATEMENTS=1 from every statement, with its
    parameters)."""
    lines = log_text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if "deadlock detected" not in line:
            continue
        at = _log_ms(line) or 0
        detail = " ".join(ln.strip() for ln in lines[i + 1:i + 3]).split("DETAIL:", 1)[-1]
        pids = set(re.findall(r"Process (\d+) waits", detail))
        seen = collections.defaultdict(list)
        for ln in lines[max(0, i - 5000):i + 6]:
            m = re.search(r"\[(\d+)\] (?:STATEMENT:|LOG:  execute [^:]*:|LOG:  statement:|DETAIL:  parameters:)\s*(.*)", ln)
            if m and m.group(1) in pids and at - (_log_ms(ln) or at) < 2000:
                seen[m.group(1)].append(m.group(2)[:160])
        out.append(f"{detail.strip()[:240]} last statements: " +
                   "; ".join(f"{pid}: {' / '.join(v[-keep:])}" for pid, v in sorted(seen.items())))
    return out


def run_round(mc, rnd):
    db = new_db(mc)
    lanes = [f"r{rnd}-a", f"r{rnd}-b"]
    with connect(mc, db) as c:
        c.execute("SELECT ff_create_budget('mb-a', '{tokens}', '{4000}', '{0}', reset_interval_ms => 1500)")
        c.execute("SELECT ff_create_budget('mb-b', '{calls,tokens}', '{0,6000}', '{0,3000}', "
                  "reset_interval_ms => 2000)")
        c.execute("SELECT ff_create_quota_policy('mq-1', 1, 0, 2)")
        c.execute("SELECT ff_create_quota_policy('mq-2', 1, 40, 3)")
        has_submit = has_function(c, "ff_submit_flow")
    m = Model(rnd, lanes, has_submit)
    log_before = len(mc.log())
    stop = threading.Event()
    pids = {}
    threads = [threading.Thread(target=worker_thread, args=(m, mc, db, i, stop, pids), daemon=True)
               for i in range(THREADS)]
    threads += [threading.Thread(target=reconciler_thread, args=(m, mc, db, i, stop, pids), daemon=True)
                for i in range(2)]
    threads.append(threading.Thread(target=killer_thread, args=(m, mc, db, stop, pids), daemon=True))
    started = time.time()
    for t in threads:
        t.start()
    stop.wait(SECONDS)
    stop.set()
    problems = []
    for t in threads:
        t.join(60)
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        with connect(mc, db) as c:
            act = c.execute("SELECT pid, state, wait_event_type, left(query, 120) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
        problems.append(f"threads hang after the round: {hung}; backends: {act}")
        with connect(mc, db) as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    ran = time.time() - started
    with connect(mc, db, timeout_s=60) as c:
        settle_s = quiesce(m, c)
        outcomes = dict(c.execute("SELECT public_state, count(*) FROM ff_exec_core GROUP BY 1").fetchall())
        flow_states = dict(c.execute("SELECT public_flow_state, count(*) FROM ff_flow_core GROUP BY 1").fetchall())
        problems += describe_stuck(c)
        problems += invariant_problems(c)
        problems += model_check_failures(c)
        # What workers saw commit must be how executions ended.
        final = dict(c.execute(f"SELECT {EID}, x.terminal_outcome FROM ff_exec_core x").fetchall())
        for eid, seen in m.ended.items():
            if seen.count("success") > 1:
                problems.append(f"{eid} completed {seen.count('success')} times")
            if len(set(seen)) > 1:
                problems.append(f"{eid} ended in several ways: {seen}")
            elif final.get(eid) != seen[0]:
                problems.append(f"{eid}: a worker committed {seen[0]}, but it ended {final.get(eid)}")
        for flow in m.cancelled_flows:
            if flow_state(c, flow) != "cancelled":
                problems.append(f"flow {flow} was cancelled while live but ended {flow_state(c, flow)}")
    rec = m.reconciler
    for key in ("graph_repair.edges_resolved", "graph_repair.groups_decided"):
        if rec[key]:
            problems.append(f"repair reconciler {key} = {rec[key]} (a cascade was lost)")
    rec_errors = {k: v for k, v in rec.items() if k.endswith(".errors") and v}
    if rec_errors:
        problems.append(f"reconciler errors: {rec_errors}")
    forbidden = collections.Counter(s for _, s, _ in m.unexpected)
    for state, n in sorted(forbidden.items()):
        examples = [f"{op}: {msg}" for op, s, msg in m.unexpected if s == state][:3]
        problems.append(f"{n} x SQLSTATE {state} ({FORBIDDEN.get(state, 'unexpected')}), e.g. {examples}")
    log = mc.log()[log_before:]
    deadlocks = deadlock_details(log)
    if deadlocks:
        problems.append(f"server log: {len(deadlocks)} deadlock(s):" + "".join(f"\n      {d}" for d in deadlocks[:4]))
    for bad in ("PANIC", "server process", "TRAP:"):
        if bad in log:
            problems.append(f"server log contains {bad!r}")

    ops = ", ".join(f"{k} {v}" for k, v in sorted(m.ops.items()))
    errs = ", ".join(f"{k} x{v}" for k, v in sorted(m.errors.items())) or "none"
    errs_by_op = ", ".join(f"{k} x{v}" for k, v in sorted(m.errors_by_op.items())) or "none"
    repairs = ", ".join(f"{k.split('.', 1)[1]} {rec[k]}" for k in sorted(rec) if k.startswith("graph_repair."))
    leases = ", ".join(f"{k.split('.', 1)[1]} {rec[k]}" for k in sorted(rec) if k.startswith("lease_expiry."))
    print(f"\n--- round {rnd} (seed {SEED}): {ran:.1f} s of operations, {settle_s:.1f} s to settle; "
          f"{len(m.flows)} flows, {sum(outcomes.values())} executions, {THREADS} workers")
    print(f"  ops: {ops}")
    print(f"  kills: {dict(m.kills)}; errors by SQLSTATE: {errs} (by operation: {errs_by_op})")
    print(f"  executions: {outcomes}; flows: {flow_states}")
    print(f"  graph_repair: {repairs}; lease_expiry: {leases}; reconciler passes {m.ops['reconcile']}")
    for p in problems:
        print(f"  PROBLEM: {p}")
    drop_db(mc, db)
    return problems


def test_randomized_model(mc):
    """Random operations on random flows from many connections; invariants,
    the model and "every flow ends" checked after every round."""
    problems = []
    for rnd in range(1, ROUNDS + 1):
        problems += [f"round {rnd}: {p}" for p in run_round(mc, rnd)]
    assert problems == [], "\n".join(problems)


# ===========================================================================
# 2a. Applying an edge U -> D while U ends, in every order
# ===========================================================================

@pytest.mark.parametrize("builder", ["apply", "stage+apply"])
@pytest.mark.parametrize("how", ["complete", "fail"])
@pytest.mark.parametrize("order", ["apply_open_then_end", "end_open_then_apply",
                                   "claim_open_apply_then_end", "claim_and_end_open_then_apply"])
def test_apply_while_upstream_ends(mc, mdb, order, how, builder):
    """D ends up eligible (skipped when U failed), never stuck in waiting_children."""
    with connect(mc, mdb) as a, connect(mc, mdb) as b, connect(mc, mdb) as w:
        # "apply": the edge was staged (and committed) before; "stage+apply":
        # the builder stages and applies it in one transaction.
        flow, (u, d), staged = make_flow(a, 2, [(0, 1)] if builder == "apply" else [], apply=False)

        def build(conn):
            edge = staged[(0, 1)] if builder == "apply" else stage(conn, flow, u, d)[0]
            return apply_edge(conn, flow, edge, d)

        errors = {}
        if order == "apply_open_then_end":
            grant = claim_node(a, [u], 0)[1]
            b.execute("BEGIN")
            _, errors["build"] = attempt(b, build)
            bg = Bg(lambda: end(w, u, grant, how))
            wait_blocked(a, w, bg)
            errors["build_commit"] = commit_or_error(b) if errors["build"] is None else None
            errors["end"] = bg.join().error
        elif order == "end_open_then_apply":
            grant = claim_node(a, [u], 0)[1]
            w.execute("BEGIN")
            _, errors["end"] = attempt(w, lambda c: end(c, u, grant, how))
            bg = Bg(in_tx(b, build))
            wait_blocked(a, b, bg)
            errors["end_commit"] = commit_or_error(w) if errors["end"] is None else None
            errors["build"] = bg.join().error
        elif order == "claim_open_apply_then_end":
            w.execute("BEGIN")
            grant = claim_node(w, [u], 0)[1]
            bg = Bg(in_tx(b, build))
            wait_blocked(a, b, bg)
            _, errors["end"] = attempt(w, lambda c: end(c, u, grant, how))
            errors["end_commit"] = commit_or_error(w) if errors["end"] is None else None
            errors["build"] = bg.join().error
        else:
            w.execute("BEGIN")
            grant = claim_node(w, [u], 0)[1]
            _, errors["end"] = attempt(w, lambda c: end(c, u, grant, how))
            bg = Bg(in_tx(b, build))
            wait_blocked(a, b, bg)
            errors["end_commit"] = commit_or_error(w) if errors["end"] is None else None
            errors["build"] = bg.join().error
        assert_no_deadlock(**errors)
        assert all(e is None for e in errors.values()), {k: first_line(e) for k, e in errors.items() if e}
        assert state_of(a, u) == ("completed" if how == "complete" else "failed")
        assert state_of(a, d) == ("waiting" if how == "complete" else "skipped")
        reports = settle(a, lanes_of(2))
        assert_no_lost_cascade(reports)
        assert flow_state(a, flow) == ("completed" if how == "complete" else "failed")
        assert_clean(a)


# ===========================================================================
# 2a'. Building while the downstream is claimed or cancelled
# ===========================================================================

@pytest.mark.parametrize("order", ["claim_open_then_build", "build_open_then_claim"])
def test_stage_and_apply_while_downstream_claimed_in_open_transaction(mc, mdb, order):
    """A builder stages and applies U -> D in one transaction (as ffhelp.build_flow
    does) while a one-transaction worker claims and completes D. Whoever comes
    second loses cleanly: no 40P01, and the flow ends."""
    with connect(mc, mdb) as a, connect(mc, mdb) as b, connect(mc, mdb) as w:
        flow, (u, d), _ = make_flow(a, 2)
        errors = {}

        def build(conn):
            edge, _ = stage(conn, flow, u, d)
            return apply_edge(conn, flow, edge, d)

        if order == "claim_open_then_build":
            w.execute("BEGIN")
            grant = claim_node(w, [u, d], 1)[1]
            bg = Bg(in_tx(b, build))
            blocked = wait_blocked(a, b, bg)
            _, errors["complete"] = attempt(w, lambda c: complete(c, d, grant))
            errors["complete_commit"] = commit_or_error(w) if errors["complete"] is None else None
            errors["build"] = bg.join().error
            assert_no_deadlock(**errors)
            # One side wins and the other is refused as documented: D completes
            # and the apply is refused (55P03 while D is held, 55000 once it
            # started), or the edge is applied and the worker's complete is refused.
            worker_err = errors["complete"] or errors["complete_commit"]
            losers = [e for e in (worker_err, errors["build"]) if e is not None]
            assert len(losers) == 1 and losers[0].sqlstate in ("55000", "55P03"), \
                ({k: first_line(e) for k, e in errors.items() if e}, blocked)
            assert state_of(a, d) == ("completed" if worker_err is None else "waiting_children")
        else:
            b.execute("BEGIN")
            _, errors["build"] = attempt(b, build)
            bg = Bg(in_tx(w, lambda c: claim(c, "n1")))
            wait_blocked(a, w, bg)
            errors["build_commit"] = commit_or_error(b) if errors["build"] is None else None
            errors["claim"] = bg.join().error
            assert_no_deadlock(**errors)
            assert all(e is None for e in errors.values()), errors
            assert bg.result is None, "D was claimed although its edge was applied"
            assert state_of(a, d) == "waiting_children"
        assert_no_lost_cascade(settle(a, lanes_of(2)))
        assert flow_state(a, flow) == "completed"
        assert_clean(a)


@pytest.mark.parametrize("order", ["stage_open_then_cancel", "cancel_open_then_build"])
def test_stage_and_apply_while_downstream_cancelled(mc, mdb, order):
    """Stage + apply of U -> D in one transaction racing ff_cancel_execution(D)."""
    with connect(mc, mdb) as a, connect(mc, mdb) as b, connect(mc, mdb) as c2:
        flow, (u, d), _ = make_flow(a, 2)
        errors = {}
        if order == "stage_open_then_cancel":
            b.execute("BEGIN")
            staged_edge, errors["stage"] = attempt(b, lambda c: stage(c, flow, u, d))
            assert errors["stage"] is None, first_line(errors["stage"])
            edge = staged_edge[0]
            bg = Bg(lambda: c2.execute("SELECT ff_cancel_execution(%s)", (d,)).fetchone()[0])
            wait_blocked(a, c2, bg)
            _, errors["apply"] = attempt(b, lambda c: apply_edge(c, flow, edge, d))
            errors["build_commit"] = commit_or_error(b) if errors["apply"] is None else None
            errors["cancel"] = bg.join().error
            assert_no_deadlock(**errors)
            assert errors["apply"] is None or errors["apply"].sqlstate in ("55000", "55P03"), first_line(errors["apply"])
        else:
            c2.execute("BEGIN")
            _, errors["cancel"] = attempt(c2, lambda c: c.execute("SELECT ff_cancel_execution(%s)", (d,)))

            def build(conn):
                edge, _ = stage(conn, flow, u, d)
                return apply_edge(conn, flow, edge, d)
            bg = Bg(in_tx(b, build))
            wait_blocked(a, b, bg)
            errors["cancel_commit"] = commit_or_error(c2) if errors["cancel"] is None else None
            errors["build"] = bg.join().error
            assert errors["build"] is None or errors["build"].sqlstate in ("55000", "55P03"), first_line(errors["build"])
            errors["build"] = None
        assert_no_deadlock(**errors)
        assert errors.get("cancel") is None and errors.get("cancel_commit") is None, errors
        assert state_of(a, d) == "cancelled"
        assert_no_lost_cascade(settle(a, lanes_of(2)))
        assert flow_state(a, flow) == "completed"
        assert_clean(a)


def test_apply_races_cancel_of_downstream(mc, mdb):
    """Single statements, started together: ff_apply_dependency_to_child(U -> D)
    and ff_cancel_execution(D). Neither may deadlock."""
    stats = collections.Counter()
    with connect(mc, mdb) as a, connect(mc, mdb) as c1, connect(mc, mdb) as c2:
        for _ in range(RACES):
            flow, (u, d), staged = make_flow(a, 2, [(0, 1)], apply=False)
            barrier = threading.Barrier(2)

            def do_apply():
                barrier.wait()
                return apply_edge(c1, flow, staged[(0, 1)], d)

            def do_cancel():
                barrier.wait()
                return c2.execute("SELECT ff_cancel_execution(%s)", (d,)).fetchone()

            x, y = Bg(do_apply), Bg(do_cancel)
            x.join(), y.join()
            stats[f"apply {x.sqlstate or 'ok'}"] += 1
            stats[f"cancel {y.sqlstate or 'ok'}"] += 1
        print(f"\napply vs cancel_execution races: {dict(stats)}")
        assert stats["apply 40P01"] + stats["cancel 40P01"] == 0, dict(stats)
        assert stats["cancel ok"] == RACES, dict(stats)
        settle(a, lanes_of(2))
        assert_clean(a)


# ===========================================================================
# 2b. The one-transaction worker pattern over two budgets and two quotas
# ===========================================================================

def test_one_transaction_workers(mc, mdb):
    """8 workers, each loop: BEGIN; claim; ff_record_spend on budget ba then bb;
    complete; COMMIT. Zero 40P01, every execution completed exactly once,
    usage totals equal the ledger."""
    n_flows, flow_size = max(1, CYCLES // 50), 10
    n_solo = CYCLES - n_flows * flow_size
    with connect(mc, mdb) as c:
        c.execute("SELECT ff_create_budget('ba', '{tokens}', '{100000}', '{0}')")
        c.execute("SELECT ff_create_budget('bb', '{calls,tokens}', '{0,100000}', '{0,0}')")
        c.execute("SELECT ff_create_quota_policy('q1', 60, 0, 2)")
        c.execute("SELECT ff_create_quota_policy('q2', 60, 0, 3)")
        ids = []
        for i in range(n_solo):
            # reservations and quotas vary independently
            kw = {"budget_ids": ["ba", "bb"], "quota_policy_id": f"q{1 + (i // 2) % 2}", "priority": i % 7}
            if i % 2 == 0:
                kw["budget_reserve"] = Jsonb({"tokens": 15000})
            ids.append(create_exec(c, "otx", **kw))
        for f in range(n_flows):
            flow = uuid.uuid4()
            with tx(c):
                c.execute("SELECT ff_create_flow(%s)", (flow,))
                members = []
                for i in range(flow_size):
                    members.append(create_exec(c, "otx", flow, budget_ids=["ba", "bb"],
                                               quota_policy_id=f"q{1 + (f + i) % 2}"))
                    add_member(c, flow, members[-1])
                rev = revision(c, flow)
                for i in range(1, flow_size - 1):
                    for up, down in ((0, i), (i, flow_size - 1)):
                        edge, rev = stage(c, flow, members[up], members[down], rev)
                        apply_edge(c, flow, edge, members[down])
            ids += members
    total = len(ids)
    lock = threading.Lock()
    committed, spent, errors = [], collections.Counter(), []
    deadline = time.time() + 90

    def worker(i):
        rng = random.Random(f"{SEED}/otx/{i}")
        with connect(mc, mdb) as conn:
            while time.time() < deadline:
                with lock:
                    # done, or broken beyond doubt (then stop early: the test fails anyway)
                    if len(committed) >= total or sum(1 for st, _ in errors if st in FORBIDDEN) >= 50:
                        return
                try:
                    with tx(conn):
                        row = claim(conn, "otx", f"w{i}")
                        if row is None:
                            got = None
                        else:
                            eid, grant = row
                            budgets = conn.execute("SELECT ff_get_execution(%s) -> 'budget_ids'", (eid,)).fetchone()[0]
                            assert budgets == ["ba", "bb"], budgets
                            k = rng.randint(1, 20)
                            assert spend(conn, "ba", eid, {"tokens": k}) == "ok"
                            assert spend(conn, "bb", eid, {"calls": 1, "tokens": k}) == "ok"
                            time.sleep(rng.uniform(0, 0.002))
                            complete(conn, eid, grant)
                            got = (eid, k)
                except Exception as e:  # engine errors and failed checks alike
                    with lock:
                        errors.append((getattr(e, "sqlstate", None) or type(e).__name__, first_line(e)))
                    continue
                if got is None:
                    time.sleep(0.005)
                    continue
                with lock:
                    committed.append(got[0])
                    spent["tokens"] += got[1]
                    spent["calls"] += 1

    started = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "a worker hangs"
    took = time.time() - started
    by_state = collections.Counter(s for s, _ in errors)
    print(f"\none-transaction workers: {len(committed)} cycles in {took:.1f} s, errors {dict(by_state)}")
    assert by_state["40P01"] == 0, f"{by_state['40P01']} deadlocks, e.g. {errors[:3]}"
    assert errors == [], errors[:5]
    assert len(committed) == total and len(set(committed)) == total
    with connect(mc, mdb) as c:
        assert c.execute("SELECT count(*) FROM ff_exec_core WHERE public_state = 'completed'").fetchone()[0] == total
        assert c.execute("SELECT count(*), count(DISTINCT execution_id) FROM ff_completion_event "
                         "WHERE outcome = 'success'").fetchone() == (total, total)
        usage = dict(((b, d), v) for b, d, v in c.execute(
            "SELECT budget_id, dimensions_key, current_value FROM ff_budget_usage").fetchall())
        ledger = dict(((b, d), v) for b, d, v in c.execute(
            "SELECT budget_id, dimensions_key, sum(delta_total)::bigint FROM ff_budget_usage_by_exec "
            "GROUP BY 1, 2").fetchall())
        assert usage == ledger
        assert usage == {("ba", "tokens"): spent["tokens"], ("bb", "tokens"): spent["tokens"],
                         ("bb", "calls"): spent["calls"]}
        assert c.execute("SELECT count(*) FROM ff_flow_core WHERE public_flow_state <> 'completed'").fetchone()[0] == 0
        assert_clean(c)


@pytest.mark.parametrize("order", ["quota_holder_first", "reserving_claim_first"])
def test_reserving_claim_races_one_transaction_worker(mc, mdb, order):
    """Two one-transaction workers, one budget b and one quota q: X names both
    without a reservation, Y names both with one. Each worker: BEGIN; claim;
    spend on b; complete; COMMIT. The second claim starts while the first
    transaction is open."""
    with connect(mc, mdb) as a, connect(mc, mdb) as w1, connect(mc, mdb) as w2:
        a.execute("SELECT ff_create_budget('b', '{tokens}', '{1000}', '{0}')")
        a.execute("SELECT ff_create_quota_policy('q', 60, 0, 5)")
        x = create_exec(a, "lx", budget_ids=["b"], quota_policy_id="q")
        y = create_exec(a, "ly", budget_ids=["b"], quota_policy_id="q", budget_reserve=Jsonb({"tokens": 100}))
        first, second = ((w1, "lx", x), (w2, "ly", y)) if order == "quota_holder_first" else ((w2, "ly", y), (w1, "lx", x))

        def rest(conn, eid, grant):
            assert spend(conn, "b", eid, {"tokens": 7}) == "ok"
            complete(conn, eid, grant)

        first[0].execute("BEGIN")
        row = claim(first[0], first[1])
        assert row[0] == first[2]

        def second_worker():
            with tx(second[0]):
                got = claim(second[0], second[1])
                if got:
                    rest(second[0], *got)
                return got
        bg = Bg(second_worker)
        wait_blocked(a, second[0], bg)
        _, e1 = attempt(first[0], lambda c: rest(c, *row))
        e1c = commit_or_error(first[0]) if e1 is None else None
        e2 = bg.join().error
        assert_no_deadlock(first=e1, first_commit=e1c, second=e2)
        assert (e1, e1c, e2) == (None, None, None), [first_line(e) for e in (e1, e1c, e2) if e]
        assert bg.result is not None and bg.result[0] == second[2]
        assert [state_of(a, e) for e in (x, y)] == ["completed", "completed"]
        assert a.execute("SELECT current_value FROM ff_budget_usage WHERE budget_id = 'b'").fetchone()[0] == 14
        assert_clean(a)


@pytest.mark.parametrize("order", ["reserver_first", "spender_first"])
def test_reservation_races_spend_on_a_budget_with_two_dimensions(mc, mdb, order):
    """Budget b has dimensions calls (no limit) and tokens (hard limit). X
    reserves tokens, Y does not; two one-transaction workers claim, spend
    {calls, tokens} on b and complete."""
    with connect(mc, mdb) as a, connect(mc, mdb) as w1, connect(mc, mdb) as w2:
        a.execute("SELECT ff_create_budget('b', '{calls,tokens}', '{0,1000}', '{0,0}')")
        x = create_exec(a, "lx", budget_ids=["b"], budget_reserve=Jsonb({"tokens": 10}))
        y = create_exec(a, "ly", budget_ids=["b"])
        first, second = ((w1, "lx", x), (w2, "ly", y)) if order == "reserver_first" else ((w2, "ly", y), (w1, "lx", x))

        def rest(conn, eid, grant):
            assert spend(conn, "b", eid, {"calls": 1, "tokens": 1}) == "ok"
            complete(conn, eid, grant)

        first[0].execute("BEGIN")
        row = claim(first[0], first[1])
        assert row[0] == first[2]
        if order == "spender_first":
            assert spend(first[0], "b", row[0], {"calls": 1, "tokens": 1}) == "ok"

        def second_worker():
            with tx(second[0]):
                got = claim(second[0], second[1])
                rest(second[0], *got)
                return got
        bg = Bg(second_worker)
        wait_blocked(a, second[0], bg)
        if order == "spender_first":
            _, e1 = attempt(first[0], lambda c: complete(c, *row))
        else:
            _, e1 = attempt(first[0], lambda c: rest(c, *row))
        e1c = commit_or_error(first[0]) if e1 is None else None
        e2 = bg.join().error
        assert_no_deadlock(first=e1, first_commit=e1c, second=e2)
        assert (e1, e1c, e2) == (None, None, None), [first_line(e) for e in (e1, e1c, e2) if e]
        assert [state_of(a, e) for e in (x, y)] == ["completed", "completed"]
        assert dict(a.execute("SELECT dimensions_key, current_value FROM ff_budget_usage WHERE budget_id = 'b'")
                    .fetchall()) == {"calls": 2, "tokens": 2}
        assert_clean(a)


# ===========================================================================
# 2c. ff_cancel_flow racing a worker that holds a member's claim
# ===========================================================================

@pytest.mark.parametrize("order", ["claim_open_cancel_then_complete", "complete_open_then_cancel",
                                   "cancel_open_then_claim", "spend_open_cancel_then_complete"])
def test_cancel_flow_races_worker(mc, mdb, order):
    with connect(mc, mdb) as a, connect(mc, mdb) as w, connect(mc, mdb) as c2:
        a.execute("SELECT ff_create_budget('b', '{tokens}', '{0}', '{0}')")
        # X = member 0 is upstream of 1 and 2, which feed 3.
        flow, ids, _ = make_flow(a, 4, [(0, 1), (0, 2), (1, 3), (2, 3)], budget_ids=["b"])
        errors = {}
        completed_first = False
        if order == "claim_open_cancel_then_complete":
            w.execute("BEGIN")
            grant = claim_node(w, ids, 0)[1]
            bg = Bg(lambda: c2.execute("SELECT ff_cancel_flow(%s, 'stop')", (flow,)).fetchone()[0])
            wait_blocked(a, c2, bg)
            errors["cancel"] = bg.join().error
            _, errors["complete"] = attempt(w, lambda c: complete(c, ids[0], grant))
            if errors["complete"] is None:
                errors["complete_commit"] = commit_or_error(w)
        elif order == "spend_open_cancel_then_complete":
            grant = claim_node(a, ids, 0)[1]  # the lease is committed
            w.execute("BEGIN")
            assert spend(w, "b", ids[0], {"tokens": 5}) == "ok"  # holds the member's row
            bg = Bg(lambda: c2.execute("SELECT ff_cancel_flow(%s, 'stop')", (flow,)).fetchone()[0])
            wait_blocked(a, c2, bg)
            errors["cancel"] = bg.join().error
            _, errors["complete"] = attempt(w, lambda c: complete(c, ids[0], grant))
            if errors["complete"] is None:
                errors["complete_commit"] = commit_or_error(w)
        elif order == "complete_open_then_cancel":
            w.execute("BEGIN")
            grant = claim_node(w, ids, 0)[1]
            _, errors["complete"] = attempt(w, lambda c: complete(c, ids[0], grant))
            bg = Bg(lambda: c2.execute("SELECT ff_cancel_flow(%s, 'stop')", (flow,)).fetchone()[0])
            wait_blocked(a, c2, bg)
            errors["complete_commit"] = commit_or_error(w) if errors["complete"] is None else None
            errors["cancel"] = bg.join().error
            completed_first = True
        else:
            c2.execute("BEGIN")
            _, errors["cancel"] = attempt(c2, lambda c: c.execute("SELECT ff_cancel_flow(%s, 'stop')", (flow,)))
            bg = Bg(in_tx(w, lambda c: claim(c, "n0")))
            wait_blocked(a, w, bg)
            errors["cancel_commit"] = commit_or_error(c2) if errors["cancel"] is None else None
            errors["claim"] = bg.join().error
            assert bg.result is None, "a member of a cancelled flow was claimed"
        assert_no_deadlock(**errors)
        if completed_first:
            assert all(e is None for e in errors.values()), errors
        else:
            assert errors.get("cancel") is None and errors.get("cancel_commit") is None, errors
            if "complete" in errors:
                # The cancel committed first: the lease is as good as stale.
                assert errors["complete"] is not None and errors["complete"].sqlstate == "55000", errors
                rollback_quietly(w)
        reports = settle(a, lanes_of(4))
        assert_no_lost_cascade(reports)
        st = [state_of(a, e) for e in ids]
        if completed_first:
            assert st[0] == "completed" and set(st[1:]) == {"cancelled"}, st
        else:
            assert set(st) == {"cancelled"}, st
        assert flow_state(a, flow) == "cancelled"
        assert_clean(a)


def test_cancel_flow_amid_committing_claims_releases_what_they_hold(mc, mdb):
    """ff_cancel_flow on wide flows (500 members) while three workers keep
    claiming their members (autocommit ff_claim_batch): a member whose claim
    commits while the cancel runs must be ended like every other leased
    member, with its attempt closed, its quota slot freed and its budget
    reservation released."""
    leak_sql = f"""
        SELECT {EID} FROM ff_exec_core x WHERE x.flow_id = %s AND x.lifecycle_phase = 'terminal'
          AND (EXISTS (SELECT FROM ff_attempt t WHERE t.execution_id = x.execution_id AND t.terminal_at_ms IS NULL)
               OR EXISTS (SELECT FROM ff_quota_admitted q WHERE q.execution_id = x.execution_id)
               OR EXISTS (SELECT FROM ff_budget_usage_by_exec l WHERE l.execution_id = x.execution_id
                          AND l.reserved > 0))"""
    with connect(mc, mdb) as a:
        a.execute("SELECT ff_create_quota_policy('q', 60, 0, 100000)")
        a.execute("SELECT ff_create_budget('b', '{tokens}', '{100000000}', '{0}')")
        claimers = [connect(mc, mdb) for _ in range(3)]
        stop = threading.Event()

        def claimer(c):
            while not stop.is_set():
                claim_batch(c, ["wide"], f"w{c.info.backend_pid}", max_count=2)
        leaks = []
        workers = []
        try:
            for it in range(8):
                flow = uuid.uuid4()
                with tx(a):
                    a.execute("SELECT ff_create_flow(%s)", (flow,))
                    a.execute("SELECT ff_add_execution_to_flow(%s, ff_create_execution('wide', flow_id => %s, "
                              "quota_policy_id => 'q', budget_ids => '{b}', budget_reserve => '{\"tokens\": 1}')) "
                              "FROM generate_series(1, 500)", (flow, flow))
                if not workers:
                    workers = [Bg(lambda c=c: claimer(c)) for c in claimers]
                time.sleep(0.02)
                cancelled = a.execute("SELECT ff_cancel_flow(%s, 'stop')", (flow,)).fetchone()[0]
                leaks = [r[0] for r in a.execute(leak_sql, (flow,)).fetchall()]
                if leaks:
                    print(f"\nflow {it + 1}: ff_cancel_flow ended {cancelled}; {len(leaks)} of them still hold an "
                          f"open attempt / quota slot / reservation, e.g. {leaks[:2]}")
                    break
        finally:
            stop.set()
            for w in workers:
                w.join()
            for c in claimers:
                c.close()
        for w in workers:
            assert w.error is None, first_line(w.error)
        assert leaks == [], f"{len(leaks)} ended members keep their attempt / quota slot / reservation"
        settle(a, ["wide"])
        assert_clean(a)
        reserved = a.execute("SELECT ff_get_budget_status('b') -> 'reserved' ->> 'tokens'").fetchone()[0]
        assert reserved in (None, "0"), reserved


# ===========================================================================
# 2d. Two endings in one flow whose cascades cross levels
# ===========================================================================

def expected_cross(end_a, end_b, policy):
    st = {"A": "completed" if end_a == "complete" else "failed",
          "B": "completed" if end_b == "complete" else "failed"}
    st["C"] = "completed" if end_a == "complete" else "skipped"
    st["D"] = "completed" if end_b == "complete" else "skipped"
    ok = [st["C"] == "completed", st["D"] == "completed"]
    st["E"] = "completed" if (all(ok) if policy == "all_of" else any(ok)) else "skipped"
    flow = "failed" if "failed" in st.values() else "completed"
    return st, flow


@pytest.mark.parametrize("claims_in_tx", [False, True])
@pytest.mark.parametrize("first", ["A", "B"])
@pytest.mark.parametrize("end_a,end_b,policy", [("fail", "fail", "all_of"), ("complete", "fail", "all_of"),
                                                 ("fail", "complete", "any_of"), ("fail", "fail", "any_of")])
def test_two_endings_with_crossing_cascades(mc, mdb, end_a, end_b, policy, first, claims_in_tx):
    """A->C, B->D, C->E, D->E; A and B end in two open transactions."""
    with connect(mc, mdb) as a, connect(mc, mdb) as t1, connect(mc, mdb) as t2:
        pol = {4: {"kind": "any_of", "on_satisfied": "let_run"}} if policy == "any_of" else None
        flow, ids, _ = make_flow(a, 5, [(0, 2), (1, 3), (2, 4), (3, 4)], pol)
        names = {"A": 0, "B": 1}
        ends = {"A": end_a, "B": end_b}
        second = "B" if first == "A" else "A"
        grants = {}
        if not claims_in_tx:
            for n in ("A", "B"):
                grants[n] = claim_node(a, ids, names[n])[1]
        t1.execute("BEGIN")
        if claims_in_tx:
            grants[first] = claim_node(t1, ids, names[first])[1]
        _, e1 = attempt(t1, lambda c: end(c, ids[names[first]], grants[first], ends[first]))

        def run_second(c):
            g = grants.get(second) or claim_node(c, ids, names[second])[1]
            end(c, ids[names[second]], g, ends[second])
        bg = Bg(in_tx(t2, run_second))
        wait_blocked(a, t2, bg)
        e1c = commit_or_error(t1) if e1 is None else None
        e2 = bg.join().error
        assert_no_deadlock(first=e1, first_commit=e1c, second=e2)
        assert (e1, e1c, e2) == (None, None, None), [first_line(e) for e in (e1, e1c, e2) if e]
        reports = settle(a, lanes_of(5))
        assert_no_lost_cascade(reports)
        want, want_flow = expected_cross(end_a, end_b, policy)
        assert {n: state_of(a, ids[i]) for i, n in enumerate("ABCDE")} == want
        assert flow_state(a, flow) == want_flow
        assert_clean(a)


# ===========================================================================
# 2e. any_of with cancel_remaining while a sibling is being completed
# ===========================================================================

@pytest.mark.parametrize("order", ["winner_open_then_sibling_completes", "sibling_claim_open_then_complete",
                                   "sibling_renew_open_then_complete", "sibling_claim_open_then_rollback",
                                   "sibling_claim_committed_then_late_complete"])
def test_any_of_cancel_remaining_races_sibling(mc, mdb, order):
    """U0, U1, U2 -> D (any_of, cancel_remaining). U0 wins; U1 is the sibling
    being worked on in another transaction at that moment. The sibling ends
    as its worker saw commit: completed when its complete committed, else
    cancelled (at once or by the reconciler); U2 is cancelled; D runs."""
    with connect(mc, mdb) as a, connect(mc, mdb) as win, connect(mc, mdb) as sib:
        flow, ids, _ = make_flow(a, 4, [(0, 3), (1, 3), (2, 3)],
                                 {3: {"kind": "any_of", "on_satisfied": "cancel_remaining"}})
        errors = {}
        if order == "winner_open_then_sibling_completes":
            g1 = claim_node(a, ids, 1)[1]
            g0 = claim_node(a, ids, 0)[1]
            win.execute("BEGIN")
            _, errors["winner"] = attempt(win, lambda c: complete(c, ids[0], g0))
            bg = Bg(lambda: complete(sib, ids[1], g1))
            wait_blocked(a, sib, bg)
            errors["winner_commit"] = commit_or_error(win) if errors["winner"] is None else None
            errors["sibling"] = bg.join().error
        else:
            sib.execute("BEGIN")
            if order == "sibling_renew_open_then_complete":
                g1 = claim_node(a, ids, 1)[1]
                sib.execute("SELECT ff_renew_lease(%s, %s, 30000)", (ids[1], g1))
            else:
                g1 = claim_node(sib, ids, 1)[1]
            g0 = claim_node(a, ids, 0)[1]
            bg = Bg(lambda: complete(win, ids[0], g0))
            wait_blocked(a, win, bg)
            errors["winner"] = bg.join().error
            if order.endswith("then_complete"):
                _, errors["sibling"] = attempt(sib, lambda c: complete(c, ids[1], g1))
                if errors["sibling"] is None:
                    errors["sibling_commit"] = commit_or_error(sib)
            elif order == "sibling_claim_open_then_rollback":
                sib.execute("ROLLBACK")
            else:
                errors["sibling_commit"] = commit_or_error(sib)
                reconcile(a)
                _, errors["sibling"] = attempt(sib, lambda c: complete(c, ids[1], g1))
        assert_no_deadlock(**errors)
        sib_err = errors.pop("sibling", None)
        assert all(e is None for e in errors.values()), {k: first_line(e) for k, e in errors.items() if e}
        if sib_err is not None:
            assert sib_err.sqlstate == "55000", first_line(sib_err)
        sibling_completed = sib_err is None and order != "sibling_claim_open_then_rollback"
        if order in ("winner_open_then_sibling_completes", "sibling_claim_committed_then_late_complete"):
            # the group fired before the sibling's complete: its lease is stale by then
            assert not sibling_completed, "the sibling completed after the group cancelled it"
        assert state_of(a, ids[0]) == "completed"
        reports = settle(a, lanes_of(4))
        assert_no_lost_cascade(reports)
        st = [state_of(a, e) for e in ids]
        assert st == ["completed", "completed" if sibling_completed else "cancelled", "cancelled", "completed"], st
        assert a.execute("SELECT group_state FROM ff_edge_group WHERE flow_id = %s", (flow,)).fetchone()[0] == "satisfied"
        assert flow_state(a, flow) == "completed"
        assert_clean(a)


# ===========================================================================
# Every flow ends
# ===========================================================================

def test_flow_whose_members_ended_before_they_were_added_ends(mc, mdb):
    """Built across transactions (create with flow_id, add later), a member
    can be claimed and completed before it is added. Once every member is
    terminal the flow is not open any more."""
    with connect(mc, mdb) as a:
        flow = uuid.uuid4()
        a.execute("SELECT ff_create_flow(%s)", (flow,))
        eid = create_exec(a, "late", flow)
        row = claim(a, "late")
        assert row[0] == eid
        complete(a, *row)
        assert state_of(a, eid) == "completed"
        assert add_member(a, flow, eid)[0] == "added"
        reconcile(a)
        assert flow_state(a, flow) == "completed"
        assert_clean(a)

"""The job-system surface (issue 14) as users meet it through SQL, with
several real connections at once: batch claims over several lanes (exact,
in lane order, under budgets with reservations and quotas), batch creation
and unique keys, keyset listing under concurrent inserts, pausing lanes,
dead letters and re-drive with their metrics, cron schedules with several
runners and across a restart, and the background worker waiting for a
database that does not exist yet.

Randomness is seeded: set FF_SURFACE_SEED to replay a run (every test that
uses it prints the seed). Extra clusters use FF_TEST_PORT + 1 (schedules,
with the background worker) and FF_TEST_PORT + 2 (a worker whose database
comes later), or FF_SURFACE_SCHED_PORT / FF_SURFACE_LATER_PORT."""
import os
import random
import threading
import time
from collections import Counter, defaultdict

import psycopg
import pytest
from psycopg.types.json import Jsonb

from cluster import Cluster, wait_for
from ffhelp import make_stale_work, run_parallel, settled
from test_background_client import Listener

SEED = int(os.environ.get("FF_SURFACE_SEED") or random.SystemRandom().randrange(1 << 31))
BASE_PORT = int(os.environ.get("FF_TEST_PORT", "54329"))
SCHED_PORT = int(os.environ.get("FF_SURFACE_SCHED_PORT", str(BASE_PORT + 1)))
LATER_PORT = int(os.environ.get("FF_SURFACE_LATER_PORT", str(BASE_PORT + 2)))

CLAIM_BATCH = ("SELECT execution_id, grant_key, lane_id, payload, attempt "
               "FROM ff_claim_batch(%s::text[], %s, %s, grant_ttl_ms => %s, max_count => %s)")
COMPLETE = "SELECT ff_complete_execution(%s, %s)"
SERVER_MS = "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint"


def rng_for(name):
    s = (SEED * 1_000_003 + sum(ord(ch) * 31 ** i for i, ch in enumerate(name))) % (1 << 62)
    print(f"\n[{name}] FF_SURFACE_SEED={SEED} (derived {s})")
    return random.Random(s)


def lane_metrics(conn, lane):
    """{metric: value} of ff_metrics for one lane (missing counters are 0)."""
    got = dict(conn.execute("SELECT metric, value FROM ff_metrics WHERE scope = 'lane' AND name = %s",
                            (lane,)).fetchall())
    return {m: got.get(m, 0) for m in ("created", "claimed", "completed", "failed", "expired", "retried")}


def reconciler_metric(conn, reconciler, counter):
    row = conn.execute("SELECT value FROM ff_metrics WHERE scope = 'reconciler' AND name = %s AND metric = %s",
                       (reconciler, counter)).fetchone()
    return row[0] if row else 0


def listing(conn, lane, state=None):
    """Every execution of a lane (optionally in one public state), one page of up to 10,000."""
    return [r[0] for r in conn.execute(
        "SELECT e FROM ff_list_executions(lane_id => %s, public_state => %s, max_count => 10000) e",
        (lane, state)).fetchall()]


def server_ms(conn):
    return conn.execute(SERVER_MS).fetchone()[0]


class Background:
    """Threads running beside the test; an error in any of them fails it."""

    def __init__(self, *targets):
        self.errors = []
        self.threads = [threading.Thread(target=self._guard, args=(t,)) for t in targets]
        for t in self.threads:
            t.start()

    def _guard(self, target):
        try:
            target()
        except Exception as e:  # surfaced by join()
            self.errors.append(e)

    def join(self):
        for t in self.threads:
            t.join()
        assert not self.errors, self.errors


def complete_all(cluster, db, rows, threads=4):
    """Completes (execution_id, grant_key) pairs from several connections;
    every grant must be in force (a shared or stale grant raises)."""
    rows = list(rows)

    def part(i):
        with cluster.connect(db) as c:
            for eid, grant in rows[i::threads]:
                c.execute(COMPLETE, (eid, grant))

    run_parallel(threads, part)


# ---------------------------------------------------------------------------
# 1. ff_claim_batch: exact, in lane order, under reservations and quotas
# ---------------------------------------------------------------------------

LANES = ("bx-alpha", "bx-beta", "bx-gamma")
LANE_SIZES = {"bx-alpha": 401, "bx-beta": 409, "bx-gamma": 427}  # 1,237 executions
PERMUTATIONS = [
    ("bx-alpha", "bx-beta", "bx-gamma"), ("bx-gamma", "bx-alpha", "bx-beta"), ("bx-beta", "bx-gamma", "bx-alpha"),
    ("bx-alpha", "bx-gamma", "bx-beta"), ("bx-beta", "bx-alpha", "bx-gamma"), ("bx-gamma", "bx-beta", "bx-alpha"),
]


def test_claim_batch_16_connections_claim_each_execution_once_in_lane_order(cluster, db):
    rng = rng_for("claim-batch-exact")
    info = {}  # eid -> (lane, i, priority, creation order)
    order = 0
    with cluster.connect(db) as c:
        for lane in LANES:
            by_priority = defaultdict(list)
            for i in range(LANE_SIZES[lane]):
                by_priority[rng.randint(0, 9)].append(i)
            calls = list(by_priority)
            rng.shuffle(calls)  # creation order is not priority order
            for p in calls:
                payloads = [Jsonb({"lane": lane, "i": i, "p": p}) for i in by_priority[p]]
                ids = c.execute("SELECT ff_create_executions(%s, %s::jsonb[], priority => %s)",
                                (lane, payloads, p)).fetchone()[0]
                assert len(ids) == len(payloads)
                for i, eid in zip(by_priority[p], ids):
                    info[eid] = (lane, i, p, order)
                    order += 1
    assert len(info) == 1237

    batches = []  # (connection, lanes, max_count, t0, t1, rows)

    def claimer(i):
        lanes, most = list(PERMUTATIONS[i % 6]), (7 if i % 2 == 0 else 13)
        with cluster.connect(db) as c:
            while True:
                t0 = time.monotonic()
                rows = c.execute(CLAIM_BATCH, (lanes, f"w{i}", f"w{i}-1", 120000, most)).fetchall()
                t1 = time.monotonic()
                batches.append((i, lanes, most, t0, t1, rows))
                if not rows:
                    return

    run_parallel(16, claimer)

    claimed = [r for b in batches for r in b[5]]
    counts = Counter(r[0] for r in claimed)
    assert len(claimed) == 1237, f"{len(claimed)} rows claimed for 1,237 executions"
    assert [e for e, n in counts.items() if n > 1] == [], "claimed more than once"
    assert set(counts) == set(info)
    assert len({r[1] for r in claimed}) == 1237, "a grant was handed to two rows"
    for eid, grant, lane, payload, attempt in claimed:
        lane0, i, p, _ = info[eid]
        assert grant.startswith(f"pg:{eid}:"), (eid, grant)
        assert (lane, payload, attempt) == (lane0, {"lane": lane0, "i": i, "p": p}, 1)
    for conn_i, lanes, most, t0, t1, rows in batches:
        assert len(rows) <= most
    assert any(len(b[5]) == 13 for b in batches) and any(len(b[5]) == 7 for b in batches)

    # Lanes are tried in the order given: a batch holding rows of its k-th
    # lane found the earlier ones empty, so no batch that started after it
    # ended got a row of those earlier lanes.
    last_start = {lane: max(b[3] for b in batches if any(r[2] == lane for r in b[5])) for lane in LANES}
    went_past = 0
    for conn_i, lanes, most, t0, t1, rows in batches:
        deepest = max((lanes.index(r[2]) for r in rows), default=-1)
        for earlier in lanes[:max(deepest, 0)]:
            went_past += 1
            assert last_start[earlier] < t1, (
                f"connection {conn_i} (lanes {lanes}) got rows of {lanes[deepest]} while {earlier} still had "
                f"claimable work: a later batch claimed from {earlier}")
    assert went_past > 0, "no batch ever reached a later lane: the test did not exercise lane order"

    # Best first within a lane: a batch that started after another ended
    # only got rows ranked after all of that one's rows of the same lane.
    def rank(eid):
        _, _, p, o = info[eid]
        return (-p, o)

    for lane in LANES:
        spans = [(b[3], b[4], [rank(r[0]) for r in b[5] if r[2] == lane]) for b in batches]
        spans = [s for s in spans if s[2]]
        for a0, a1, ra in spans:
            worst = max(ra)
            for b0, b1, rb in spans:
                if b0 > a1:
                    assert min(rb) > worst, f"{lane}: a later batch got a better row than an earlier batch"

    with cluster.connect(db) as c:
        for lane in LANES:
            assert len(listing(c, lane, "active")) == LANE_SIZES[lane]
            m = lane_metrics(c, lane)
            assert (m["created"], m["claimed"]) == (LANE_SIZES[lane], LANE_SIZES[lane]), (lane, m)
    complete_all(cluster, db, [(r[0], r[1]) for r in claimed])
    with cluster.connect(db) as c:
        for lane in LANES:
            assert len(listing(c, lane, "completed")) == LANE_SIZES[lane]
            assert lane_metrics(c, lane)["completed"] == LANE_SIZES[lane]


def run_admission_claimers(cluster, db, lane, total, observe, deadline_s=25):
    """16 connections batch-claim `lane` (max_count 7 and 13) in explicit
    transactions, read `observe` (one statement, so one snapshot) while the
    claim is still uncommitted, hold it open a moment, commit, then complete
    what they got. Returns (claimed rows, in-transaction observations)."""
    claimed, seen = [], []
    lock = threading.Lock()
    deadline = time.time() + deadline_s

    def claimer(i):
        most = 7 if i % 2 == 0 else 13
        with cluster.connect(db, autocommit=False) as c:
            while time.time() < deadline:
                with lock:
                    if len(claimed) >= total:
                        break
                rows = c.execute(CLAIM_BATCH, ([lane], f"w{i}", f"w{i}-1", 60000, most)).fetchall()
                if rows:
                    seen.append(("open", len(rows)) + tuple(c.execute(observe).fetchone()))
                    time.sleep(0.004)  # the claim stays uncommitted while others try theirs
                c.commit()
                if not rows:
                    time.sleep(0.002)
                    continue
                with lock:
                    claimed.extend(rows)
                for eid, grant, *_ in rows:
                    c.execute(COMPLETE, (eid, grant))
                    c.commit()

    stop = threading.Event()

    def monitor():
        with cluster.connect(db) as c:
            while not stop.is_set():
                seen.append(("committed", 0) + tuple(c.execute(observe).fetchone()))
                time.sleep(0.002)

    watcher = Background(monitor)
    try:
        run_parallel(16, claimer)
    finally:
        stop.set()
        watcher.join()
    return claimed, seen


def fill_then_refill(cluster, db, lane, fits):
    """Claims of 13: the first stays uncommitted while a second connection
    claims; together they get exactly `fits`, a third claim nothing; after
    one lease ends, exactly one more. Returns the (execution_id, grant_key)
    pairs claimed, all completed by then."""
    with cluster.connect(db, autocommit=False) as a, cluster.connect(db) as c:
        first = a.execute(CLAIM_BATCH, ([lane], "a", "a", 60000, 13)).fetchall()
        box = {}

        def second_claimer():
            with cluster.connect(db) as b:
                box["rows"] = b.execute(CLAIM_BATCH, ([lane], "b", "b", 60000, 13)).fetchall()

        second_thread = Background(second_claimer)
        time.sleep(0.3)  # the first claim is still open
        a.commit()
        second_thread.join()
        second = box["rows"]
        third = c.execute(CLAIM_BATCH, ([lane], "c", "c", 60000, 13)).fetchall()
        assert (len(first) + len(second), len(third)) == (fits, 0), (len(first), len(second), len(third))
        assert c.execute("SELECT count(*) FROM ff_claim_for_worker(%s, 'd', 'd')", (lane,)).fetchone() == (0,)
        held = first + second
        c.execute(COMPLETE, held[0][:2])
        again = c.execute(CLAIM_BATCH, ([lane], "c", "c", 60000, 13)).fetchall()
        assert len(again) == 1, f"one lease ended, {len(again)} admitted"
        for eid, grant, *_ in held[1:] + again:
            c.execute(COMPLETE, (eid, grant))
        return [r[:2] for r in held + again]


def test_claim_batch_reservations_never_pass_the_headroom(cluster, db):
    total, reserve, limit, used = 263, 37, 1000, 113
    fits = (limit - used) // reserve  # 23 leases (851 tokens) fit in 887; a 24th would need 888
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('tok', ARRAY['tokens'], ARRAY[%s]::bigint[], ARRAY[0]::bigint[])", (limit,))
        report = c.execute("SELECT outcome FROM ff_report_usage('tok', %s)", (Jsonb({"tokens": used}),)).fetchone()
        assert report == ("ok",)
        ids = c.execute("SELECT ff_create_executions('bud', %s::jsonb[], budget_ids => ARRAY['tok'], "
                        "budget_reserve => %s)",
                        ([Jsonb({"i": i}) for i in range(total)], Jsonb({"tokens": reserve}))).fetchone()[0]
    first = fill_then_refill(cluster, db, "bud", fits)
    observe = """SELECT (SELECT reserved FROM ff_budget_health WHERE budget_id = 'tok' AND dimension = 'tokens'),
                        (SELECT current_usage FROM ff_budget_health WHERE budget_id = 'tok' AND dimension = 'tokens'),
                        (SELECT coalesce(sum(executions), 0)::int FROM ff_queue_depth
                         WHERE lane_id = 'bud' AND public_state = 'active')"""
    claimed, seen = run_admission_claimers(cluster, db, "bud", total - len(first), observe)

    assert sorted([r[0] for r in claimed] + [r[0] for r in first]) == sorted(ids), "every execution claimed once"
    assert len({r[1] for r in claimed} | {r[1] for r in first}) == total
    assert any(s[0] == "open" for s in seen)
    for kind, got, reserved, usage, active in seen:
        assert usage == used
        assert reserved == reserve * active, (kind, reserved, active)
        assert reserved <= limit - used, f"{kind}: {reserved} tokens reserved with {limit - used} of headroom"
        assert active <= fits, (kind, active)
    print(f"\nmost leases in force seen: {max(s[4] for s in seen)} of {fits}")
    with cluster.connect(db) as c:
        st = c.execute("SELECT ff_get_budget_status('tok')").fetchone()[0]
        assert st["usage"] == {"tokens": used} and st["reserved"].get("tokens", 0) == 0, st
        assert lane_metrics(c, "bud")["claimed"] == total


def test_claim_batch_quota_never_leases_more_than_max_concurrent(cluster, db):
    total, cap = 211, 5
    with cluster.connect(db) as c:
        assert c.execute("SELECT ff_create_quota_policy('q5', 60, 0, %s)", (cap,)).fetchone() == ("created",)
        ids = c.execute("SELECT ff_create_executions('quo', %s::jsonb[], quota_policy_id => 'q5')",
                        ([Jsonb({"i": i}) for i in range(total)],)).fetchone()[0]
    first = fill_then_refill(cluster, db, "quo", cap)
    observe = """SELECT (SELECT count(*)::int FROM ff_quota_admitted WHERE quota_policy_id = 'q5'),
                        (SELECT coalesce(sum(executions), 0)::int FROM ff_queue_depth
                         WHERE lane_id = 'quo' AND public_state = 'active')"""
    claimed, seen = run_admission_claimers(cluster, db, "quo", total - len(first), observe)

    assert sorted([r[0] for r in claimed] + [r[0] for r in first]) == sorted(ids)
    assert any(s[0] == "open" for s in seen)
    for kind, got, slots, active in seen:
        assert active <= cap and slots <= cap, f"{kind}: {active} leased, {slots} quota slots; max_concurrent {cap}"
        assert slots == active, (kind, slots, active)
        if kind == "open":
            assert got <= cap
    print(f"\nmost leases in force seen: {max(s[3] for s in seen)} of {cap}")
    with cluster.connect(db) as c:
        assert lane_metrics(c, "quo")["claimed"] == total


# ---------------------------------------------------------------------------
# 2. ff_create_executions at 10,000 and unique keys under concurrency
# ---------------------------------------------------------------------------

def test_create_executions_10000_in_one_call_in_payload_order(cluster, db):
    n = 10_000
    with cluster.connect(db) as c:
        started = time.time()
        ids = c.execute("SELECT ff_create_executions('bulk', %s::jsonb[], priority => 3)",
                        ([Jsonb({"n": k}) for k in range(n)],)).fetchone()[0]
        print(f"\nff_create_executions of {n}: {time.time() - started:.2f} s")
        assert len(ids) == n and len(set(ids)) == n
        listed = listing(c, "bulk")
        assert len(listed) == n
        by_id = {e["execution_id"]: e for e in listed}
        assert [by_id[eid]["payload"]["n"] for eid in ids] == list(range(n)), "ids are not in payload order"
        assert [e["execution_id"] for e in listed] == ids, "listing is not in creation order"
        assert Counter(e["public_state"] for e in listed) == {"waiting": n}
        assert lane_metrics(c, "bulk")["created"] == n

    got = []

    def claimer(i):
        with cluster.connect(db) as c:
            while True:
                rows = c.execute(CLAIM_BATCH, (["bulk"], f"w{i}", "i", 60000, 1000)).fetchall()
                if not rows:
                    return
                got.extend(rows)

    run_parallel(4, claimer)
    assert len(got) == n and {r[0] for r in got} == set(ids), "all 10,000 claimable, each once"
    by_eid = {r[0]: r for r in got}
    assert all(by_eid[eid][3] == {"n": k} for k, eid in enumerate(ids))


def test_unique_key_under_concurrent_creators(cluster, db):
    lane, key = "uq", "nightly-report"
    create = "SELECT ff_create_execution(%s, payload => %s, unique_key => %s)"

    def create_from(n, hold=0.0):
        out = [None] * n

        def one(i):
            with cluster.connect(db, autocommit=hold == 0.0) as c:
                out[i] = c.execute(create, (lane, Jsonb({"by": i}), key)).fetchone()[0]
                if hold:
                    time.sleep(hold)  # still uncommitted: the others wait on it, then see it
                    c.commit()

        run_parallel(n, one)
        return out

    def live(c):
        return [e for e in listing(c, lane) if e["public_state"] in ("waiting", "delayed", "active")]

    all_ids = set()
    with cluster.connect(db) as c:
        # Eight creators at once, each in a transaction held open a moment:
        # the others wait for the first insert, then see it.
        first = create_from(8, hold=0.03)
        assert len(set(first)) == 1, first
        live_id = first[0]
        all_ids.add(live_id)
        assert [e["execution_id"] for e in live(c)] == [live_id]
        assert create_from(8) == [live_id] * 8
        # One call with the key: the first payload creates, the rest return it.
        assert c.execute("SELECT ff_create_executions(%s, %s::jsonb[], unique_key => %s)",
                         (lane, [Jsonb({"b": k}) for k in range(5)], key)).fetchone()[0] == [live_id] * 5
        # Leased is live too.
        eid, grant = c.execute("SELECT execution_id, grant_key FROM ff_claim_batch(ARRAY[%s]::text[], 'w', 'i')",
                               (lane,)).fetchone()
        assert eid == live_id
        assert create_from(8) == [live_id] * 8
        c.execute(COMPLETE, (eid, grant))
        # Ended: the next creators get one new execution.
        second = create_from(8)
        assert len(set(second)) == 1 and second[0] != live_id, second
        live_id = second[0]
        all_ids.add(live_id)

        # Creators racing the end of the live one, round after round on the
        # same eight connections: each gets the old id or the one new
        # execution (never an error, never two new ones).
        rounds = 24
        claim = "SELECT execution_id, grant_key FROM ff_claim_batch(ARRAY[%s]::text[], 'w', 'i')"
        state = {"live": live_id, "lease": c.execute(claim, (lane,)).fetchone()}
        assert state["lease"][0] == live_id
        out = [[] for _ in range(8)]
        problems = []
        gate = threading.Barrier(8)

        def racer(i):
            with cluster.connect(db) as rc:
                for rnd in range(rounds):
                    gate.wait()
                    if i == 0:
                        time.sleep(0.0005 * (rnd % 7))
                        rc.execute(COMPLETE, state["lease"])
                    else:
                        out[i] = []
                        for k in range(5):  # back to back, across the moment the live one ends
                            try:
                                out[i].append(rc.execute(create, (lane, Jsonb({"round": rnd, "by": i}), key)
                                                         ).fetchone()[0])
                            except psycopg.Error as e:
                                problems.append(f"round {rnd}: {e.sqlstate} {e}")
                        if state["live"] in out[i] and out[i].index(state["live"]) > min(
                                (j for j, x in enumerate(out[i]) if x != state["live"]), default=99):
                            problems.append(f"round {rnd}: the ended execution came back after a new one")
                    gate.wait()
                    if i == 0:
                        new = {x for got in out[1:] for x in got if x != state["live"]}
                        if len(new) > 1:
                            problems.append(f"round {rnd}: {len(new)} new executions for one key")
                        now_live = [e["execution_id"] for e in live(rc)]
                        if now_live != sorted(new):
                            problems.append(f"round {rnd}: live {now_live}, new {new}")
                        if not new:  # every creator came before the end (or failed): create the next one
                            new = {rc.execute(create, (lane, None, key)).fetchone()[0]}
                        state["live"] = sorted(new)[0]
                        all_ids.update(new)
                        state["lease"] = rc.execute(claim, (lane,)).fetchone()
                        if state["lease"][0] != state["live"]:
                            problems.append(f"round {rnd}: claimed {state['lease'][0]}, live {state['live']}")

        run_parallel(8, racer)
        c.execute(COMPLETE, state["lease"])

        # The same race made certain: the creator is held up 200 ms right
        # after its insert met the live execution (a statement trigger on
        # the insert stands in for a descheduled backend), and the live one
        # ends meanwhile.
        c.execute("CREATE FUNCTION public.slow_insert() RETURNS trigger LANGUAGE plpgsql "
                  "AS $$ BEGIN PERFORM pg_sleep(0.2); RETURN NULL; END $$")
        c.execute("CREATE TRIGGER slow_insert AFTER INSERT ON flowfabric.ff_exec_core "
                  "FOR EACH STATEMENT EXECUTE FUNCTION public.slow_insert()")
        try:
            held = c.execute(create, (lane, None, key)).fetchone()[0]
            all_ids.add(held)
            lease = c.execute(claim, (lane,)).fetchone()
            assert lease[0] == held
            ready, result = threading.Event(), {}

            def slow_creator():
                with cluster.connect(db) as rc:
                    ready.set()
                    try:
                        result["id"] = rc.execute(create, (lane, Jsonb({"slow": True}), key)).fetchone()[0]
                    except psycopg.Error as e:
                        result["error"] = f"{e.sqlstate} {e}"

            creator = Background(slow_creator)
            ready.wait()
            time.sleep(0.05)
            c.execute(COMPLETE, lease)
            creator.join()
        finally:
            c.execute("DROP TRIGGER slow_insert ON flowfabric.ff_exec_core")
        if "error" in result:
            problems.append(f"creating while the live one ends: {result['error']}")
        else:
            all_ids.add(result["id"])
        assert problems == [], f"{len(problems)} problems: {problems[:5]}"
        assert lane_metrics(c, lane)["created"] == len(all_ids) == len(listing(c, lane))


# ---------------------------------------------------------------------------
# 3. ff_list_executions: keyset pages stable under concurrent inserts
# ---------------------------------------------------------------------------

def test_list_executions_pages_stay_stable_while_others_insert(cluster, db):
    lane = "lst"
    pre = []
    with cluster.connect(db) as c:
        for k in range(13):
            pre += c.execute("SELECT ff_create_executions(%s, %s::jsonb[], priority => %s)",
                             (lane, [Jsonb({"k": k, "j": j}) for j in range(79)], k % 4)).fetchone()[0]
            c.execute("SELECT ff_create_executions('lst-other', %s::jsonb[])", ([Jsonb({"k": k})] * 23,))
        rows = c.execute(CLAIM_BATCH, ([lane], "w", "i", 60000, 97)).fetchall()
        for eid, grant, *_ in rows[:41]:
            c.execute(COMPLETE, (eid, grant))
    assert len(pre) == 1027

    done = threading.Event()
    inserted = defaultdict(list)
    pages = []

    def pager():
        try:
            with cluster.connect(db) as c:
                after = None
                deadline = time.time() + 20
                while time.time() < deadline:
                    page = [r[0] for r in c.execute(
                        "SELECT e FROM ff_list_executions(lane_id => %s, after_execution_id => %s, max_count => 50) e",
                        (lane, after)).fetchall()]
                    pages.append(page)
                    if len(page) < 50:
                        return
                    after = page[-1]["execution_id"]
                    time.sleep(0.004)
        finally:
            done.set()

    def batch_inserter():
        with cluster.connect(db) as c:
            k = 0
            while not done.is_set():
                inserted["batch"] += c.execute("SELECT ff_create_executions(%s, %s::jsonb[])",
                                               (lane, [Jsonb({"new": k, "j": j}) for j in range(7)])).fetchone()[0]
                k += 1
                time.sleep(0.003)

    def slow_inserter():
        # Rows inserted early in a transaction that commits later: their
        # creation sequence is below rows other transactions commit first.
        with cluster.connect(db, autocommit=False) as c:
            k = 0
            while not done.is_set():
                ids = [c.execute("SELECT ff_create_execution(%s, payload => %s, priority => 9)",
                                 (lane, Jsonb({"slow": k, "j": j}))).fetchone()[0] for j in range(3)]
                c.execute("SELECT ff_create_execution('lst-other')")
                time.sleep(0.02)
                c.commit()
                inserted["slow"] += ids
                k += 1

    run_parallel(3, lambda i: (pager, batch_inserter, slow_inserter)[i]())

    seen = [e["execution_id"] for page in pages for e in page]
    assert all(len(p) <= 50 for p in pages)
    assert all(e["lane_id"] == lane for page in pages for e in page)
    dupes = [eid for eid, n in Counter(seen).items() if n > 1]
    assert dupes == [], f"{len(dupes)} executions listed on two pages"
    missing = set(pre) - set(seen)
    assert not missing, f"{len(missing)} executions that existed before paging were skipped"
    new_seen = set(seen) - set(pre)
    assert new_seen <= set(inserted["batch"]) | set(inserted["slow"])
    assert inserted["batch"] and inserted["slow"], "nothing was inserted while paging"
    print(f"\n{len(pages)} pages; {len(new_seen)} of {len(inserted['batch']) + len(inserted['slow'])} "
          f"concurrent inserts seen")
    # Once the inserts stop, paging again lists every execution of the lane once.
    with cluster.connect(db) as c:
        again, after = [], None
        while True:
            page = [r[0]["execution_id"] for r in c.execute(
                "SELECT e FROM ff_list_executions(lane_id => %s, after_execution_id => %s, max_count => 50) e",
                (lane, after)).fetchall()]
            again += page
            if len(page) < 50:
                break
            after = page[-1]
        everything = set(pre) | set(inserted["batch"]) | set(inserted["slow"])
        assert len(again) == len(set(again)) == len(everything) and set(again) == everything


# ---------------------------------------------------------------------------
# 4. Pausing a lane with claimers running
# ---------------------------------------------------------------------------

def test_pause_and_resume_with_claimers_running(cluster, db):
    lane, other = "pz", "pz-other"
    total, during = 700, 19
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_executions(%s, %s::jsonb[])", (lane, [Jsonb({"i": i}) for i in range(total)]))
        channel = c.execute("SELECT ff_lane_channel(%s)", (lane,)).fetchone()[0]
    listener = Listener(cluster, db, channel)
    stop = threading.Event()
    claims = []  # (t0, t1, rows)

    def claimer(i):
        with cluster.connect(db) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                rows = c.execute(CLAIM_BATCH, ([lane], f"w{i}", "i", 60000, 3)).fetchall()
                claims.append((t0, time.monotonic(), rows))
                for eid, grant, *_ in rows:
                    c.execute(COMPLETE, (eid, grant))
                time.sleep(0.01)

    workers = Background(*[lambda i=i: claimer(i) for i in range(4)])
    try:
        with cluster.connect(db) as c:
            assert wait_for(lambda: sum(len(x[2]) for x in claims) >= 60, timeout=10)
            assert c.execute("SELECT ff_pause_lane(%s)", (lane,)).fetchone() == ("paused",)
            paused_at = time.monotonic()
            paused_ms = server_ms(c)
            assert c.execute("SELECT ff_pause_lane(%s)", (lane,)).fetchone() == ("already_paused",)
            # Creating still works; other lanes are still claimed.
            c.execute("SELECT ff_create_executions(%s, %s::jsonb[])",
                      (lane, [Jsonb({"late": i}) for i in range(during)]))
            others = c.execute("SELECT ff_create_executions(%s, %s::jsonb[])",
                               (other, [Jsonb({"o": i}) for i in range(5)])).fetchone()[0]
            got = c.execute(CLAIM_BATCH, ([lane, other], "main", "m", 60000, 10)).fetchall()
            assert sorted(r[0] for r in got) == sorted(others) and {r[2] for r in got} == {other}
            assert c.execute("SELECT count(*) FROM ff_claim_for_worker(%s, 'main', 'm')", (lane,)).fetchone() == (0,)
            time.sleep(1.0)
            listener.poll(0.05)  # drop what creating announced
            resume_ms = server_ms(c)  # well before the resume: a claim started by then ran paused
            time.sleep(0.2)
            resume_sent = time.monotonic()
            assert c.execute("SELECT ff_resume_lane(%s)", (lane,)).fetchone() == ("resumed",)
            resumed_at = time.monotonic()
            assert c.execute("SELECT ff_resume_lane(%s)", (lane,)).fetchone() == ("not_paused",)
            assert listener.poll(1.0) == [(channel, lane)], "resuming announces the lane"
            assert wait_for(lambda: any(t0 > resumed_at and rows for t0, _, rows in claims), timeout=5), \
                "no claim succeeded after resume"
            assert wait_for(lambda: sum(len(x[2]) for x in claims) == total + during, timeout=20)
            # Claims sent after the pause returned and answered before the
            # resume was sent: every one of them ran while the lane was paused.
            during_pause = [(t0, rows) for t0, t1, rows in claims if paused_at < t0 and t1 < resume_sent]
            assert len(during_pause) >= 20, "the claimers did not keep trying while the lane was paused"
            won = [(t0, rows) for t0, rows in during_pause if rows]
            detail = [f"claim sent {1000 * (t0 - paused_at):.1f} ms after the pause returned, leased at pause "
                      f"+ {int(r[1].split(':')[4]) - 60000 - paused_ms} ms (server clock)" for t0, rows in won
                      for r in rows[:1]]
            assert won == [], f"{sum(len(r) for _, r in won)} executions claimed from the paused lane: {detail}"
            started = c.execute("""SELECT count(*) FROM ff_attempt a JOIN ff_exec_core x USING (execution_id)
                                   WHERE x.lane_id = %s AND a.started_at_ms BETWEEN %s AND %s""",
                                (lane, paused_ms, resume_ms)).fetchone()[0]
            assert started == 0
    finally:
        stop.set()
        workers.join()
        listener.conn.close()
    claimed = [r[0] for x in claims for r in x[2]]
    assert len(claimed) == len(set(claimed)) == total + during
    with cluster.connect(db) as c:
        assert lane_metrics(c, lane)["completed"] == total + during


# ---------------------------------------------------------------------------
# 5. Dead letters, re-drive and metrics
# ---------------------------------------------------------------------------

# kind: (count, max_attempts)
KINDS = {
    "ok": (61, 1),          # completes
    "fail": (23, 1),        # fails for good: failed
    "crash": (17, 1),       # the worker vanishes: the lease expires, expired
    "crash_once": (11, 2),  # vanishes on attempt 1, completes attempt 2
    "flaky": (13, 3),       # retryable failure on attempts 1 and 2, completes attempt 3
    "tired": (7, 2),        # retryable failure on both attempts: failed
}
FAST_RETRY = Jsonb({"base_ms": 1, "max_ms": 5, "jitter": False})
CRASH_TTL_MS = 2500


def test_dead_letters_retry_and_metrics_with_concurrent_workers(cluster, db):
    lane, quiet = "rt", "rt-b"
    kind_of = {}
    with cluster.connect(db) as c:
        for kind, (n, attempts) in KINDS.items():
            ids = c.execute("SELECT ff_create_executions(%s, %s::jsonb[], max_attempts => %s, retry_policy => %s)",
                            (lane, [Jsonb({"kind": kind, "i": i}) for i in range(n)], attempts, FAST_RETRY)
                            ).fetchone()[0]
            kind_of.update({eid: kind for eid in ids})
        c.execute("SELECT ff_create_executions(%s, %s::jsonb[])", (quiet, [Jsonb({"kind": "ok"})] * 29))
    created = len(kind_of)
    assert created == 132

    lock = threading.Lock()
    log = []  # (eid, kind, attempt, action, answer)
    phase = {"redrive": False}

    def act(c, eid, grant, payload, attempt):
        kind = payload["kind"]
        if phase["redrive"]:
            if kind == "tired":
                return "fail", c.execute("SELECT ff_fail_execution(%s, %s, %s)",
                                         (eid, grant, f"tired again {attempt}")).fetchone()[0]
            c.execute(COMPLETE, (eid, grant))
            return "complete", None
        if kind == "fail":
            return "fail", c.execute("SELECT ff_fail_execution(%s, %s, %s, false)",
                                     (eid, grant, f"boom {payload['i']}")).fetchone()[0]
        if kind == "crash" or (kind == "crash_once" and attempt == 1):
            return "vanish", None
        if kind == "flaky" and attempt < 3 or kind == "tired":
            return "fail", c.execute("SELECT ff_fail_execution(%s, %s, %s)",
                                     (eid, grant, f"{kind} attempt {attempt}")).fetchone()[0]
        c.execute(COMPLETE, (eid, grant))
        return "complete", None

    def run_workers(until, reconcile, seconds=20):
        stop = threading.Event()

        def worker(i):
            with cluster.connect(db) as c:
                while not stop.is_set():
                    rows = c.execute(CLAIM_BATCH, ([lane, quiet], f"w{i}", "i", CRASH_TTL_MS, 5)).fetchall()
                    for eid, grant, row_lane, payload, attempt in rows:
                        action, answer = act(c, eid, grant, payload, attempt)
                        with lock:
                            log.append((eid, payload["kind"], attempt, action, answer, row_lane))
                    if not rows:
                        time.sleep(0.01)

        def reconciler(i):
            with cluster.connect(db) as c:
                while not stop.is_set():
                    r = c.execute("SELECT ff_run_reconcilers()").fetchone()[0]
                    assert r["lease_expiry"]["errors"] == 0
                    time.sleep(0.05)

        targets = [lambda i=i: worker(i) for i in range(6)]
        if reconcile:
            targets += [lambda i=i: reconciler(i) for i in range(2)]
        threads = Background(*targets)
        try:
            with cluster.connect(db) as c:
                assert wait_for(lambda: until(c), timeout=seconds, interval=0.1), "the work did not settle"
        finally:
            stop.set()
            threads.join()

    def all_terminal(c):
        return all(e["public_state"] in ("completed", "failed", "expired")
                   for ln in (lane, quiet) for e in listing(c, ln))

    run_workers(all_terminal, reconcile=True)
    with cluster.connect(db) as c:
        dead = {r[0]: r for r in c.execute(
            "SELECT execution_id, terminal_outcome, last_error, attempts, max_attempts, payload, lane_id "
            "FROM ff_dead_letters WHERE lane_id = %s", (lane,)).fetchall()}
        want = {eid for eid, k in kind_of.items() if k in ("fail", "crash", "tired")}
        assert set(dead) == want, (len(dead), len(want))
        for eid, (_, outcome, error, attempts, max_attempts, payload, _) in dead.items():
            kind = kind_of[eid]
            expected = {"fail": ("failed", f"boom {payload['i']}", 1, 1),
                        "crash": ("expired", "lease expired", 1, 1),
                        "tired": ("failed", "tired attempt 2", 2, 2)}[kind]
            assert (outcome, error, attempts, max_attempts) == expected, (kind, outcome, error, attempts)
        assert c.execute("SELECT count(*) FROM ff_dead_letters WHERE lane_id = %s", (quiet,)).fetchone() == (0,)
        attempts_seen = defaultdict(list)
        for eid, kind, attempt, action, answer, _ in log:
            if kind_of.get(eid):
                attempts_seen[eid].append(attempt)
        expected_attempts = {"ok": [1], "fail": [1], "crash": [1], "crash_once": [1, 2], "flaky": [1, 2, 3],
                             "tired": [1, 2]}
        for eid, kind in kind_of.items():
            assert sorted(attempts_seen[eid]) == expected_attempts[kind], (kind, attempts_seen[eid])
        answers = Counter((kind, a, ans) for _, kind, a, act_, ans, ln in log if ln == lane and act_ == "fail")
        assert answers == {("fail", 1, "failed"): 23, ("flaky", 1, "retry_scheduled"): 13,
                           ("flaky", 2, "retry_scheduled"): 13, ("tired", 1, "retry_scheduled"): 7,
                           ("tired", 2, "failed"): 7}, answers
        claims = sum(1 for x in log if x[5] == lane)
        assert claims == 61 + 23 + 17 + 22 + 39 + 14
        assert lane_metrics(c, lane) == {"created": created, "claimed": claims, "completed": 61 + 11 + 13,
                                         "failed": 23 + 7, "expired": 17, "retried": 11 + 26 + 7}
        assert lane_metrics(c, quiet) == {"created": 29, "claimed": 29, "completed": 29, "failed": 0,
                                          "expired": 0, "retried": 0}
        assert reconciler_metric(c, "lease_expiry", "expired") == 17
        assert reconciler_metric(c, "lease_expiry", "reclaimed") == 11

        # Re-drive: each dead letter retried from two connections at once,
        # exactly one of them requeues it. 'tired' gets one more attempt only.
        done_one = next(eid for eid, k in kind_of.items() if k == "ok")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            c.execute("SELECT ff_retry_execution(%s)", (done_one,))
    answers = defaultdict(list)
    targets = sorted(want)

    def redriver(i):
        with cluster.connect(db) as c:
            for eid in targets[i // 2::4]:
                reset = kind_of[eid] != "tired"
                got = c.execute("SELECT ff_retry_execution(%s, reset_attempts => %s)", (eid, reset)).fetchone()[0]
                with lock:
                    answers[eid].append(got)

    run_parallel(8, redriver)
    assert {eid: sorted(a) for eid, a in answers.items()} == {eid: ["already_live", "requeued"] for eid in want}
    with cluster.connect(db) as c:
        assert c.execute("SELECT count(*) FROM ff_dead_letters WHERE lane_id = %s", (lane,)).fetchone() == (0,)
        assert Counter(e["public_state"] for e in listing(c, lane)) == {"completed": 85, "waiting": 47}
    phase["redrive"] = True
    log.clear()

    def settled_again(c):
        return c.execute("SELECT count(*) FROM ff_dead_letters WHERE lane_id = %s", (lane,)).fetchone()[0] == 7 and \
            len(listing(c, lane, "completed")) == 85 + 40

    run_workers(settled_again, reconcile=False)
    assert sorted((kind_of[x[0]], x[2], x[4]) for x in log if kind_of[x[0]] == "tired") == \
        [("tired", 3, "failed")] * 7, "a retry without reset_attempts gets exactly one more attempt"
    assert Counter((kind_of[x[0]], x[2]) for x in log if kind_of[x[0]] != "tired") == \
        {("fail", 2): 23, ("crash", 2): 17}
    with cluster.connect(db) as c:
        tired = [eid for eid, k in kind_of.items() if k == "tired"]
        dead = dict(c.execute("SELECT execution_id, last_error FROM ff_dead_letters WHERE lane_id = %s",
                              (lane,)).fetchall())
        assert dead == {eid: "tired again 3" for eid in tired}
        for eid in tired:
            assert c.execute("SELECT ff_retry_execution(%s)", (eid,)).fetchone() == ("requeued",)
    phase["redrive"] = False
    log.clear()
    # With reset_attempts (the default) it has max_attempts (2) again: the
    # first failure is retried, the second ends it.
    run_workers(lambda c: c.execute("SELECT count(*) FROM ff_dead_letters WHERE lane_id = %s",
                                    (lane,)).fetchone()[0] == 7 and
                not listing(c, lane, "waiting") and not listing(c, lane, "delayed"), reconcile=False)
    assert sorted((x[2], x[4]) for x in log) == [(4, "retry_scheduled")] * 7 + [(5, "failed")] * 7
    with cluster.connect(db) as c:
        assert lane_metrics(c, lane) == {
            "created": created,
            "claimed": 176 + 47 + 14,
            "completed": 85 + 40,
            "failed": 30 + 7 + 7,
            "expired": 17,
            "retried": 44 + 47 + 7 + 7,
        }


# ---------------------------------------------------------------------------
# 6. Schedules: one execution per due time, several runners, restarts
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sched_cluster():
    c = Cluster("surface-sched", SCHED_PORT, conf={
        "shared_preload_libraries": "'flowfabric'",
        "flowfabric.database": "'sched_bg'",
        "flowfabric.reconciler_interval_ms": 100,
    }).init().start()
    for name in ("sched_bg", "sched_manual", "sched_bound"):
        c.create_db(name)
    yield c
    c.stop()


def schedule_view(conn, schedule_id):
    """The schedule's row and the due times of its executions (from their
    unique keys), read in one snapshot."""
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    try:
        row = conn.execute("SELECT lane_id, created_at_ms, runs, missed, last_due_at_ms, next_due_at_ms "
                           "FROM ff_schedule WHERE schedule_id = %s", (schedule_id,)).fetchone()
        keys = [r[0] for r in conn.execute(
            "SELECT ff_get_execution(e ->> 'execution_id') ->> 'unique_key' "
            "FROM ff_list_executions(lane_id => %s, max_count => 10000) e", (row[0],)).fetchall()]
        created = lane_metrics(conn, row[0])["created"]
    finally:
        conn.execute("COMMIT")
    prefix = f"schedule:{schedule_id}:"
    assert all(k and k.startswith(prefix) for k in keys), keys
    lane, created_at, runs, missed, last_due, next_due = row
    return {"lane": lane, "created_at": created_at, "runs": runs, "missed": missed, "last_due": last_due,
            "next_due": next_due, "dues": [int(k[len(prefix):]) for k in keys], "created": created}


def first_due(created_at_ms, period_ms):
    """The first due time strictly after the second the schedule was created in."""
    second = created_at_ms // 1000 * 1000
    return (second // period_ms + 1) * period_ms


def check_every_due_time_once(v, period_ms, since_ms=None):
    dues = sorted(v["dues"])
    doubled = [d for d, n in Counter(dues).items() if n > 1]
    assert doubled == [], f"due times with more than one execution: {doubled}"
    start = since_ms if since_ms is not None else first_due(v["created_at"], period_ms)
    expected = list(range(start, v["last_due"] + 1, period_ms))
    assert dues == expected, f"due times {dues}, expected {expected}"
    assert v["runs"] == len(dues) == v["created"], (v["runs"], len(dues), v["created"])
    assert v["missed"] == 0
    assert v["next_due"] == v["last_due"] + period_ms


def run_schedule_passes(cluster, db, lane, seconds):
    """Two connections call ff_run_reconcilers() in a loop for `seconds`
    while a third claims and completes the schedule's executions (so a
    unique key never hides a second execution for one due time). Returns
    the schedules part of every manual pass."""
    passes = []
    deadline = time.time() + seconds

    def runner(i):
        with cluster.connect(db) as c:
            if i == 2:
                while time.time() < deadline:
                    rows = c.execute(CLAIM_BATCH, ([lane], "consumer", "c", 60000, 50)).fetchall()
                    for eid, grant, *_ in rows:
                        c.execute(COMPLETE, (eid, grant))
                    time.sleep(0.05)
                return
            while time.time() < deadline:
                passes.append(c.execute("SELECT ff_run_reconcilers()").fetchone()[0]["schedules"])
                time.sleep(0.003)

    run_parallel(3, runner)
    assert all(p["errors"] == 0 for p in passes), [p for p in passes if p["errors"]]
    return passes


def test_schedule_two_concurrent_runners_one_execution_per_due_time(sched_cluster):
    with sched_cluster.connect("sched_manual") as c:
        assert c.execute("SELECT ff_create_schedule('every-2s', '*/2 * * * * *', 'cron-a', payload => %s)",
                         (Jsonb({"report": "x"}),)).fetchone() == ("created",)
    passes = run_schedule_passes(sched_cluster, "sched_manual", "cron-a", 7.0)
    with sched_cluster.connect("sched_manual") as c:
        stopped = server_ms(c)
        v = schedule_view(c, "every-2s")
    check_every_due_time_once(v, 2000)
    assert len(v["dues"]) >= 3, v
    assert v["last_due"] > stopped - 2000 - 1000, "the runners stopped catching up before the end"
    assert sum(p["created"] for p in passes) == len(v["dues"]), "the two runners created more than the due times"
    print(f"\n{len(passes)} passes, {len(v['dues'])} due times")
    with sched_cluster.connect("sched_manual") as c:
        assert c.execute("SELECT ff_drop_schedule('every-2s')").fetchone() == ("dropped",)
        assert c.execute("SELECT ff_drop_schedule('every-2s')").fetchone() == ("not_found",)
        before = len(listing(c, "cron-a"))
        time.sleep(2.1)
        assert c.execute("SELECT ff_run_reconcilers()").fetchone()[0]["schedules"]["schedules"] == 0
        assert len(listing(c, "cron-a")) == before, "a dropped schedule still runs"


def test_schedule_with_the_background_worker_and_two_runners(sched_cluster):
    with sched_cluster.connect("sched_bg") as c:
        assert wait_for(lambda: c.execute("SELECT count(*) FROM pg_stat_activity "
                                          "WHERE backend_type = 'flowfabric reconciler'").fetchone()[0] == 1)
        before = c.execute("SELECT coalesce(max(passes), 0) FROM ff_reconciler_status WHERE runner = 'bgworker'"
                           ).fetchone()[0]
        created_before = reconciler_metric(c, "schedules", "created")
        assert c.execute("SELECT ff_create_schedule('bg-2s', '*/2 * * * * *', 'cron-bg')").fetchone() == ("created",)
    passes = run_schedule_passes(sched_cluster, "sched_bg", "cron-bg", 7.0)
    with sched_cluster.connect("sched_bg") as c:
        stopped = server_ms(c)
        v = schedule_view(c, "bg-2s")
        total_created = reconciler_metric(c, "schedules", "created") - created_before
        after = c.execute("SELECT passes FROM ff_reconciler_status WHERE runner = 'bgworker'").fetchone()[0]
    check_every_due_time_once(v, 2000)
    assert len(v["dues"]) >= 3 and v["last_due"] > stopped - 3000, v
    assert after - before >= 10, "the background worker was not running passes meanwhile"
    assert total_created == len(v["dues"]), "all runners together created more than the due times"
    print(f"\nmanual runners created {sum(p['created'] for p in passes)} of {len(v['dues'])}; "
          f"worker passes {after - before}")
    with sched_cluster.connect("sched_bg") as c:
        assert c.execute("SELECT ff_drop_schedule('bg-2s')").fetchone() == ("dropped",)


def test_schedule_catches_up_after_a_restart_within_the_bound(sched_cluster):
    cl = sched_cluster
    with cl.connect("sched_manual") as c:
        c.execute("SELECT ff_create_schedule('restart-2s', '*/2 * * * * *', 'rs-a')")
    with cl.connect("sched_bound") as c:
        c.execute("SELECT ff_create_schedule('restart-1s', '* * * * * *', 'rs-b')")
    with cl.connect("sched_bg") as c:
        c.execute("SELECT ff_create_schedule('restart-bg', '* * * * * *', 'rs-c')")
        # The bound for everyone from the next start (the worker included).
        c.execute("ALTER SYSTEM SET flowfabric.schedule_catchup = 2")
        c.execute("SELECT pg_reload_conf()")
    time.sleep(2.2)
    with cl.connect("sched_manual") as c:
        c.execute("SET flowfabric.schedule_catchup = 100")
        c.execute("SELECT ff_run_reconcilers()")
        a_before = schedule_view(c, "restart-2s")
    with cl.connect("sched_bound") as c:
        c.execute("SELECT ff_run_reconcilers()")
        b_before = schedule_view(c, "restart-1s")
        stop_ms = server_ms(c)
    try:
        cl.stop()
        time.sleep(5.0)
    finally:
        cl.start()
    with cl.connect("sched_bound") as c:
        start_ms = server_ms(c)
        # The background worker may pass before this test connects: its
        # bound is from the server's own start.
        boot_ms = c.execute("SELECT (extract(epoch FROM pg_postmaster_start_time()) * 1000)::bigint").fetchone()[0]
        assert c.execute("SHOW flowfabric.schedule_catchup").fetchone() == ("2",)
        counts = c.execute("SELECT ff_run_reconcilers()").fetchone()[0]["schedules"]
        pass_ms = server_ms(c)
        b = schedule_view(c, "restart-1s")
    with cl.connect("sched_manual") as c:
        c.execute("SET flowfabric.schedule_catchup = 100")
        a_counts = c.execute("SELECT ff_run_reconcilers()").fetchone()[0]["schedules"]
        a = schedule_view(c, "restart-2s")
    down = start_ms - stop_ms
    assert down >= 5000, down

    # Unbounded enough: every due time missed while down runs, once.
    check_every_due_time_once(a, 2000)
    assert a_counts["created"] == (a["last_due"] - a_before["last_due"]) // 2000 >= 2, (a_counts, a, a_before)
    assert len([d for d in a["dues"] if stop_ms < d < start_ms]) >= 2

    # Bounded at 2: the latest two due times run, the older ones count as missed.
    behind = (b["last_due"] - b_before["last_due"]) // 1000
    assert behind >= 5, behind
    assert start_ms - 1000 < b["last_due"] <= pass_ms, (start_ms, b["last_due"], pass_ms)
    assert counts == {"schedules": 1, "created": 2, "missed": behind - 2, "errors": 0}, (counts, behind)
    assert b["missed"] - b_before["missed"] == behind - 2
    assert b["runs"] - b_before["runs"] == 2 and b["runs"] == len(b["dues"]) == b["created"]
    assert sorted(b["dues"]) == sorted(b_before["dues"]) + [b["last_due"] - 1000, b["last_due"]]

    # The background worker caught up by itself under the same bound: one
    # gap of `missed` seconds covering the downtime, every other second once.
    # (No bound on how soon it starts again: that is the next test's.)
    with cl.connect("sched_bg") as c:
        try:
            assert wait_for(lambda: (schedule_view(c, "restart-bg")["last_due"] or 0) >= start_ms, timeout=12)
            v = schedule_view(c, "restart-bg")
        finally:
            c.execute("ALTER SYSTEM RESET flowfabric.schedule_catchup")
            c.execute("SELECT pg_reload_conf()")
    print(f"\nrestart-bg: {v}, stopped {stop_ms}, started {start_ms}")
    dues = sorted(v["dues"])
    assert len(dues) == len(set(dues)) == v["runs"] == v["created"], v
    gaps = [(x, y) for x, y in zip(dues, dues[1:]) if y - x != 1000]
    assert len(gaps) == 1, (gaps, v, stop_ms, start_ms)
    (x, y), = gaps
    assert v["missed"] == (y - x) // 1000 - 1 >= 3, (v["missed"], gaps)
    assert x + 1000 >= stop_ms - 1000 and y >= boot_ms - 2000, (stop_ms, boot_ms, gaps)
    assert dues[0] == first_due(v["created_at"], 1000) and dues[-1] == v["last_due"]


# ---------------------------------------------------------------------------
# 7. The background worker waits for a database that does not exist yet
# ---------------------------------------------------------------------------

def test_background_worker_waits_quietly_for_a_database_created_later():
    cl = Cluster("surface-later", LATER_PORT, conf={
        "shared_preload_libraries": "'flowfabric'",
        "flowfabric.database": "'later_db'",
        "flowfabric.reconciler_interval_ms": 200,
    }).init().start()
    try:
        with cl.connect() as c:
            assert wait_for(lambda: c.execute("SELECT count(*) FROM pg_stat_activity "
                                              "WHERE backend_type = 'flowfabric launcher'").fetchone()[0] == 1,
                            timeout=15)
            time.sleep(1.5)  # 7 intervals without the database
            waiting_log = cl.log()
            c.execute("CREATE DATABASE later_db")
            created = time.time()

            def reconciler_pid():
                row = c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'flowfabric reconciler' "
                                "AND datname = 'later_db'").fetchone()
                return row and row[0]

            pid = wait_for(reconciler_pid, timeout=5, interval=0.02)
            assert pid, cl.log()[-3000:]
            picked_up = time.time() - created
        with cl.connect("later_db") as c:
            c.execute("CREATE EXTENSION flowfabric")
            downstreams, leased = make_stale_work(c, events=1, leases=3)
            made = time.time()
            assert wait_for(lambda: settled(c, downstreams, leased), timeout=10, interval=0.02), cl.log()[-3000:]
            took = time.time() - made
            status = c.execute("SELECT runner, pid, passes, last_counts, last_error "
                               "FROM ff_reconciler_status").fetchall()
            assert len(status) == 1, status
            runner, spid, passes, counts, error = status[0]
            assert (runner, spid, error) == ("bgworker", pid, None) and passes >= 1, status
            assert "lease_expiry" in counts and "schedules" in counts
            total = c.execute("SELECT coalesce(sum(value), 0) FROM ff_metrics WHERE scope = 'reconciler' "
                              "AND name = 'lease_expiry' AND metric = 'reclaimed'").fetchone()[0]
            assert total == 3, total
        print(f"\nworker started {picked_up:.2f} s after CREATE DATABASE; stale lease requeued in {took:.2f} s")
        assert picked_up < 1.0, f"picked the database up after {picked_up:.2f} s (interval 0.2 s)"
        assert took < 2.0, f"stale work settled after {took:.2f} s (interval 0.2 s)"
        assert waiting_log.count("later_db") <= 1, "the wait is not quiet:\n" + waiting_log
        bad = [line for line in cl.log().splitlines() if "FATAL" in line or "ERROR:" in line]
        assert bad == [], "\n".join(bad)
    finally:
        cl.stop()

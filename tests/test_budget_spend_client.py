"""Budgets that bound real spend, as users meet them: concurrent workers that
claim, report random spend and complete against one budget, in the three
ways a budget can treat its hard limit (record, reservations, advisory);
reservations exact under concurrency; budget events on LISTEN; unknown
budgets and modes refused.

Randomness is seeded: set FF_SPEND_SEED to replay a run (every test prints
the seed it used)."""
import json
import os
import random
import threading
import time
from collections import Counter, defaultdict

import psycopg
import pytest
from psycopg.types.json import Jsonb

from ffhelp import invariant_violations, run_parallel
from test_background_client import Listener

SEED = int(os.environ.get("FF_SPEND_SEED") or random.SystemRandom().randrange(1 << 31))

CLAIM = "SELECT execution_id, grant_key FROM ff_claim_for_worker(%s, %s, %s, grant_ttl_ms => %s)"
SPEND = "SELECT outcome, dimension, current_usage, limit_value FROM ff_record_spend(%s, %s, %s, %s)"
STATUS = "SELECT ff_get_budget_status(%s)"
EVENT_KEYS = {"budget_id", "event", "dimension", "usage", "limit"}


def seed_for(name):
    """A per-test seed derived from SEED, printed so a failure can be replayed."""
    s = (SEED * 1_000_003 + sum(ord(ch) * 31 ** i for i, ch in enumerate(name))) % (1 << 62)
    print(f"\n[{name}] FF_SPEND_SEED={SEED} (derived {s})")
    return s


def status(conn, budget):
    return conn.execute(STATUS, (budget,)).fetchone()[0]


def ledger(conn, budget):
    """execution uuid (text) -> (delta_total, reserved) of the per-execution ledger."""
    rows = conn.execute("SELECT execution_id::text, sum(delta_total)::bigint, sum(reserved)::bigint "
                        "FROM ff_budget_usage_by_exec WHERE budget_id = %s GROUP BY 1", (budget,)).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def uuid_of(eid):
    return eid.split("}:", 1)[1]


def lane_states(conn, lane):
    return Counter(dict(conn.execute(
        "SELECT public_state, count(*) FROM ff_exec_core WHERE lane_id = %s GROUP BY 1", (lane,)).fetchall()))


# ---------------------------------------------------------------------------
# 1. Eight workers, 200 executions, random reports on a 15,000-token budget
# ---------------------------------------------------------------------------

LIMIT = 15_000
SOFT = 12_000          # every report past it answers with the usage it left
WORKERS = 8
EXECUTIONS = 200
MIN_REPORT, MAX_REPORT = 50, 400
RESERVE = 400
LANE = "spend-jobs"

SETUPS = {
    # name: (workers, enforcement_mode, on_hard_limit, budget_reserve)
    "record": (WORKERS, "strict", "record", None),
    "reserve": (WORKERS, "strict", "reject", {"tokens": RESERVE}),
    "advisory": (WORKERS, "advisory", "reject", None),
    # One worker: "one report past the limit" with nobody else running.
    "record-1-worker": (1, "strict", "record", None),
}


def report_size(rng, most):
    """50..`most` tokens, a multiple of 7: usage is then never exactly 15,000 or
    12,000, so reaching the hard limit always means passing it."""
    return 7 * rng.randint(-(-MIN_REPORT // 7), most // 7)


def plan_reports(rng, reserve):
    """The reports each execution will make: 1 to 3 of 50..400 tokens; with a
    reservation, at most the reserve in total (so nothing can be refused)."""
    k = rng.randint(1, 3)
    most = RESERVE // k if reserve else MAX_REPORT
    return [report_size(rng, most) for _ in range(k)]


class SpendRun:
    """What the workers saw, shared between their threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held = 0                 # executions leased by a worker right now
        self.finished = 0             # executions a worker ended
        self.claims = []              # (worker, eid, usage had reached the limit before the claim was sent)
        self.reports = []             # (eid, n, outcome, current_usage, limit_value)
        self.booked = defaultdict(int)
        self.ended = {}               # eid -> completed / failed
        self.problems = []
        self.empty_after_reached = 0
        self.reached = threading.Event()  # set once a report showed usage at or past the hard limit
        self.first_reached_by = None

    def problem(self, text):
        with self.lock:
            self.problems.append(text)


def spend_worker(cluster, db, run, plans, mode, w, deadline, seed):
    """The worker loop users write: claim (autocommit), report the spend of
    each call with an idempotency key (retrying some, as after a lost reply),
    then complete; a hard breach in a strict budget ends the execution for
    good ('budget exhausted'), an advisory budget is only told."""
    rng = random.Random(seed * 100 + w)
    _, enforcement, on_hard, _ = SETUPS[mode]
    refuses = enforcement == "strict" and on_hard == "reject"  # the crossing report is refused
    strict = enforcement == "strict"
    quiet = 0
    with cluster.connect(db) as c:
        while time.time() < deadline:
            with run.lock:
                held0, fin0 = run.held, run.finished
            reached0 = run.reached.is_set()
            row = c.execute(CLAIM, (LANE, f"w{w}", f"w{w}-1", 30000)).fetchone()
            if row is None:
                with run.lock:
                    if reached0:
                        run.empty_after_reached += 1
                    still = held0 == 0 and run.held == 0 and run.finished == fin0
                # Nothing leased anywhere and nothing ended meanwhile, three
                # times running: admission has nothing more to give.
                quiet = quiet + 1 if still else 0
                if quiet >= 3:
                    return
                time.sleep(0.003)
                continue
            quiet = 0
            eid, grant = row
            with run.lock:
                run.held += 1
                run.claims.append((w, eid, reached0))
            try:
                ending = "completed"
                for j, n in enumerate(plans[eid]):
                    key = f"{eid}/call-{j}"
                    out, dim, cur, lim = c.execute(SPEND, ("tenant", eid, Jsonb({"tokens": n}), key)).fetchone()
                    if rng.random() < 0.15:  # the reply was lost: the worker sends it again
                        again = c.execute(SPEND, ("tenant", eid, Jsonb({"tokens": n}), key)).fetchone()
                        if again[0] != "already_applied":
                            run.problem(f"replay of {key} answered {again}, not already_applied")
                    booked = out in ("ok", "soft_breach") or (out == "hard_breach" and not refuses)
                    with run.lock:
                        run.reports.append((eid, n, out, cur, lim))
                        if booked:
                            run.booked[eid] += n
                    if out == "ok":
                        if (dim, cur, lim) != (None, None, None):
                            run.problem(f"ok with {dim, cur, lim}")
                    elif out == "soft_breach":
                        if dim != "tokens" or lim != SOFT or not SOFT < cur <= LIMIT:
                            run.problem(f"soft_breach {dim, cur, lim} after {n}")
                    elif out == "hard_breach":
                        if dim != "tokens" or lim != LIMIT:
                            run.problem(f"hard_breach {dim, cur, lim}")
                        if refuses and not cur <= LIMIT < cur + n:
                            run.problem(f"refused report of {n} says usage before was {cur}")
                        if not refuses and not cur > LIMIT:
                            run.problem(f"booked hard_breach of {n} says new usage is {cur}")
                    else:
                        run.problem(f"unexpected outcome {out} for a first report {key}")
                    if (out == "soft_breach" and cur >= LIMIT) or (out == "hard_breach" and not refuses):
                        with run.lock:
                            if not run.reached.is_set():
                                run.first_reached_by = (eid, n, out, cur)
                            run.reached.set()
                    if out == "hard_breach" and strict:
                        c.execute("SELECT ff_fail_execution(%s, %s, 'budget exhausted', false)", (eid, grant))
                        ending = "failed"
                        break
                if ending == "completed":
                    c.execute("SELECT ff_complete_execution(%s, %s, %s)",
                              (eid, grant, Jsonb({"tokens": run.booked.get(eid, 0)})))
                with run.lock:
                    run.ended[eid] = ending
            finally:
                with run.lock:
                    run.held -= 1
                    run.finished += 1


@pytest.mark.parametrize("mode", list(SETUPS))
def test_eight_workers_spend_against_a_15000_token_budget(cluster, db, mode):
    seed = seed_for(f"workers-{mode}")
    rng = random.Random(seed)
    workers, enforcement, on_hard, reserve = SETUPS[mode]
    with cluster.connect(db) as c:
        assert c.execute("SELECT ff_create_budget('tenant', '{tokens}', %s, %s, enforcement_mode => %s, "
                         "on_hard_limit => %s)", ([LIMIT], [SOFT], enforcement, on_hard)).fetchone()[0] == "created"
        payloads = [Jsonb({"n": i}) for i in range(EXECUTIONS)]
        ids = c.execute("SELECT ff_create_executions(%s, %s, budget_ids => '{tenant}', budget_reserve => %s)",
                        (LANE, payloads, Jsonb(reserve) if reserve else None)).fetchone()[0]
    assert len(ids) == EXECUTIONS
    plans = {eid: plan_reports(rng, reserve) for eid in ids}
    demand = sum(sum(p) for p in plans.values())
    assert demand > 2 * LIMIT  # the budget runs out long before the work does

    run = SpendRun()
    started = time.time()
    deadline = started + 25
    run_parallel(workers, lambda w: spend_worker(cluster, db, run, plans, mode, w, deadline, seed))
    elapsed = time.time() - started
    assert time.time() < deadline, "the workers did not settle in time"
    assert not run.problems, run.problems[:10]

    outcomes = Counter(r[2] for r in run.reports)
    seen = sum(run.booked.values())
    with cluster.connect(db) as c:
        st = status(c, "tenant")
        led = ledger(c, "tenant")
        states = lane_states(c, LANE)
        health = c.execute("SELECT current_usage, reserved, status FROM ff_budget_health "
                           "WHERE budget_id = 'tenant' AND dimension = 'tokens'").fetchone()
        attempts = c.execute("SELECT count(*) FROM ff_attempt a JOIN ff_exec_core x USING (execution_id) "
                             "WHERE x.lane_id = %s", (LANE,)).fetchone()[0]
        # A last claim, after every worker stopped: it agrees with them.
        last_claim = c.execute(CLAIM, (LANE, "late", "late-1", 30000)).fetchone()
        violations = invariant_violations(c)
    usage = st["usage"]["tokens"]
    queued = states.get("waiting", 0)
    print(f"[{mode}] {elapsed:.1f}s claims={len(run.claims)} reports={dict(outcomes)} usage={usage} "
          f"ledger={sum(d for d, _ in led.values())} seen={seen} breaches={st['breach_count']} "
          f"soft={st['soft_breach_count']} queued_left={queued} states={dict(states)} "
          f"over_limit_by={usage - LIMIT} empty_claims_after_limit={run.empty_after_reached} "
          f"first_reached_by={run.first_reached_by}")

    # Every spend a worker saw booked is booked, once: usage = ledger = what clients saw,
    # per execution too.
    assert usage == sum(d for d, _ in led.values()) == seen
    assert {uuid_of(e): n for e, n in run.booked.items() if n} == {e: d for e, (d, _) in led.items() if d}
    assert st["breach_count"] == outcomes["hard_breach"]
    assert st["soft_breach_count"] == outcomes["soft_breach"]
    assert outcomes["already_applied"] == 0  # replays are not in run.reports; first reports never replay
    # No claim went unseen, none was given twice, and nothing holds a lease or a reservation now.
    assert attempts == len(run.claims) == len({e for _, e, _ in run.claims}) == len(run.ended)
    assert states.get("active", 0) == 0
    assert st["reserved"].get("tokens", 0) == 0 and health[1] == 0
    assert st["enforcement_mode"] == enforcement and st["on_hard_limit"] == on_hard
    assert violations == [], violations

    if on_hard == "record":
        assert run.reached.is_set() and usage >= LIMIT and outcomes["hard_breach"] > 0
        # Nothing is admitted once usage has reached the limit: every claim sent after a
        # worker saw it reached came back empty, while work was still queued.
        late = [e for _, e, after in run.claims if after]
        assert late == [], f"{len(late)} executions admitted after usage reached {LIMIT}: {late[:5]}"
        assert run.empty_after_reached > 0 and last_claim is None and queued > 0
        assert queued == EXECUTIONS - len(run.claims)
        # How far past the limit: the report that crossed started within it. Spend that happened
        # is booked (SPEC: 'record: the report applies in full'), so each execution already
        # running when the limit was crossed books the one report that tells its worker so, and
        # the worker stops. Usage ends at most one report per running worker past the limit;
        # with one worker that is one report (the 'record-1-worker' setup), with eight it can be
        # several hundred tokens more than 15,000 + 400.
        hard = [r for r in run.reports if r[2] == "hard_breach"]
        per_exec = Counter(r[0] for r in hard)
        assert max(per_exec.values()) == 1
        assert len(hard) <= workers
        assert min(cur - n for _, n, _, cur, _ in hard) <= LIMIT
        assert usage <= LIMIT + sum(n for _, n, _, _, _ in hard)
        assert usage < LIMIT + MAX_REPORT * workers
        assert all(run.ended[e] == "failed" for e in per_exec)
        assert health[2] == "at_or_over_hard_limit"
    elif mode == "reserve":
        # Reservations: each execution spends at most what it reserved, so no report is ever
        # refused and usage never passes the limit, after any report or at the end.
        assert outcomes["hard_breach"] == 0 and st["breach_count"] == 0
        assert all(cur <= LIMIT for _, _, out, cur, _ in run.reports if cur is not None)
        assert usage <= LIMIT
        # Admission stopped when the headroom could not hold one more reserve: with nothing
        # leased, usage + 400 > 15,000, and the rest stays queued.
        assert usage > LIMIT - RESERVE, usage
        assert last_claim is None and queued > 0 and queued == EXECUTIONS - len(run.claims)
        assert all(v == "completed" for v in run.ended.values())
        assert all(d <= RESERVE and r == 0 for d, r in led.values())
    else:
        # Advisory: nothing refused, every spend booked, breaches counted.
        assert states.get("completed", 0) == EXECUTIONS and len(run.claims) == EXECUTIONS
        assert all(v == "completed" for v in run.ended.values())
        assert seen == demand and usage == demand > LIMIT
        assert outcomes["hard_breach"] == sum(1 for r in run.reports if r[3] is not None and r[3] > LIMIT) > 0
        assert health[2] == "at_or_over_hard_limit"
        assert last_claim is None and queued == 0


# ---------------------------------------------------------------------------
# 2. Reservations are exact under concurrency
# ---------------------------------------------------------------------------

POOL_HARD = 10_000
POOL_PRIOR = 3_217
CLAIMERS = 16
POOL_LANE = "pool-jobs"

# Logs, at every admission, what the claim saw while it held the budget's
# usage row: the usage and the reservations in force, its own included.
ADMISSION_LOG = """
CREATE TABLE public.spend_admission (
    execution_id uuid, reserve bigint, usage bigint, reserved_total bigint, hard_limit bigint);
CREATE FUNCTION public.spend_log_admission() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO public.spend_admission
    SELECT NEW.execution_id, NEW.reserved, u.current_value,
           (SELECT coalesce(sum(l.reserved), 0) FROM flowfabric.ff_budget_usage_by_exec l
            WHERE l.budget_id = NEW.budget_id AND l.dimensions_key = NEW.dimensions_key AND l.reserved > 0),
           u.hard_limit
    FROM flowfabric.ff_budget_usage u
    WHERE u.budget_id = NEW.budget_id AND u.dimensions_key = NEW.dimensions_key;
    RETURN NULL;
END $$;
CREATE TRIGGER spend_log_admission AFTER INSERT ON flowfabric.ff_budget_usage_by_exec
    FOR EACH ROW WHEN (NEW.reserved > 0) EXECUTE FUNCTION public.spend_log_admission();
"""


@pytest.mark.parametrize("pattern", ["autocommit", "one_transaction"])
def test_reservations_are_exact_under_concurrency(cluster, db, pattern):
    """16 connections claim against one budget with random reserves; the sum
    of usage and reserves in force never passes the hard limit, as a monitor
    sees it and as every admission saw it."""
    seed = seed_for(f"reservations-{pattern}")
    rng = random.Random(seed)
    one_txn = pattern == "one_transaction"
    count = 200 if one_txn else 400
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('pool', '{tokens}', %s, '{0}')", ([POOL_HARD],))
        assert c.execute("SELECT outcome FROM ff_report_usage('pool', %s, 'earlier-spend')",
                         (Jsonb({"tokens": POOL_PRIOR}),)).fetchone()[0] == "ok"
        c.execute(ADMISSION_LOG)
        reserves = [rng.randint(100, 900) for _ in range(count)]
        ids = [r[0] for r in c.execute(
            "SELECT ff_create_execution(%s, priority => (t.r * 7919) %% 10, budget_ids => '{pool}', "
            "budget_reserve => jsonb_build_object('tokens', t.r)) "
            "FROM unnest(%s::int[]) WITH ORDINALITY AS t(r, i) ORDER BY t.i", (POOL_LANE, reserves)).fetchall()]
    reserve_of = dict(zip(ids, reserves))

    lock = threading.Lock()
    committed_spend = defaultdict(int)      # eid -> tokens spent in committed transactions
    claims, rolled_back, abandoned, empties = [], [], [], [0]
    ended = {}
    problems = []
    done = threading.Event()
    samples = []

    def monitor():
        with cluster.connect(db) as c:
            while not done.is_set():
                st = status(c, "pool")
                u, r = st["usage"]["tokens"], st["reserved"].get("tokens", 0)
                h = c.execute("SELECT current_usage, reserved, hard_limit FROM ff_budget_health "
                              "WHERE budget_id = 'pool'").fetchone()
                samples.append((u, r))
                samples.append((h[0], h[1]))
                if u + r > POOL_HARD or h[0] + h[1] > POOL_HARD:
                    problems.append(f"monitor saw usage {u} + reserved {r} / {h} over {POOL_HARD}")

    def reconciler():
        # Abandoned leases end by expiry, which must hand their reserve back too.
        with cluster.connect(db) as c:
            while not done.wait(0.15):
                c.execute("SELECT ff_run_reconcilers()")

    activity = {"held": 0, "finished": 0}

    def claimer(i):
        wrng = random.Random(seed * 1000 + i)
        deadline = time.time() + 10
        quiet = 0
        with cluster.connect(db, autocommit=not one_txn) as c:
            while time.time() < deadline:
                with lock:
                    if len(ended) + len(abandoned) >= count:
                        return
                    held0, fin0 = activity["held"], activity["finished"]
                abandon = not one_txn and wrng.random() < 0.03
                row = c.execute(CLAIM, (POOL_LANE, f"c{i}", f"c{i}-1", 60 if abandon else 30000)).fetchone()
                if row is None:
                    if one_txn:
                        c.rollback()
                    with lock:
                        empties[0] += 1
                        still = held0 == 0 and activity["held"] == 0 and activity["finished"] == fin0
                    # Refused with nothing leased anywhere (abandoned leases aside): the
                    # headroom left cannot hold the reserve at the head of the queue.
                    quiet = quiet + 1 if still and not abandoned_live() else 0
                    if quiet >= 5:
                        return
                    time.sleep(0.002)
                    continue
                quiet = 0
                eid, grant = row
                r = reserve_of[eid]
                with lock:
                    claims.append(eid)
                    activity["held"] += 1
                try:
                    work(c, wrng, eid, grant, r, abandon)
                finally:
                    with lock:
                        activity["held"] -= 1
                        activity["finished"] += 1

    def abandoned_live():
        with lock:
            return any(time.time() < t + 0.5 for t in abandoned_at)

    abandoned_at = []

    def work(c, wrng, eid, grant, r, abandon):
        time.sleep(wrng.uniform(0, 0.004))  # the work, holding the lease
        if abandon:
            with lock:
                abandoned.append(eid)
                abandoned_at.append(time.time())
            return
        x = wrng.random()
        spend = r if x < 0.01 else wrng.randint(1, min(r, 20)) if x < 0.5 else 0
        parts = [spend] if spend < 2 or wrng.random() < 0.5 else [spend // 2, spend - spend // 2]
        spent = 0
        for j, n in enumerate(p for p in parts if p):
            out = c.execute(SPEND, ("pool", eid, Jsonb({"tokens": n}), f"{eid}/{j}")).fetchone()
            if out[0] != "ok":
                problems.append(f"spend of {n} within a reserve of {r} answered {out}")
            else:
                spent += n
        y = wrng.random()
        if y < 0.08:
            c.execute("SELECT ff_fail_execution(%s, %s, 'tool error', false)", (eid, grant))
            how = "failed"
        elif y < 0.11:
            c.execute("SELECT ff_cancel_execution(%s, 'user cancelled')", (eid,))
            how = "cancelled"
        else:
            c.execute("SELECT ff_complete_execution(%s, %s)", (eid, grant))
            how = "completed"
        if one_txn and wrng.random() < 0.05:
            c.rollback()     # the whole attempt is undone: claim, spend and ending
            with lock:
                rolled_back.append(eid)
            return
        if one_txn:
            c.commit()
        with lock:
            committed_spend[eid] += spent
            ended[eid] = how

    threads = [threading.Thread(target=monitor)] + ([] if one_txn else [threading.Thread(target=reconciler)])
    for t in threads:
        t.start()
    started = time.time()
    try:
        run_parallel(CLAIMERS, claimer)
    finally:
        done.set()
        for t in threads:
            t.join()
    elapsed = time.time() - started

    with cluster.connect(db) as c:
        if abandoned:
            time.sleep(0.1)
            c.execute("SELECT ff_run_reconcilers()")
        st = status(c, "pool")
        led = ledger(c, "pool")
        health = c.execute("SELECT current_usage, reserved FROM ff_budget_health WHERE budget_id = 'pool'").fetchone()
        log = c.execute("SELECT execution_id::text, reserve, usage, reserved_total, hard_limit "
                        "FROM public.spend_admission").fetchall()
        states = lane_states(c, POOL_LANE)
        violations = invariant_violations(c)
    usage = st["usage"]["tokens"]
    peak = max(u + rt for _, _, u, rt, _ in log) if log else 0
    print(f"[{pattern}] {elapsed:.1f}s claims={len(claims)} ended={Counter(ended.values())} "
          f"abandoned={len(abandoned)} rolled_back={len(rolled_back)} empty_claims={empties[0]} "
          f"monitor_samples={len(samples)} monitor_max={max((u + r for u, r in samples), default=0)} "
          f"admission_peak={peak} usage={usage} states={dict(states)}")

    assert not problems, problems[:10]
    assert len(samples) >= 20
    assert all(u + r <= POOL_HARD for u, r in samples)
    # Every committed admission obeyed usage + reserved (its own included) <= hard limit,
    # at the moment it held the budget's row.
    committed_claims = len(claims) - len(rolled_back)
    assert len(log) == committed_claims
    bad = [row for row in log if row[2] + row[3] > row[4] or row[3] < row[1]]
    assert bad == [], bad[:5]
    uuid_reserve = {uuid_of(e): r for e, r in reserve_of.items()}
    assert all(row[1] == uuid_reserve[row[0]] for row in log)
    # Final accounting: usage is the prior spend plus exactly what committed, each execution
    # spent at most its reserve, and every reservation was handed back.
    assert usage == POOL_PRIOR + sum(committed_spend.values()) == POOL_PRIOR + sum(d for d, _ in led.values())
    assert {uuid_of(e): n for e, n in committed_spend.items() if n} == {e: d for e, (d, _) in led.items() if d}
    assert all(d <= uuid_reserve[e] for e, (d, _) in led.items())
    assert all(r == 0 for _, r in led.values())
    assert st["reserved"].get("tokens", 0) == 0 and health[1] == 0
    assert usage <= POOL_HARD and st["breach_count"] == 0
    assert states.get("active", 0) == 0
    assert states.get("expired", 0) == len(abandoned)
    assert violations == [], violations
    if not one_txn:
        # The budget was really contended: admissions came close to the limit and
        # claimers were turned away while work was queued.
        assert peak > POOL_HARD - 900 and empties[0] > 0


# ---------------------------------------------------------------------------
# 3. Budget events
# ---------------------------------------------------------------------------

def budget_events(listener, wait=0.25):
    got = listener.poll(wait) + listener.poll(0.05)
    assert all(channel == "ff_budget_events" for channel, _ in got), got
    events = [json.loads(payload) for _, payload in got]
    for e in events:
        assert set(e) == EVENT_KEYS, e
    return events


def test_budget_events_arrive_once_at_commit(cluster, db):
    listener = Listener(cluster, db, "ff_budget_events")
    tokens = lambda n: Jsonb({"tokens": n})  # noqa: E731
    with cluster.connect(db, autocommit=False) as c:
        c.execute("SELECT ff_create_budget('rej', '{tokens}', '{100}', '{0}')")
        c.execute("SELECT ff_create_budget('rec', '{tokens}', '{100}', '{0}', on_hard_limit => 'record')")
        c.execute("SELECT ff_create_budget('adv', '{tokens}', '{100}', '{0}', enforcement_mode => 'advisory')")
        c.execute("SELECT ff_create_budget('sn', '{tokens}', '{1000}', '{50}', on_soft_limit => 'notify')")
        c.execute("SELECT ff_create_budget('sw', '{tokens}', '{1000}', '{50}', on_soft_limit => 'warn')")
        c.execute("SELECT ff_create_execution('ev', budget_ids => '{rec}')")
        c.commit()
        eid, grant = c.execute(CLAIM, ("ev", "w", "w-1", 30000)).fetchone()
        assert c.execute("SELECT outcome FROM ff_report_usage('rej', %s)", (tokens(90),)).fetchone()[0] == "ok"
        assert c.execute("SELECT outcome FROM ff_report_usage('adv', %s)", (tokens(90),)).fetchone()[0] == "ok"
        assert c.execute(SPEND, ("rec", eid, tokens(90), "first")).fetchone()[0] == "ok"
        c.commit()
        assert budget_events(listener) == [], "reports within the limits announce nothing"

        # Reject: the crossing report applies nothing; announced at commit, not before.
        row = c.execute("SELECT * FROM ff_report_usage('rej', %s, 'cross')", (tokens(20),)).fetchone()
        assert row == ("hard_breach", "tokens", 90, 100)
        assert budget_events(listener) == []
        c.commit()
        assert budget_events(listener) == [
            {"budget_id": "rej", "event": "hard_breach", "dimension": "tokens", "usage": 90, "limit": 100}]
        # Its replay is not a new breach.
        assert c.execute("SELECT outcome FROM ff_report_usage('rej', %s, 'cross')", (tokens(20),)).fetchone()[0] \
            == "hard_breach"
        c.commit()
        assert budget_events(listener) == []
        # Rolled back: neither announced nor counted.
        c.execute("SELECT * FROM ff_report_usage('rej', %s)", (tokens(30),))
        c.rollback()
        assert budget_events(listener) == []
        assert status(c, "rej")["breach_count"] == 1

        # Record: the crossing spend is booked and announced with the new usage.
        assert c.execute(SPEND, ("rec", eid, tokens(20), "second")).fetchone() == ("hard_breach", "tokens", 110, 100)
        c.rollback()
        assert budget_events(listener) == []
        assert c.execute(SPEND, ("rec", eid, tokens(20), "second")).fetchone() == ("hard_breach", "tokens", 110, 100)
        c.commit()
        assert budget_events(listener) == [
            {"budget_id": "rec", "event": "hard_breach", "dimension": "tokens", "usage": 110, "limit": 100}]
        assert status(c, "rec")["usage"]["tokens"] == 110

        # Advisory: applied, counted and announced all the same.
        assert c.execute("SELECT * FROM ff_report_usage('adv', %s)", (tokens(30),)).fetchone() \
            == ("hard_breach", "tokens", 120, 100)
        c.commit()
        assert budget_events(listener) == [
            {"budget_id": "adv", "event": "hard_breach", "dimension": "tokens", "usage": 120, "limit": 100}]

        # Soft breaches: announced under 'notify', outcome only under 'warn'.
        for b in ("sn", "sw"):
            assert c.execute("SELECT * FROM ff_report_usage(%s, %s)", (b, tokens(60))).fetchone() \
                == ("soft_breach", "tokens", 60, 50)
        c.rollback()
        assert budget_events(listener) == []
        for b in ("sn", "sw"):
            c.execute("SELECT * FROM ff_report_usage(%s, %s)", (b, tokens(60)))
        c.commit()
        assert budget_events(listener) == [
            {"budget_id": "sn", "event": "soft_breach", "dimension": "tokens", "usage": 60, "limit": 50}]
        assert status(c, "sn")["soft_breach_count"] == 1 and status(c, "sw")["soft_breach_count"] == 1

        # A manual reset.
        assert c.execute("SELECT ff_reset_budget('rej')").fetchone()[0] == 0
        c.rollback()
        assert budget_events(listener) == []
        assert status(c, "rej")["usage"]["tokens"] == 90
        assert c.execute("SELECT ff_reset_budget('rej')").fetchone()[0] == 0
        c.commit()
        assert budget_events(listener) == [
            {"budget_id": "rej", "event": "reset", "dimension": None, "usage": 0, "limit": None}]
        assert status(c, "rej")["usage"]["tokens"] == 0

        # The reset reconciler, once the interval is due (and not before).
        c.execute("SELECT ff_create_budget('cyc', '{tokens}', '{100}', '{0}', reset_interval_ms => 300)")
        c.execute("SELECT * FROM ff_report_usage('cyc', %s)", (tokens(70),))
        c.commit()
        due = int(status(c, "cyc")["next_reset_at"])
        c.commit()
        assert c.execute("SELECT ff_run_reconcilers() -> 'budget_reset' ->> 'processed'").fetchone()[0] == "0"
        c.commit()
        assert budget_events(listener) == [], "not due yet"
        while time.time() * 1000 < due + 20:
            time.sleep(0.05)
        assert c.execute("SELECT ff_run_reconcilers() -> 'budget_reset' ->> 'processed'").fetchone()[0] == "1"
        c.rollback()
        assert budget_events(listener) == []
        assert status(c, "cyc")["usage"]["tokens"] == 70
        c.commit()
        assert c.execute("SELECT ff_run_reconcilers() -> 'budget_reset' ->> 'processed'").fetchone()[0] == "1"
        c.commit()
        assert budget_events(listener) == [
            {"budget_id": "cyc", "event": "reset", "dimension": None, "usage": 0, "limit": None}]
        st = status(c, "cyc")
        assert st["usage"]["tokens"] == 0 and int(st["next_reset_at"]) > due
        c.commit()
        assert c.execute("SELECT ff_run_reconcilers() -> 'budget_reset' ->> 'processed'").fetchone()[0] == "0"
        c.commit()
        assert budget_events(listener) == [], "not due again yet"
    listener.conn.close()


# ---------------------------------------------------------------------------
# 4. Budgets and quotas that do not exist
# ---------------------------------------------------------------------------

SNAPSHOT_TABLES = ["ff_exec_core", "ff_attempt", "ff_lane", "ff_lane_counter", "ff_budget_policy", "ff_budget_usage",
                   "ff_budget_usage_dedup", "ff_budget_usage_by_exec", "ff_quota_policy", "ff_quota_admitted"]


def snapshot(conn):
    """A digest of every row of the tables a call could write (those this build has)."""
    tables = [t for t in SNAPSHOT_TABLES if conn.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0]]
    assert "ff_exec_core" in tables and "ff_budget_usage_dedup" in tables
    return {t: conn.execute(f"SELECT md5(coalesce(string_agg(x::text, ',' ORDER BY x::text), '')) FROM {t} x")
            .fetchone()[0] for t in tables}


def test_executions_naming_unknown_budgets_or_quotas_are_p0002_and_write_nothing(cluster, db):
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('tenant', '{tokens}', '{15000}', '{0}')")
        c.execute("SELECT ff_create_quota_policy('q', 60, 100, 10)")
        c.execute("SELECT ff_create_execution('known', budget_ids => '{tenant}', quota_policy_id => 'q')")
        before = snapshot(c)
        three = [Jsonb({"i": i}) for i in range(3)]
        calls = [
            ("SELECT ff_create_execution('fresh', budget_ids => '{nope}')", ()),
            ("SELECT ff_create_execution('known', budget_ids => '{tenant,nope}')", ()),
            ("SELECT ff_create_execution('fresh', budget_ids => '{nope}', budget_reserve => '{\"tokens\": 5}')", ()),
            ("SELECT ff_create_execution('fresh', quota_policy_id => 'nope')", ()),
            ("SELECT ff_create_execution('known', budget_ids => '{tenant}', quota_policy_id => 'nope')", ()),
            ("SELECT ff_create_executions('fresh', %s, budget_ids => '{nope}')", (three,)),
            ("SELECT ff_create_executions('known', %s, budget_ids => '{nope,tenant}')", (three,)),
            ("SELECT ff_create_executions('fresh', %s, quota_policy_id => 'nope')", (three,)),
            ("SELECT ff_create_executions('known', %s, budget_ids => '{tenant}', quota_policy_id => 'nope')", (three,)),
        ]
        for sql, args in calls:
            with pytest.raises(psycopg.errors.NoDataFound) as e:
                c.execute(sql, args)
            assert e.value.sqlstate == "P0002" and "nope" in str(e.value), sql
            assert snapshot(c) == before, sql
        # The same, inside a caller's transaction that goes on to roll back: the failed call
        # left nothing behind in it either.
        with pytest.raises(psycopg.errors.NoDataFound):
            with c.transaction():
                c.execute("SELECT ff_create_execution('known', budget_ids => '{tenant}')")
                c.execute("SELECT ff_create_executions('known', %s, budget_ids => '{nope}')", (three,))
        assert snapshot(c) == before


def test_reports_against_a_budget_that_does_not_exist_are_p0002_and_write_nothing(cluster, db):
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('tenant', '{tokens}', '{15000}', '{0}')")
        before = snapshot(c)
        for sql in ["SELECT * FROM ff_report_usage('nope', '{\"tokens\": 5}')",
                    "SELECT * FROM ff_report_usage('nope', '{\"tokens\": 5}', 'key-1')",
                    "SELECT * FROM ff_report_usage('nope', '{\"tokens\": 5, \"requests\": 1}', 'key-2')",
                    "SELECT * FROM ff_report_usage('nope', '{}')",
                    "SELECT * FROM ff_report_usage_admin('nope', '{tokens}', '{5}')",
                    "SELECT * FROM ff_report_usage_admin('nope', '{tokens}', '{5}', 'key-3')",
                    "SELECT ff_reset_budget('nope')",
                    "SELECT ff_get_budget_status('nope')"]:
            with pytest.raises(psycopg.errors.NoDataFound) as e:
                c.execute(sql)
            assert e.value.sqlstate == "P0002", sql
            assert snapshot(c) == before, sql
        assert c.execute("SELECT count(*) FROM ff_budget_usage WHERE budget_id = 'nope'").fetchone()[0] == 0


# ---------------------------------------------------------------------------
# 5. Modes in the status, unknown modes refused
# ---------------------------------------------------------------------------

def test_budget_status_shows_modes_and_reserved_and_unknown_modes_are_22023(cluster, db):
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('plain', '{tokens}', '{1000}', '{0}')")
        c.execute("SELECT ff_create_budget('old', '{tokens}', '{1000}', '{0}', on_hard_limit => 'fail')")
        c.execute("SELECT ff_create_budget('rec', '{tokens}', '{1000}', '{800}', on_hard_limit => 'record', "
                  "on_soft_limit => 'notify')")
        c.execute("SELECT ff_create_budget('adv', '{tokens}', '{1000}', '{0}', enforcement_mode => 'advisory', "
                  "on_hard_limit => 'record', on_soft_limit => 'warn')")
        expect = {"plain": ("strict", "reject", "warn"), "old": ("strict", "reject", "warn"),
                  "rec": ("strict", "record", "notify"), "adv": ("advisory", "record", "warn")}
        for b, (mode, hard, soft) in expect.items():
            st = status(c, b)
            assert (st["enforcement_mode"], st["on_hard_limit"], st["on_soft_limit"]) == (mode, hard, soft), st
            assert st["reserved"].get("tokens", 0) == 0 and st["usage"] == {"tokens": 0}
        # Reserved shows what leases hold, less what they spent, and drops back when they end.
        c.execute("SELECT ff_create_execution('st', budget_ids => '{plain}', budget_reserve => '{\"tokens\": 300}') "
                  "FROM generate_series(1, 2)")
        (e1, g1), (e2, g2) = [c.execute(CLAIM, ("st", "w", "w-1", 30000)).fetchone() for _ in range(2)]
        assert status(c, "plain")["reserved"] == {"tokens": 600}
        assert c.execute(SPEND, ("plain", e1, Jsonb({"tokens": 120}), "k")).fetchone()[0] == "ok"
        st = status(c, "plain")
        assert st["reserved"] == {"tokens": 480} and st["usage"] == {"tokens": 120}
        c.execute("SELECT ff_complete_execution(%s, %s)", (e1, g1))
        assert status(c, "plain")["reserved"] == {"tokens": 300}
        c.execute("SELECT ff_fail_execution(%s, %s, 'x', false)", (e2, g2))
        st = status(c, "plain")
        assert st["reserved"].get("tokens", 0) == 0 and st["usage"] == {"tokens": 120}

        before = snapshot(c)
        for arg, value in [("enforcement_mode", "lenient"), ("enforcement_mode", ""), ("enforcement_mode", "STRICT"),
                           ("on_hard_limit", "block"), ("on_hard_limit", "warn"), ("on_hard_limit", ""),
                           ("on_soft_limit", "page"), ("on_soft_limit", "record"), ("on_soft_limit", "")]:
            with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
                c.execute(f"SELECT ff_create_budget('bad', '{{tokens}}', '{{10}}', '{{0}}', {arg} => %s)", (value,))
            assert e.value.sqlstate == "22023" and arg in str(e.value), (arg, value)
            assert snapshot(c) == before
        with pytest.raises(psycopg.errors.NoDataFound):
            status(c, "bad")


# ---------------------------------------------------------------------------
# 6. Admission past a reserve that does not fit; spend naming an unknown budget
# ---------------------------------------------------------------------------

def test_a_reserve_that_does_not_fit_does_not_hold_back_one_that_does(cluster, db):
    """SPEC: a candidate refused by budget stays eligible 'and the pick moves on
    to the next candidate'; ff_claim_batch has 'same admission as
    ff_claim_for_worker'. With reservations a refusal is about the candidate's
    own reserve, not the budget as a whole: a small reserve behind a big one
    that does not fit is still admitted, by either call."""
    with cluster.connect(db, autocommit=False) as c:
        c.execute("SELECT ff_create_budget('hol', '{tokens}', '{1000}', '{0}')")
        ids = [c.execute("SELECT ff_create_execution('hol', priority => %s, budget_ids => '{hol}', "
                         "budget_reserve => %s)", (prio, Jsonb({"tokens": r}))).fetchone()[0]
               for prio, r in [(10, 900), (5, 900), (0, 50)]]
        c.commit()
        assert c.execute(CLAIM, ("hol", "w", "w-1", 30000)).fetchone()[0] == ids[0]
        c.commit()
        # 900 held: the second 900 does not fit (1,800 > 1,000), the 50 does (950 <= 1,000).
        batch = [r[0] for r in c.execute("SELECT execution_id FROM ff_claim_batch('{hol}', 'w', 'w-1', max_count => 5)")]
        c.rollback()
        single = c.execute(CLAIM, ("hol", "w", "w-1", 30000)).fetchone()
        c.rollback()
        assert batch == [ids[2]]
        assert single is not None and single[0] == ids[2], \
            f"ff_claim_for_worker admitted {single} where ff_claim_batch admitted {batch}"


def test_spend_against_a_budget_that_does_not_exist_is_p0002_and_writes_nothing(cluster, db):
    """SPEC 0.3: 'a report or spend against a budget that does not exist is
    P0002 (no row is created)' -- for a worker holding a real lease too."""
    with cluster.connect(db) as c:
        c.execute("SELECT ff_create_budget('tenant', '{tokens}', '{15000}', '{0}')")
        c.execute("SELECT ff_create_execution('sp', budget_ids => '{tenant}')")
        eid, grant = c.execute(CLAIM, ("sp", "w", "w-1", 30000)).fetchone()
        before = snapshot(c)
        gone = "{fp:1}:00000000-0000-4000-8000-000000000001"
        for target in (gone, eid):
            with pytest.raises(psycopg.errors.NoDataFound) as e:
                c.execute(SPEND, ("nope", target, Jsonb({"tokens": 5}), "key-1"))
            assert e.value.sqlstate == "P0002", (target, e.value)
            assert snapshot(c) == before
        # The lease is unharmed: the real budget still takes the spend.
        assert c.execute(SPEND, ("tenant", eid, Jsonb({"tokens": 5}), "key-1")).fetchone()[0] == "ok"

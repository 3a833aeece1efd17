#!/usr/bin/env python3
"""Writes bench/RESULTS.md from bench/out/results.json (made by bench.py).
Every number in RESULTS.md comes from that file. BENCH_RESULTS and
BENCH_REPORT override the two paths (to render an older results file).
One render_* function per part of the document, in document order."""
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("BENCH_RESULTS", os.path.join(HERE, "out", "results.json"))
DST = os.environ.get("BENCH_REPORT", os.path.join(HERE, "RESULTS.md"))

# Targets (issue 15 unless noted).
CLAIM_TARGET = 0.75           # claim alone vs the minimal claim
S1_TARGET = 0.5               # scenario 1 vs the minimal queue at 16 workers ...
S1_P99_TARGET = 3.0           # ... with p99 at most this multiple of the minimal queue's
S5_TARGET = 0.8               # scenario 5 vs scenario 1
ROUTE_TARGET = 1.5            # claim latency with 10/100/1000 requirement sets vs one
USAGE_TARGET = 0.5            # report vs counter, 64 budgets, 4 and 16 clients
USAGE_HOT_TARGET = 0.4        # the same on one hot budget
FLAT_TARGET = 1.5             # claim latency 10k -> 1M queued (issue 9)
CONTENDED = 0.3

# FlowFabric's published figures (issue 15 quotes them: its Postgres backend
# on a 16-core machine, and its Valkey backend).
FLOWFABRIC_S1_PG = 510
FLOWFABRIC_S1_VALKEY = 3036

# (words that must all appear in the normalized statement, label), first match wins.
LABELS = [
    (["ff_waitpoint_hmac", "SKIP LOCKED"], "pick + active signing key (LATERAL, FOR UPDATE SKIP LOCKED)"),
    (["ff_exec_core", "SKIP LOCKED", "ORDER BY priority"], "pick: best claimable row, FOR UPDATE SKIP LOCKED"),
    (["FROM ff_waitpoint_hmac WHERE active"], "keystore: active signing key"),
    (["WITH l AS (SELECT * FROM unnest(", "INSERT INTO ff_claim_grant"],
     "lease: UPDATE ff_exec_core + INSERT ff_attempt + INSERT ff_claim_grant (one statement)"),
    (["WITH old AS", "ended AS", "INSERT INTO ff_completion_event"],
     "finish: terminal UPDATE ff_exec_core + ff_attempt + quota + reservation + completion event (one statement)"),
    (["WITH u AS", "UPDATE ff_budget_usage"], "report: apply the increment within the limits (one statement)"),
    (["FROM pg_catalog.pg_extension"], "extension version check"),
    (["array_agg(cap_set_id"], "capability sets the worker satisfies (cache refresh)"),
    (["UPDATE ff_exec_core SET lifecycle_phase", "INSERT INTO ff_claim_grant"],
     "lease: UPDATE ff_exec_core + INSERT ff_attempt + INSERT ff_claim_grant (one statement)"),
    (["FOR KEY SHARE OF x"], "foreign-key check (RI trigger)"),
    (["FROM ff_exec_core x", "LEFT JOIN ff_waitpoint_hmac k", "ff_claim_grant g"],
     "fence: signing key + grant + execution row in one read (row locked)"),
    (["FROM ff_waitpoint_hmac WHERE kid"], "keystore: verification secret"),
    (["SELECT lifecycle_phase, current_grant_id"], "fence: read + lock execution FOR NO KEY UPDATE"),
    (["SELECT worker_id, worker_instance_id FROM ff_claim_grant"], "fence: read grant row"),
    (["DELETE FROM ff_claim_grant", "UPDATE ff_attempt"], "end attempt: delete grant, UPDATE ff_attempt"),
    (["UPDATE ff_exec_core SET lifecycle_phase", "terminal_outcome"], "make terminal: UPDATE ff_exec_core"),
    (["INSERT INTO ff_completion_event"], "INSERT completion event"),
    (["UPDATE ff_completion_event SET dispatched_at_ms"], "cascade: mark event dispatched"),
    (["INSERT INTO ff_lane_counter"], "metrics: per-backend lane counter upsert"),
    (["pg_notify"], "NOTIFY the lane"),
    (["FROM ff_partition_config"], "load partition config"),
    (["FROM ff_budget_policy WHERE budget_id = $1 FOR NO KEY UPDATE"], "lock policy row"),
    (["UPDATE ff_budget_usage u SET current_value", "NOT EXISTS"], "apply increments if within limits (fast path)"),
    (["INSERT INTO ff_budget_usage "], "ensure usage rows (INSERT .. ON CONFLICT DO NOTHING)"),
    (["SELECT dimensions_key, current_value FROM ff_budget_usage"], "lock usage rows FOR UPDATE"),
    (["UPDATE ff_budget_usage u SET current_value"], "apply increments"),
]

# What each side does per operation (from the code of each side).
DOES = {
    "ff_claim": "`ff_claim_for_worker`: a SECURITY DEFINER call with a pinned search_path; argument checks; the "
                "capability sets the worker satisfies (cached per backend); one pick statement (active signing key + "
                "best row of the lane and set, `FOR UPDATE SKIP LOCKED`, paused lanes skipped); budget and quota "
                "admission when the row names any; an HMAC-SHA256 grant signed in Rust; one lease statement (UPDATE "
                "the wide `ff_exec_core` row, INSERT `ff_attempt`, INSERT `ff_claim_grant`, and the per-backend lane "
                "counter when `flowfabric.metrics` is on).",
    "ff_complete": "`ff_complete_execution`: grant parse; one fence read (signing key + grant row + execution row, "
                   "locked); HMAC verify; one finish statement (UPDATE `ff_attempt`; terminal UPDATE of `ff_exec_core`, "
                   "its grant cleared; quota slot and reservation freed when the execution names them; the completion "
                   "event, written dispatched; lane counter); for flow members, then the cascade under the flow row.",
    "ff_create": "`ff_create_execution`: option checks; referenced budgets and quota must exist; capability-set id; "
                 "one INSERT into `ff_exec_core` (`ON CONFLICT DO NOTHING`, for `execution_id` / `unique_key`); lane "
                 "counter; `pg_notify` on the lane's channel when the row is claimable at once.",
    "base_claim": "minimal claim: `UPDATE q SET state = 'leased', worker = $2, lease_until = ... WHERE id = (SELECT id "
                  "... WHERE lane = $1 AND state = 'ready' ORDER BY priority DESC, created_at, id LIMIT 1 FOR UPDATE "
                  "SKIP LOCKED) RETURNING id, worker` on a narrow table with one partial index.",
    "base_complete": "minimal complete: `UPDATE q SET state = 'done' WHERE id = $1 AND worker = $2 AND state = "
                     "'leased'` (the row is kept, as flowfabric keeps finished executions).",
    "pgmq_send": "`pgmq.send(queue, msg)`: a SQL wrapper over a plpgsql function that builds `INSERT INTO pgmq.q_<queue> "
                 "(vt, message, headers) ... RETURNING msg_id` with `format()` and runs it with `EXECUTE` (planned on "
                 "every call); identity key, one index on `vt`.",
    "pgmq_read": "`pgmq.read(queue, vt => 30, qty => 1)`: plpgsql `EXECUTE` of one statement: the oldest visible "
                 "`msg_id`s (`vt <= clock_timestamp()`, `FOR UPDATE SKIP LOCKED`) updated to `vt = now + 30 s`, "
                 "`read_ct + 1`; returns the message. No lease token: the visibility timeout is the only fence.",
    "pgmq_delete": "`pgmq.delete(queue, msg_id)`: plpgsql `EXECUTE` of `DELETE ... WHERE msg_id = $1` (anyone holding "
                   "the id may delete it).",
}


def label(q):
    q = re.sub(r"\s+", " ", q)
    for needles, name in LABELS:
        if all(n in q for n in needles):
            return name
    return "`" + (q[:70] + "..." if len(q) > 70 else q).replace("|", "\\|") + "`"


def f(x, nd=0):
    if x is None:
        return "n/a"
    if isinstance(x, (int, float)):
        return f"{x:,.{nd}f}"
    return str(x)


def x_(r, nd=2):
    """A ratio as `0.52x`."""
    return "n/a" if r is None else f"{r:.{nd}f}x"


def flag(*runs):
    """Marks a row measured while other processes used the CPU, or invalid."""
    marks = []
    if any(r and r.get("valid") is False for r in runs):
        marks.append("INVALID")
    worst = max([(r.get("foreign_cores") or 0) for r in runs if r] or [0])
    if worst > CONTENDED:
        marks.append(f"contended ({worst:.2f} cores)")
    return ", ".join(marks) or "ok"


def other(*runs):
    vals = [r.get("foreign_cores") for r in runs if r]
    if not vals or any(v is None for v in vals):
        return "n/a"
    return f"{max(vals):.2f}"


def reps_text(sec):
    n = sec.get("reps", 1)
    if n > 1:
        return (f"{n} repetitions of {sec['seconds']} s per variant and client count, alternating "
                f"(VACUUM + CHECKPOINT before each); the table shows medians (all values in results.json).")
    return f"One run of {sec['seconds']} s per variant and client count."


def verdict(ok):
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def ratio(a, b):
    return a / b if a and b else None


def plan_cache_note(prof):
    """What the installed functions do about plan caching (no experiment:
    sql/finalize.sql forces generic plans on every SECURITY DEFINER function),
    with the planning counts pg_stat_statements saw."""
    conf = prof.get("proconfig") or {}
    claim_conf = " ".join(conf.get("ff_claim_for_worker") or []) or "n/a"
    st = [x for x in (prof.get("pgss_claim") or {}).get("statements", []) if x["calls"]]
    calls = max((x["calls"] for x in st if x["toplevel"] and "ff_claim_for_worker" in x["query"]), default=0)
    plans = sum(x["plans"] or 0 for x in st if not x["toplevel"])
    per = f"{plans / calls:.3f}" if calls else "n/a"
    return ("**Plan caching.** Every SECURITY DEFINER function of the extension runs with "
            "`plan_cache_mode = force_generic_plan` (set by `sql/finalize.sql`), so each statement inside is planned "
            "once per backend and reused, and with `enable_seqscan = off` (and `jit = off`), so a plan built while a table was nearly "
            "empty (a fresh install, a drained queue) stays a key lookup as the table grows; the claims also run "
            f"with `enable_sort = off` (their plan is the ordered index scan). Installed settings of `ff_claim_for_worker`: `{claim_conf}`. In the claim profile above, "
            f"statements inside the claim were planned {per} times per call (the first calls of the session plan "
            "them). No generic-versus-custom experiment is run: the engine has made that choice.\n")


def render_header(doc, R):
    """Title, provenance, quick-mode warning."""
    w = doc.w
    m = R.get("meta", {})
    quick = bool(R.get("quick"))
    mode = "quick (BENCH_QUICK=1)" if quick else "full"
    w("# flowfabric benchmark results\n")
    w(f"Generated by `bench/report.py` from `bench/out/results.json`, written by one run of `bench/run.sh` "
      f"({mode} mode) started {m.get('started', '?')}, {f(R.get('total_s', 0) / 60, 1)} minutes in all. "
      "Do not edit by hand: rerun the benchmark.\n")
    if quick:
        w("**Quick mode**: short runs, one repetition, smaller queues: the numbers are indicative only.\n")


def render_conditions(doc, R):
    """How busy the shared machine was during the run."""
    w = doc.w
    m = R.get("meta", {})
    cond = R.get("conditions") or {}
    w("## Conditions\n")
    la = cond.get("loadavg_start")
    w(f"{m.get('cpu')}, **{m.get('nproc')} cores**, {m.get('mem_gib')} GiB; the load generators (pgbench, the "
      "driver) run on the same cores as the server. The machine is shared: processes outside the benchmark used "
      f"**{f(cond.get('foreign_cores_whole_run'), 2)} cores on average over the whole run** (load average "
      f"{'/'.join(f(x, 2) for x in la) if la else 'n/a'} at the start); within the measured runs, the median "
      f"{f(cond.get('foreign_cores_median'), 2)} and the worst {f(cond.get('foreign_cores_max'), 2)} cores; "
      f"{cond.get('runs_contended', 'n/a')} of {cond.get('runs_judged', 'n/a')} runs long enough to judge were "
      f"still contended (> {CONTENDED} cores) after retries and are flagged below. "
      "Ratios (flowfabric / the other side, same server, same run) are what to read; absolute rates depend on "
      "this machine and its neighbours.\n")


def render_machine(doc, R):
    """Machine, server settings and how to reproduce."""
    w = doc.w
    m = R.get("meta", {})
    w("## Machine and settings\n")
    s = m.get("settings", {})
    w(f"- CPU: {m.get('cpu')} x {m.get('nproc')} (nproc), memory {m.get('mem_gib')} GiB, kernel {m.get('kernel')}")
    w(f"- Server: {m.get('pg_version')}, a private copy of the Debian build under `target/bench-pg`, "
      f"cluster in `/tmp/flowfabric-bench-{m.get('server_conf', {}).get('port', '?')}`, unix socket only "
      "(`listen_addresses = ''`), run as `postgres`; stopped at the end.")
    w(f"- Settings: shared_buffers {s.get('shared_buffers')} (8 kB pages), **fsync {s.get('fsync')}** "
      f"(a dev benchmark: commits do not reach the disk, for every side alike), synchronous_commit "
      f"{s.get('synchronous_commit')}, full_page_writes {s.get('full_page_writes')}, max_wal_size {s.get('max_wal_size')}, "
      f"checkpoint_timeout {s.get('checkpoint_timeout')}, jit {s.get('jit')}, autovacuum {s.get('autovacuum')}, "
      f"work_mem {s.get('work_mem')}, max_connections {s.get('max_connections')}; pg_stat_statements preloaded with "
      "`track = none` (switched to `all` only for the profile section). flowfabric's background worker is not "
      "loaded (no reconciler runs during the benchmark).")
    built = m.get('built_from') or m.get('git_commit')
    dirty = " (`+dirty`: with uncommitted changes in src/ or sql/)" if str(built).endswith("+dirty") else ""
    w(f"- flowfabric {m.get('ext_version', '')} (schema `flowfabric`; every call is schema-qualified): built from "
      f"{built}{dirty}, {m.get('ext_build')}.")
    w(f"- Load: {m.get('pgbench')}, `-M prepared`, `-j min(clients, 2)`; worker-pool shapes use "
      f"{m.get('driver', 'bench/ffdrive.c')}. Every measured run gets a fresh database (or a queue topped up) "
      "holding the side measured, filled, then `VACUUM ANALYZE` and `CHECKPOINT` before the clock starts.")
    w(f"- Other processes: every run records the CPU used by processes outside the benchmark (column *other CPU*, "
      f"in cores). A run waits for the machine to go quiet first, and is measured again (at most 3 times, within a "
      f"budget) when others used more than {CONTENDED} cores; the least disturbed attempt is kept, and rows still "
      "disturbed are flagged *contended*. Runs under a second cannot be judged (CPU times tick at 100 Hz): *n/a*.\n")
    w("## How to reproduce\n")
    w("```sh\nbench/run.sh                 # full run, ~30 minutes (plus a release build the first time)\n"
      "BENCH_QUICK=1 bench/run.sh   # short durations, smaller queues, ~10-15 minutes\n"
      "BENCH_ONLY=shapes,pgmq bench/run.sh   # some sections only (names: claim cycle usage fanin scale reconcile "
      "profile shapes routing pgmq batch create reserve submit metrics longtxn)\n```\n")
    w("`bench/run.sh` installs what is missing (`scripts/setup.sh`), copies the system PostgreSQL 15 into "
      "`target/bench-pg`, builds and installs the release extension there (`CARGO_TARGET_DIR=target/bench-build`), "
      "builds the load driver `bench/ffdrive.c`, runs `bench/bench.py` and writes this file with `bench/report.py`. "
      "pgmq is loaded at run time from the SQL-only install script carried by the PyPI package `pgmq` "
      "(`pip download`, cached in `target/bench-pgmq`); nothing of pgmq is kept in this repository. Raw output: "
      "`bench/out/` (results.json, logs, auto_explain plans, perf reports).\n")


def render_targets(doc, R):
    """Issue 15's targets (and issue 9's flat claim) with verdicts."""
    w = doc.w
    targets = []
    claim = R.get("claim", {}).get("rows", [])
    if claim:
        ratios = [r["ratio"] for r in claim if r["ratio"]]
        per = ", ".join(f"{r['clients']}c {x_(r['ratio'])}" for r in claim)
        targets.append((f"claim alone >= {CLAIM_TARGET}x the minimal claim (1, 4, 16 clients)", per,
                        verdict(min(ratios) >= CLAIM_TARGET if ratios else None)))
    sh = R.get("shapes") or {}
    if sh.get("s1"):
        s1 = sh["s1"]
        ff, b = s1["ff"], s1["base"]
        p99r = ratio(ff["cycle"]["p99_ms"], b["cycle"]["p99_ms"])
        ok = None if s1.get("ratio") is None or p99r is None else (s1["ratio"] >= S1_TARGET and p99r <= S1_P99_TARGET)
        targets.append((f"scenario 1 >= {S1_TARGET}x the minimal queue at 16 workers, p99 <= {S1_P99_TARGET:g}x its p99",
                        f"{x_(s1.get('ratio'))}, p99 {f(ff['cycle']['p99_ms'], 1)} vs {f(b['cycle']['p99_ms'], 1)} ms "
                        f"({x_(p99r, 1)})", verdict(ok)))
    if sh.get("s5_over_s1"):
        r5 = sh["s5_over_s1"].get("ff")
        targets.append((f"scenario 5 >= {S5_TARGET}x scenario 1 (same run)", f"{x_(r5)} (minimal queue: "
                        f"{x_(sh['s5_over_s1'].get('base'))})", verdict(None if r5 is None else r5 >= S5_TARGET)))
    rt = (R.get("routing") or {}).get("rows", [])
    for variant in ("mixed", "backlog"):
        rows = [r for r in rt if r["variant"] == variant and r["sets"] > 1]
        if rows:
            rels = [r.get("ff_rel") for r in rows]
            ok = None if any(x is None for x in rels) else max(rels) <= ROUTE_TARGET
            targets.append((f"claim latency with 10/100/1000 requirement sets within {ROUTE_TARGET}x of one set "
                            f"({variant} lane)", ", ".join(f"{r['sets']}: {x_(r.get('ff_rel'))}" for r in rows),
                            verdict(ok)))
    for key, tgt, what in (("usage", USAGE_TARGET, "64 budgets"), ("usage_hot", USAGE_HOT_TARGET, "one hot budget")):
        rows = [r for r in R.get(key, {}).get("rows", []) if r["clients"] in (4, 16)]
        if rows:
            ratios = [r["ratio"] for r in rows]
            targets.append((f"ff_report_usage >= {tgt}x the minimal counter at 4 and 16 clients, {what}",
                            ", ".join(f"{r['clients']}c {x_(r['ratio'])}" for r in rows),
                            verdict(None if None in ratios else min(ratios) >= tgt)))
    scale = R.get("scale", {}).get("rows", [])
    plain = [r for r in scale if not r.get("note")]
    if plain:
        base = plain[0]["ff"]["lat_ms"]
        rel = [(r["label"], r["ff"]["lat_ms"] / base) for r in plain[1:] if r["ff"]["lat_ms"] and base]
        worst = max((x for _, x in rel), default=None)
        per = f"10k: {f(base, 3)} ms; " + ", ".join(f"{lab}: {x:.2f}x" for lab, x in rel)
        biggest = max(r["queued"] for r in plain if r["lanes"] == 1)
        scope = "" if biggest >= 1_000_000 else f" (quick mode: only up to {biggest:,} rows)"
        targets.append((f"claim latency within {FLAT_TARGET}x from 10k to 1M queued{scope}", per,
                        verdict(None if worst is None else worst <= FLAT_TARGET)))
    if targets:
        w("## Targets\n")
        w("| target | measured | verdict |\n|---|---|---|")
        for t in targets:
            w(f"| {t[0]} | {t[1]} | {t[2]} |")
        w("")


def render_glance(doc, R):
    """One table of the headline ratios."""
    w = doc.w
    claim = R.get("claim", {}).get("rows", [])
    sh = R.get("shapes") or {}
    rows = []
    cyc = {r["clients"]: r for r in R.get("cycle", {}).get("rows", [])}
    if claim:
        rows.append(("`ff_claim_for_worker` vs the minimal SKIP LOCKED claim",
                     {r["clients"]: x_(r["ratio"]) for r in claim}))
    if cyc:
        rows.append(("claim + complete vs minimal claim + finish", {c: x_(r["ratio"]) for c, r in cyc.items()}))
    pg = R.get("pgmq") or {}
    for op, name in (("send", "`ff_create_execution` vs `pgmq.send`"), ("read", "`ff_claim_for_worker` vs `pgmq.read`"),
                     ("cycle", "create + claim + complete vs pgmq send + read + delete")):
        rr = {r["clients"]: x_(r["ratio"]) for r in pg.get("rows", []) if r["op"] == op}
        if rr:
            rows.append((name, rr))
    bt = R.get("batch") or {}
    for b in (10, 100):
        rr = {r["clients"]: x_(r["ff_vs_single"]) for r in bt.get("rows", []) if r["batch"] == b}
        if rr:
            rows.append((f"`ff_claim_batch` ({b}) + completes vs single claims + completes, per execution", rr))
    for key, name in (("usage", "`ff_report_usage`, 64 budgets, vs a counter UPDATE"),
                      ("usage_hot", "`ff_report_usage`, one hot budget, vs a counter UPDATE")):
        rr = {r["clients"]: x_(r["ratio"]) for r in R.get(key, {}).get("rows", [])}
        if rr:
            rows.append((name, rr))
    res = R.get("reserve") or {}
    rr = {r["clients"]: x_(r["reserve_vs_plain"]) for r in res.get("rows", [])}
    if rr:
        rows.append(("claim with `budget_reserve` on one hot budget vs a plain claim", rr))
    met = R.get("metrics") or {}
    rr = {r["clients"]: x_(r["on_over_off"]) for r in met.get("rows", [])}
    if rr:
        rows.append(("claim + complete, `flowfabric.metrics` on vs off", rr))
    if not rows:
        return
    w("## At a glance\n")
    w("Ratios flowfabric / the other side (throughput; above 1 = flowfabric faster), from the sections below.\n")
    w("| what | 1 client | 4 clients | 16 clients |\n|---|---:|---:|---:|")
    for name, rr in rows:
        w(f"| {name} | {rr.get(1, '')} | {rr.get(4, '')} | {rr.get(16, '')} |")
    if sh.get("s1"):
        w("")
        w(f"FlowFabric's scenarios (16 workers unless noted): scenario 1 {x_(sh['s1'].get('ratio'))} the minimal "
          f"queue; scenario 4 {x_(sh.get('s4', {}).get('ratio'))}; scenario 5 / scenario 1 = "
          f"{x_((sh.get('s5_over_s1') or {}).get('ff'))}.")
    w("")


def queue_table(doc, R, key, title, unit, explain):
    """A pgbench section: minimal SQL against flowfabric per client count."""
    w = doc.w
    sec = R.get(key)
    if not sec:
        return
    doc.h(title)
    w(explain + f" {reps_text(sec)}\n")
    w(f"| clients | minimal SQL {unit}/s | latency ms | ff {unit}/s | latency ms | ff / baseline | other CPU | check |")
    w("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in sec["rows"]:
        b, x = r["base"], r["ff"]
        w(f"| {r['clients']} | {f(b['tps'])} | {f(b['lat_ms'], 3)} | {f(x['tps'])} | {f(x['lat_ms'], 3)} | "
          f"**{x_(r['ratio'])}** | {other(b, x)} | {flag(b, x)} |")
    w("")
    w("Queue never drained: fewest rows left after a run (baseline / ff): " +
      ", ".join(f"{r['clients']}c {f(r['base'].get('left'))} / {f(r['ff'].get('left'))}" for r in sec["rows"]) + ".\n")


def render_queues(doc, R):
    """Claim and claim + complete throughput."""
    queue_table(doc, R, "claim", "Claim throughput", "claims",
                "pgbench, one claim per transaction, both queues pre-filled (the ff one through "
                "`ff_create_executions`). Per operation: " + DOES["ff_claim"] + " Against: " + DOES["base_claim"] +
                " The profile section lists the statements the claim runs.")
    queue_table(doc, R, "cycle", "Claim + complete (full lease cycle)", "cycles",
                "pgbench, two transactions per cycle, as a worker does: claim, then complete. Per operation: " +
                DOES["ff_complete"] + " Against: the minimal claim, then " + DOES["base_complete"])


def render_shapes(doc, R):
    """FlowFabric's scenarios 1, 4 and 5."""
    w = doc.w
    h = doc.h
    m = R.get("meta", {})
    sh = R.get("shapes") or {}
    if sh:
        h("FlowFabric's scenarios 1, 4 and 5")
        w("A driver shaped like FlowFabric's own Postgres comparison (`bench/ffdrive.c`): the work is seeded through "
          "the real API before the clock starts (`ff_create_executions`, `ff_submit_flow`), one connection per worker, "
          "each worker loops claim -> complete (two transactions) and sleeps 5 ms when a claim finds nothing; "
          "throughput = tasks / drain wall time (clock start, all workers connected, to the last completion); "
          "latency = claim + complete of one task, client-side. The minimal side runs the same driver against the "
          "hand-written SKIP LOCKED queue (claim, then `UPDATE ... SET state = 'done'`). "
          f"Median of {sh.get('s1', {}).get('ff', {}).get('all_ops_per_s') and len(sh['s1']['ff']['all_ops_per_s']) or 1} "
          "run(s) per side, alternating, each on a fresh database.\n")
        w(f"For context, FlowFabric's published figures (issue 15): scenario 1 on its Postgres backend "
          f"**{FLOWFABRIC_S1_PG:,} ops/s**, on Valkey **{FLOWFABRIC_S1_VALKEY:,} ops/s**, measured on a 16-core "
          f"machine; this run has {m.get('nproc')} cores shared with the load generator, so compare ratios, not "
          "rates.\n")
        w("| scenario | side | tasks | drain s | tasks/s | p50 / p95 / p99 ms (claim + complete) | claim p50 / p99 ms | "
          "empty claims | ff / minimal | other CPU | check |")
        w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        names = {"s1": f"1: {sh.get('s1', {}).get('tasks', 0):,} tasks, {sh.get('s1', {}).get('workers')} workers",
                 "s4": f"4: {sh.get('s4', {}).get('flows')} chains x {sh.get('s4', {}).get('length')} nodes, "
                       f"{sh.get('s4', {}).get('workers')} workers",
                 "s5": f"5: {sh.get('s5', {}).get('sets')} capability sets x {sh.get('s5', {}).get('per_set', 0):,}, "
                       f"{sh.get('s5', {}).get('workers')} workers (4 per set)"}
        for key in ("s1", "s4", "s5"):
            sc = sh.get(key)
            if not sc or "ff" not in sc:
                continue
            for side, lab in (("ff", "flowfabric"), ("base", "minimal SQL")):
                r = sc[side]
                c, cl = r["cycle"], r["claim"]
                w(f"| {names[key]} | {lab} | {f(r['tasks'])} | {f(r['wall_s'], 2)} | **{f(r['ops_per_s'])}** | "
                  f"{f(c['p50_ms'], 1)} / {f(c['p95_ms'], 1)} / {f(c['p99_ms'], 1)} | {f(cl['p50_ms'], 2)} / "
                  f"{f(cl['p99_ms'], 1)} | {f(r.get('empty_claims'))} | {x_(sc.get('ratio')) if side == 'ff' else ''} | "
                  f"{other(r)} | {flag(r)} |")
        w("")
        s4 = sh.get("s4")
        if s4 and "ff" in s4:
            w("Scenario 4, per flow (flow latency = first claim of its head to the completion of its last node; every "
              "node waits for its predecessor: `ff_submit_flow` edges on the ff side, a `pending` counter and an edge "
              "table decremented by the finishing statement on the minimal side):\n")
            w("| side | flows done | flows/s | flow p50 / p95 / p99 ms |\n|---|---:|---:|---:|")
            for side, lab in (("ff", "flowfabric"), ("base", "minimal SQL")):
                r = s4[side]
                fl = r.get("flow") or {}
                w(f"| {lab} | {r.get('flows')} | **{f(r.get('flows_per_s'), 1)}** | {f(fl.get('p50_ms'), 0)} / "
                  f"{f(fl.get('p95_ms'), 0)} / {f(fl.get('p99_ms'), 0)} |")
            w("")
        s5 = sh.get("s5_over_s1")
        if s5:
            w(f"Scenario 5 / scenario 1 (capability routing against plain claims, same run): flowfabric "
              f"**{x_(s5.get('ff'))}**, minimal SQL {x_(s5.get('base'))} (its claim filters `caps <@ $worker_caps` "
              "while walking the one lane index, so it steps over the other sets' rows).\n")
        w("Per operation: " + DOES["ff_claim"] + " " + DOES["ff_complete"] + "\n")


def render_routing(doc, R):
    """Claim latency against the number of requirement sets."""
    w = doc.w
    h = doc.h
    rsec = R.get("routing")
    if rsec:
        h("Capability routing: claim latency vs distinct requirement sets in one lane")
        w(f"Set k requires `{{cap-k}}`. Two lanes per database, for S = 1, 10, 100, 1000 sets: **mixed**: "
          f"{rsec['rows_per_lane']:,} rows round-robin over the S sets, the worker holds the capability of every "
          "10th set (it satisfies max(1, S/10) sets, about a tenth of the rows once S >= 10); **backlog**: "
          f"{rsec['rows_per_lane']:,} rows of the S-1 sets the worker lacks queued first, then "
          f"{rsec['match_rows']:,} rows of the one set it has (S = 1: those rows only). One client claims K times per "
          "repetition (`pgbench -t K -l`, per-claim latency from the transaction log without each repetition's "
          "first claims); medians over repetitions. flowfabric keys its claim index by requirement set and probes "
          "only the sets the worker satisfies; the minimal claim filters `caps <@ $worker_caps` on the lane index. "
          "Latency relative to one set is the flatness measure.\n")
        w("| lane | sets | sets the worker satisfies | ff mean ms | ff p50 / p99 ms | ff vs 1 set | minimal mean ms | "
          "minimal p50 / p99 ms | minimal vs 1 set | other CPU | check |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rsec["rows"]:
            x, b = r["ff"], r["base"]
            sat = max(1, r["sets"] // 10) if r["variant"] == "mixed" else 1
            w(f"| {r['variant']} | {r['sets']} | {sat} | **{f(x['lat_ms'], 3)}** | {f(x['p50_ms'], 3)} / "
              f"{f(x['p99_ms'], 3)} | **{x_(r.get('ff_rel'))}** | {f(b['lat_ms'], 3)} | {f(b['p50_ms'], 3)} / "
              f"{f(b['p99_ms'], 3)} | {x_(r.get('base_rel'))} | {other(x, b)} | {flag(x, b)} |")
        w("")
        w("Auto_explain plans of the claim per case: `bench/out/plans-routing.txt`.\n")


def render_pgmq(doc, R):
    """pgmq against flowfabric, operation by operation."""
    w = doc.w
    h = doc.h
    pg = R.get("pgmq")
    if pg:
        h("pgmq: send / read / delete against create / claim / complete")
        if pg.get("skipped"):
            w(f"**Skipped**: pgmq's SQL could not be obtained or loaded on this machine ({pg['skipped']}). The section "
              "needs the PyPI package `pgmq` to be downloadable (`pip download pgmq`), or `BENCH_PGMQ_SQL` pointing "
              "at pgmq's SQL-only install script.\n")
        else:
            w(f"pgmq loaded from its SQL-only install script (no build, no `CREATE EXTENSION`): {pg['source']} "
              f"({pg.get('functions')} functions in schema `pgmq`), into a scratch database of this server; queue "
              "`bench` made with `pgmq.create`. pgbench, `-M prepared`, pre-filled queues (never drained), payload "
              f"`{{\"n\": 1}}` on both sides. {reps_text(pg)}\n")
            w("What each side does per operation:\n")
            w(f"- send: {DOES['pgmq_send']} Against {DOES['ff_create']}")
            w(f"- read: {DOES['pgmq_read']} Against {DOES['ff_claim']} (a signed grant the worker must present, "
              "a lease with an expiry, an attempt row).")
            w(f"- delete: {DOES['pgmq_delete']} Against {DOES['ff_complete']}")
            w("- cycle: one client runs send, read, delete (three transactions) / create, claim, complete.\n")
            w("In the read-only rows the messages read stay in pgmq's table, invisible until their visibility "
              "timeout passes, and its pick (`ORDER BY msg_id` with a `vt` filter) walks past every one of them, so "
              "pgmq's read slows down as a run goes on; flowfabric's claim index is partial (runnable rows only), "
              "leased rows leave it (their dead entries stay until VACUUM). In the cycle rows every message is "
              "deleted and there is no such backlog.\n")
            w("| operation | clients | pgmq ops/s | latency ms | ff ops/s | latency ms | ff / pgmq | other CPU | check |")
            w("|---|---:|---:|---:|---:|---:|---:|---:|---|")
            opname = {"send": "send / create", "read": "read / claim", "cycle": "send+read+delete / create+claim+complete"}
            for r in pg["rows"]:
                a, x = r["pgmq"], r["ff"]
                w(f"| {opname[r['op']]} | {r['clients']} | {f(a['tps'])} | {f(a['lat_ms'], 3)} | {f(x['tps'])} | "
                  f"{f(x['lat_ms'], 3)} | **{x_(r['ratio'])}** | {other(a, x)} | {flag(a, x)} |")
            w("")


def render_batch(doc, R):
    """ff_claim_batch against single claims."""
    w = doc.w
    h = doc.h
    bt = R.get("batch")
    if bt:
        h("Batch claims: `ff_claim_batch` (10, 100) + completes vs single claims")
        w("The driver, duration-bound, pre-filled queue: each worker claims a batch (one transaction), then completes "
          "each execution in its own transaction (the API has no batch complete), and claims again. Batch 1 is "
          "`ff_claim_for_worker`; 10 and 100 are `ff_claim_batch(ARRAY[lane], ..., max_count => n)` (one grant per "
          "row, same admission as the single claim, payload and attempt returned). The minimal side: the minimal claim, "
          "and for batches `UPDATE ... WHERE id = ANY (ARRAY(SELECT id ... LIMIT n FOR UPDATE SKIP LOCKED))`, then "
          f"single-row completes. Throughput per execution. {reps_text(bt)}\n")
        w("| clients | batch | ff executions/s | ff vs batch 1 | ff claim call p50 / p99 ms | minimal executions/s | "
          "minimal vs batch 1 | ff / minimal | other CPU | check |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in bt["rows"]:
            x, b = r["ff"], r["base"]
            cc = x.get("claim_call") or {}
            w(f"| {r['clients']} | {r['batch']} | **{f(x['execs_per_s'])}** | {x_(r.get('ff_vs_single'))} | "
              f"{f(cc.get('p50_ms'), 2)} / {f(cc.get('p99_ms'), 2)} | {f(b['execs_per_s'])} | "
              f"{x_(r.get('base_vs_single'))} | {x_(r['ratio'])} | {other(x, b)} | {flag(x, b)} |")
        w("")


def render_create(doc, R):
    """ff_create_executions against single creates."""
    w = doc.w
    h = doc.h
    cr = R.get("create")
    if cr:
        h("Batch creates: `ff_create_executions` of N payloads vs N single creates")
        w("Wall time from the client of: one `ff_create_executions(lane, payloads jsonb[])` call; N "
          "`ff_create_execution` calls from one client (pgbench `-t N`, one round trip and transaction each); N calls "
          "inside one statement (`SELECT count(ff_create_execution(...)) FROM generate_series(1, N)`: the per-call "
          "cost without round trips); the minimal side: one `INSERT ... SELECT FROM unnest($1::jsonb[])` and N single "
          f"`INSERT`s. Median of {cr.get('reps')} run(s). Per row: " + DOES["ff_create"] + "\n")
        w("| N | `ff_create_executions` ms | rows/s | N single calls ms | N calls in one statement ms (metrics off) | "
          "batch vs N calls | minimal INSERT of N ms | N single INSERTs ms | ff batch / minimal batch (speed) | "
          "ff single / minimal single (speed) | check |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in cr["rows"]:
            off = (r.get("ff_stmt_nometrics") or {}).get("ms")
            w(f"| {r['n']:,} | **{f(r['ff_batch']['ms'], 1)}** | {f(r['ff_batch']['rows_per_s'])} | "
              f"{f(r['ff_calls']['ms'], 0)} | {f(r['ff_stmt']['ms'], 0)} ({f(off, 0)}) | "
              f"**{x_(r.get('batch_vs_calls'), 1)} faster** | "
              f"{f(r['base_batch']['ms'], 1)} | {f(r['base_calls']['ms'], 0)} | {x_(r.get('ff_batch_vs_base_batch'))} | "
              f"{x_(r.get('ff_calls_vs_base_calls'))} | "
              f"{flag(r['ff_batch'], r['ff_calls'], r['ff_stmt'], r['base_batch'], r['base_calls'])} |")
        w("")
        big = cr["rows"][-1] if cr["rows"] else None
        small = cr["rows"][0] if len(cr["rows"]) > 1 else None
        if big and small and big["ff_stmt"]["ms"] and small["ff_stmt"]["ms"]:
            growth = big["ff_stmt"]["ms"] / small["ff_stmt"]["ms"]
            off_b = (big.get("ff_stmt_nometrics") or {}).get("ms")
            off_s = (small.get("ff_stmt_nometrics") or {}).get("ms")
            w(f"Many `ff_create_execution` calls in one transaction (one statement): {small['n']:,} -> "
              f"{big['n']:,} calls ({big['n'] / small['n']:.0f}x) took {growth:.1f}x the time with "
              "`flowfabric.metrics` on" + (f", {off_b / off_s:.1f}x with it off" if off_b and off_s else "") +
              " (linear would be the same factor as the calls). `ff_create_executions` makes one call per batch.\n")


def render_reserve(doc, R):
    """Claims with budget reservations on one hot budget."""
    w = doc.w
    h = doc.h
    rs = R.get("reserve")
    if rs:
        h("Reservations: claims against one hot budget")
        w("pgbench, one claim per transaction, pre-filled lanes of one database: **plain** (no budget), **budget** "
          "(every execution names budget `hot`, no reserve: admission reads the budget), **reserve** (names `hot` "
          "with `budget_reserve => '{\"tokens\": 1}'`: admission locks the budget's usage row, checks usage + reserved "
          "+ this reserve against the hard limit and adds the reserve, so every claim serialises on that row). Hard "
          "limit far away (nothing refused). The minimal side: the minimal claim, and the minimal claim with a counter "
          "row updated in the same statement (`WITH c AS (claim) UPDATE bench_counter SET v = v + 1 ... WHERE v + 1 <= "
          f"lim`). {reps_text(rs)}\n")
        w("| clients | ff plain claims/s | ff budget | ff reserve | reserve / plain | minimal plain | minimal + counter | "
          "ff reserve / minimal + counter | other CPU | check |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rs["rows"]:
            ks = ("ff_plain", "ff_budget", "ff_reserve", "base_plain", "base_reserve")
            w(f"| {r['clients']} | {f(r['ff_plain']['tps'])} | {f(r['ff_budget']['tps'])} | **{f(r['ff_reserve']['tps'])}** | "
              f"**{x_(r.get('reserve_vs_plain'))}** | {f(r['base_plain']['tps'])} | {f(r['base_reserve']['tps'])} | "
              f"{x_(r.get('ff_vs_base_reserve'))} | {other(*(r[k] for k in ks))} | {flag(*(r[k] for k in ks))} |")
        w("")
        c = rs.get("check") or {}
        w(f"Check after the runs: `reserved` of budget `hot` = {f(c.get('reserved_tokens'))} tokens, leases holding a "
          f"reserve = {f(c.get('leased_with_reserve'))}: {'exact' if c.get('exact') else '**not exact**'}.\n")


def render_usage(doc, R):
    """ff_report_usage against a counter, spread and hot."""
    w = doc.w
    h = doc.h
    for key, title in (("usage", f"`ff_report_usage`, {R.get('usage', {}).get('budgets', 64)} budgets"),
                       ("usage_hot", "`ff_report_usage`, one hot budget")):
        sec = R.get(key)
        if not sec:
            continue
        h(title)
        if key == "usage":
            w("`ff_report_usage('b' || random(1, N), '{\"tokens\": 1}')` (hard limit far away, no dedup key) against "
              "`UPDATE bench_counter SET v = v + 1 WHERE id = $1 AND v + 1 <= lim RETURNING v` over the same number "
              "of rows. Per operation: the report locks the budget's policy row and applies the increments if every "
              "dimension stays within its hard limit, evaluating soft limits (the profile section lists its "
              f"statements); the baseline is one row update with a limit check. {reps_text(sec)}\n")
        else:
            w(f"Every client reports against the same budget (same row in the baseline): all updates serialise on one "
              f"row lock. {reps_text(sec)}\n")
        w("| clients | minimal SQL reports/s | latency ms | ff reports/s | latency ms | ff / baseline | other CPU | check |")
        w("|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in sec["rows"]:
            b, x = r["base"], r["ff"]
            w(f"| {r['clients']} | {f(b['tps'])} | {f(b['lat_ms'], 3)} | {f(x['tps'])} | {f(x['lat_ms'], 3)} | "
              f"**{x_(r['ratio'])}** | {other(b, x)} | {flag(b, x)} |")
        w("")
    chk = R.get("usage_check")
    if chk:
        w(f"Check: usage applied by ff {f(chk['ff_total'])} (= reports made), baseline counters {f(chk['base_total'])}, "
          f"hard breaches {f(chk['ff_breaches'])}.\n")


def render_submit(doc, R):
    """ff_submit_flow, the wide cascade and a chain end to end."""
    w = doc.w
    h = doc.h
    sb = R.get("submit")
    if sb:
        h(f"`ff_submit_flow` of a {sb['nodes']:,}-node flow")
        w(f"One call per flow, wall time from the client (spec sent as one jsonb parameter: wide "
          f"{f(sb['spec_bytes']['wide'] / 1024)} KiB, deep {f(sb['spec_bytes']['deep'] / 1024)} KiB). **Wide**: one "
          f"root fanning out to {sb['nodes'] - 1:,} children; **deep**: a chain of {sb['nodes']:,}. Per call "
          "flowfabric parses and validates the spec (names, policies, cycle check), creates every execution, the "
          "edges and edge groups, blocks the nodes with an upstream, and answers the id map. The minimal side: the "
          "same rows and edges in the hand-written dependency queue with one `INSERT ... RETURNING` feeding an "
          f"`INSERT` of the edges (no validation, no cycle check). Median of {sb['reps']} run(s).\n")
        w("| shape | ff_submit_flow ms | nodes/s | minimal SQL ms | ff / minimal (time) | other CPU | check |")
        w("|---|---:|---:|---:|---:|---:|---|")
        for shape in ("wide", "deep"):
            x, b = sb[f"ff_{shape}"], sb[f"base_{shape}"]
            w(f"| {shape} | **{f(x['ms'])}** | {f(sb['nodes'] / (x['ms'] / 1000) if x['ms'] else None)} | "
              f"{f(b['ms'])} | {x_(ratio(x['ms'], b['ms']), 1)} | {other(x, b)} | {flag(x, b)} |")
        w("")
        c = sb.get("cascade") or {}
        w(f"Completing the root of a wide flow (`ff_complete_execution`, its cascade inline, {sb['nodes'] - 1:,} children "
          f"made claimable in the same transaction): **{f(c.get('ff_ms'))} ms** ({f(c.get('ff_ready'))} claimable "
          f"after); the minimal finishing statement decrementing {sb['nodes'] - 1:,} children: {f(c.get('base_ms'))} ms "
          f"({f(c.get('base_ready'))} ready){'' if c.get('valid') else ' — **INVALID**'}.\n")
        ch = sb.get("chain")
        if ch:
            x, b = ch["ff"], ch["base"]
            w(f"A chain of {ch['nodes']:,} nodes end to end, one worker (the driver, claim -> complete, 1 ms sleep on an "
              f"empty claim): flowfabric **{f(x['wall_s'], 2)} s** ({f(x['ops_per_s'])} nodes/s, claim + complete p50 "
              f"{f(x['cycle']['p50_ms'], 2)} ms, p99 {f(x['cycle']['p99_ms'], 2)} ms, {f(x.get('empty_claims'))} empty "
              f"claims), minimal SQL {f(b['wall_s'], 2)} s ({f(b['ops_per_s'])} nodes/s); ratio {x_(ch.get('ratio'))}"
              f"{'' if x.get('valid') and b.get('valid') else ' — **INVALID**'}.\n")


def render_fanin(doc, R):
    """The 1,000-wide fan-in."""
    w = doc.w
    h = doc.h
    sec = R.get("fanin")
    if sec:
        h(f"Complete + cascade on a {sec['width']:,}-wide fan-in")
        w(f"One flow: root -> {sec['width']:,} middles -> sink (all_of), submitted in one `ff_submit_flow` call "
          "(column *build flow s*). The root is claimed and completed first (its cascade makes the "
          "middles claimable); then N pgbench clients loop claim -> complete (two transactions) until the sink's "
          "group fires. Time = first claim of a middle to the last middle's completion (server-side "
          "`started_at_ms` / `terminal_at_ms`; that last completion fires the sink in its own transaction). "
          "Every completion updates the sink's `ff_edge_group` row, so all workers serialise on that row lock. "
          "Baseline: the minimal queue, finish = `UPDATE` the row plus decrement a countdown row that marks the "
          f"sink ready at zero (the same hot row). Median of {sec.get('reps', 1)} run(s), each on a fresh flow.\n")
        w("| workers | ff time ms | ff executions/s | baseline time ms | baseline executions/s | ff / baseline | "
          "build flow s | root fan-out cascade ms | other CPU | check |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in sec["rows"]:
            x, b = r["ff"], r["base"]
            w(f"| {r['clients']} | {f(x['ms'])} | **{f(x['execs_per_s'])}** | {f(b['ms'])} | {f(b['execs_per_s'])} | "
              f"{x_(r['ratio'])} | {f(x['build_s'], 2)} | {f(x['root_complete_s'] * 1000)} | {other(x, b)} | "
              f"{flag(x, b)} |")
        w("")
        w("Checks: " + "; ".join(f"{r['clients']}w: {r['ff']['completed']} middles completed, sink group "
                                 f"{r['ff']['sink_group'][1]} with {r['ff']['sink_group'][0]} successes"
                                 for r in sec["rows"]) + ".\n")


def render_metrics(doc, R):
    """flowfabric.metrics on against off."""
    w = doc.w
    h = doc.h
    mt = R.get("metrics")
    if mt:
        h("`flowfabric.metrics` on / off: claim + complete")
        w("pgbench claim -> complete (two transactions), the same database, `ALTER DATABASE ... SET flowfabric.metrics "
          "= on | off` between runs (new connections each run), alternating. With metrics on, each claim and each "
          "completion adds to this backend's row of `ff_lane_counter` (one upsert per call; no row is shared between "
          f"backends). {reps_text(mt)}\n")
        w("| clients | metrics on cycles/s | latency ms | metrics off cycles/s | latency ms | on / off | completions counted "
          "(on / off) | other CPU | check |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in mt["rows"]:
            a, b = r["on"], r["off"]
            w(f"| {r['clients']} | {f(a['tps'])} | {f(a['lat_ms'], 3)} | {f(b['tps'])} | {f(b['lat_ms'], 3)} | "
              f"**{x_(r['on_over_off'])}** | {'+'.join(f(x) for x in a.get('counted', []))} / "
              f"{'+'.join(f(x) for x in b.get('counted', []))} | {other(a, b)} | {flag(a, b)} |")
        w("")


def render_longtxn(doc, R):
    """A snapshot held during a 16-worker run."""
    w = doc.w
    h = doc.h
    lt = R.get("longtxn")
    if lt and "ff" in lt:
        h("A long-running transaction during a 16-worker run")
        w(f"The driver, {lt['workers']} workers, claim -> complete for {lt['seconds']} s on a pre-filled queue (never "
          f"drained). From {lt['hold_at_s']} s to {lt['hold_at_s'] + lt['hold_s']} s one more connection holds a "
          "snapshot: `REPEATABLE READ`, one `SELECT`, then idle in transaction (its `backend_xmin` is checked), then "
          "rolls back. While it holds, no row version deleted after its snapshot can be removed, by VACUUM or by "
          "index scans marking entries dead: every claim and completion leaves versions and index entries behind "
          "that the next picks must step over. Same run for the minimal queue. Phases by completion time.\n")
        w("| phase | seconds | ff tasks/s | ff claim p50 / p99 ms | ff claim + complete p99 ms | minimal tasks/s | "
          "minimal claim p50 / p99 ms | ff / minimal |")
        w("|---|---|---:|---:|---:|---:|---:|---:|")
        for ph in ("before", "during", "after"):
            x, b = lt["ff"]["phases"][ph], lt["base"]["phases"][ph]
            w(f"| {ph} | {f(x['from_s'], 0)}-{f(x['to_s'], 0)} | **{f(x['ops_per_s'])}** | {f(x['claim']['p50_ms'], 2)} / "
              f"{f(x['claim']['p99_ms'], 1)} | {f(x['cycle']['p99_ms'], 1)} | {f(b['ops_per_s'])} | "
              f"{f(b['claim']['p50_ms'], 2)} / {f(b['claim']['p99_ms'], 1)} | {x_(lt['ratio'].get(ph))} |")
        w("")
        for side, lab in (("ff", "flowfabric"), ("base", "minimal SQL")):
            r = lt[side]
            bef, dur_ = r["phases"]["before"]["ops_per_s"], r["phases"]["during"]["ops_per_s"]
            aft = r["phases"]["after"]["ops_per_s"]
            w(f"- {lab}: during / before {x_(ratio(dur_, bef))}, after / before {x_(ratio(aft, bef))}; snapshot held "
              f"from {f(r['hold'].get('began_s'), 1)} s to {f(r['hold'].get('ended_s'), 1)} s (backend_xmin "
              f"{r['hold'].get('backend_xmin', 'n/a')}); {f(r['fill_rows'])} rows queued, {f(r['left'])} left; "
              f"other CPU {other(r)}; {flag(r)}.")
        w("")
        w("What to do about it: the README, *Retention, vacuum and long transactions* (keep long readers off the "
          "primary that runs the queue, or bound them with `idle_in_transaction_session_timeout` and "
          "`statement_timeout`).\n")
        w(f"Per {lt['bucket_s']} s (by completion time; dead tuples and autovacuum runs of the queue table sampled "
          "during the run):\n")
        w("| from s | holding | ff tasks/s | ff claim p50 / p99 ms | ff dead tuples | ff autovacuums | minimal tasks/s | "
          "minimal claim p50 / p99 ms | minimal dead tuples |")
        w("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for bx, bb in zip(lt["ff"]["buckets"], lt["base"]["buckets"]):
            w(f"| {bx['from_s']} | {'yes' if bx['holding'] else ''} | {f(bx['ops_per_s'])} | "
              f"{f(bx['claim']['p50_ms'], 2)} / {f(bx['claim']['p99_ms'], 1)} | {f(bx['dead_tuples'])} | "
              f"{f(bx['autovacuums'])} | {f(bb['ops_per_s'])} | {f(bb['claim']['p50_ms'], 2)} / "
              f"{f(bb['claim']['p99_ms'], 1)} | {f(bb['dead_tuples'])} |")
        w("")


def render_scale(doc, R):
    """Claim latency against queue size."""
    w = doc.w
    h = doc.h
    m = R.get("meta", {})
    sec = R.get("scale")
    if sec:
        h("Claim latency vs queue size")
        w("One client (`pgbench -c 1 -t K -l`, K claims per repetition; per-claim latencies from the transaction "
          "log without each repetition's first claims (a new backend warming its caches and plans); median over "
          "the repetitions of the mean, p50 and p99). "
          f"The single-lane queue grows {' -> '.join(f'{r:,}' for r in R['config']['scale_sizes'])} rows (the same "
          "database, topped up between steps, VACUUM "
          "ANALYZE before each step); the many-lanes case is a separate database with the rows spread over the "
          "lanes round-robin, claiming from one lane. Rows are queued through the real `ff_create_executions` "
          "(baseline: INSERT ... SELECT). *ff / baseline* here is a latency ratio (above 1 = flowfabric slower).\n")
        w("| queued executions | lanes | claims x reps | ff mean ms | ff p50 / p99 ms | vs 10k | "
          "minimal SQL mean ms | p50 / p99 ms | ff / baseline | other CPU | check |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        base10 = next((r["ff"]["lat_ms"] for r in sec["rows"] if not r.get("note")), None)
        for r in sec["rows"]:
            x, b = r["ff"], r["base"]
            rel = f"{x['lat_ms'] / base10:.2f}x" if base10 and x["lat_ms"] else "n/a"
            lab = r["label"].replace(" over ", " rows over ") if "lanes" in r["label"] else f"{r['label']}"
            empty = r.get("queued_in_lane_ff", 1) == 0 or r.get("queued_in_lane_base", 1) == 0
            w(f"| {lab} | {r['lanes']} | {r['claims_per_rep']} x {r['reps']} | **{f(x['lat_ms'], 3)}** | "
              f"{f(x.get('p50_ms'), 3)} / {f(x.get('p99_ms'), 3)} | {rel} | "
              f"{f(b['lat_ms'], 3)} | {f(b.get('p50_ms'), 3)} / {f(b.get('p99_ms'), 3)} | "
              f"{f(x['lat_ms'] / b['lat_ms'], 2) if x['lat_ms'] and b['lat_ms'] else 'n/a'}x | "
              f"{other(x, b)} | {'INVALID (lane drained)' if empty else flag(x, b)} |")
        w("")
        gen = sec.get("generation", [])
        if gen:
            w("Queueing rate through `ff_create_executions` (one call per lane and chunk of 10,000 rows, "
              "before the clock): " +
              ", ".join(f"{g['rows']:,} rows at {f(g['ff_rows_per_s'])}/s" for g in gen) + ".\n")
        burst = [r for r in sec["rows"] if r.get("note") == "burst"]
        if burst:
            relopt = ", ".join(m.get("exec_core_reloptions") or []) or "none (defaults)"
            w("The `+ N claims since VACUUM` row is measured right after a burst of N claims with no VACUUM in "
              "between (autovacuum switched off on both queues for that row only): claimed rows keep their "
              "entries in the partial claim index until VACUUM, and picks step over them. In normal operation "
              f"autovacuum bounds this debt; `ff_exec_core` is installed with reloptions: {relopt}.\n")
        w("Short repetitions (well under a second) cannot be checked for CPU used by other processes (CPU times "
          "tick at 100 Hz): *other CPU* shows n/a there; the wait for a quiet machine before each repetition "
          "still applies.\n")
        plans = R.get("scale_plans", {})
        rows = []
        for lab, notices in plans.items():
            for plan in notices:
                if "SKIP LOCKED" in plan and "ff_exec_core" in plan and "Limit" in plan:
                    hit = re.search(r"Buffers: shared hit=(\d+)", plan)
                    dur = re.search(r"duration: ([0-9.]+) ms", plan)
                    rows.append((lab, dur.group(1) if dur else "?", hit.group(1) if hit else "?"))
        if rows:
            w("Pick statement inside the claim (auto_explain, nested, ANALYZE + BUFFERS, 8th call of a session):\n")
            w("| queue | pick ms | shared buffers hit |\n|---|---:|---:|")
            for lab, dur, hit in rows:
                w(f"| {lab} | {dur} | {hit} |")
            w("")


def render_reconcile(doc, R):
    """One reconciler tick over stale events."""
    w = doc.w
    h = doc.h
    sec = R.get("reconcile")
    if sec:
        h(f"ff_reconcile_tick(0) with {sec['events']:,} stale events")
        w(f"{sec['events']:,} two-node flows whose root was made terminal by hand with an undispatched completion "
          "event committed a minute ago (as `tests/ffhelp.py` `make_stale_work` does), then one timed "
          "`SELECT * FROM ff_reconcile_tick(0)` (each event in its own subtransaction). The minimal side: the same "
          "number of two-row chains in the hand-written dependency queue, head done, one unapplied event row each; "
          "one statement marks every event applied and readies the children (no per-event isolation, no flow "
          "state).\n")
        w("| rep | tick ms | per event us | reconciled | errors | downstreams made claimable | minimal SQL ms | "
          "ff / minimal (time) | other CPU | check |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for i, r in enumerate(sec["rows"]):
            b = r.get("base") or {}
            w(f"| {i + 1} | **{f(r['ms'], 1)}** | {f(r['ms'] * 1000 / sec['events'], 1)} | {r['reconciled']} | "
              f"{r['errors']} | {r['made_eligible']} | {f(b.get('ms'), 1)} | {x_(ratio(r['ms'], b.get('ms')), 1)} | "
              f"{other(r)} | {flag(r, b)} |")
        w("")


def pgss_breakdown(doc, prof, key, title):
    """Per-call time of a function and of the statements it runs, from
    pg_stat_statements (track = all, track_planning = on)."""
    w = doc.w
    p = prof.get(key)
    if not p:
        return
    st = [x for x in p["statements"] if "pg_stat_statements" not in x["query"] and x["calls"] > 0]
    top = [x for x in st if x["toplevel"]]
    nested = [x for x in st if not x["toplevel"]]
    if not top:
        return
    calls = max(x["calls"] for x in top)
    top_us = sum(x["total_ms"] for x in top) * 1000 / calls
    w(f"**{title}**: {f(p['pgbench']['tps'])} calls/s under instrumentation; "
      f"{f(top_us, 1)} us of server time per call.\n")
    w("| statement | us per call (exec) | us per call (planning) | plans per call | share |")
    w("|---|---:|---:|---:|---:|")
    acc = 0.0
    for x in top:
        if len(top) > 1:
            us = x["total_ms"] * 1000 / calls
            w(f"| top level: {label(x['query'])} | {f(us, 1)} | | | {f(100 * us / top_us)}% |")
    for x in sorted(nested, key=lambda x: -(x["total_ms"] + (x["plan_total_ms"] or 0))):
        us = x["total_ms"] * 1000 / calls
        pus = (x["plan_total_ms"] or 0) * 1000 / calls
        acc += us + pus
        w(f"| {label(x['query'])} | {f(us, 1)} | {f(pus, 1)} | {f(x['plans'] / x['calls'], 2)} | "
          f"{f(100 * (us + pus) / top_us)}% |")
    rest = top_us - acc
    w(f"| *rest (outside the SPI statements)* | {f(rest, 1)} | | | {f(100 * rest / top_us)}% |\n")


def render_profile(doc, R):
    """Where the time goes: pg_stat_statements, plans, perf."""
    w = doc.w
    prof = R.get("profile")
    if prof:
        w("## Profile: where the time goes (1 client)\n")
        w("pg_stat_statements with `track = all` and `track_planning = on` (so the SPI statements inside the "
          "functions are counted, with their planning), one client, a few seconds per workload. Statement "
          "times include the instrumentation's own overhead, so the throughput here is lower than above. "
          "*Rest* = the function's time minus its statements' execution and planning: function-call and SPI "
          "overhead, Rust code (argument checks, HMAC-SHA256, JSON), executor start-up not counted by pgss.\n")

        pgss_breakdown(doc, prof, "pgss_claim", "ff_claim_for_worker")
        pgss_breakdown(doc, prof, "pgss_cycle", "claim + ff_complete_execution (cycle)")
        pgss_breakdown(doc, prof, "pgss_usage", "ff_report_usage")
        for key, name in (("pgss_claim_base", "minimal SQL claim"), ("pgss_usage_base", "minimal SQL counter")):
            p = prof.get(key)
            if p:
                st = [x for x in p["statements"] if x["toplevel"] and "pg_stat_statements" not in x["query"]
                      and x["calls"] > 0]
                if st:
                    w(f"- {name}: {f(st[0]['mean_ms'] * 1000, 1)} us per statement, "
                      f"{f(p['pgbench']['tps'])} calls/s under instrumentation.")
        fl = prof.get("floors")
        if fl:
            w(f"- Round-trip floor (1 client, no instrumentation): `SELECT 1` {f(fl['select1']['tps'])}/s "
              f"({f(fl['select1']['lat_ms'], 3)} ms); a trivial flowfabric function (`ff_lane_channel`) "
              f"{f(fl['ffcall']['tps'])}/s ({f(fl['ffcall']['lat_ms'], 3)} ms).")
        lk = prof.get("locks")
        if lk:
            w("")
            w("Relation locks one call holds (from `pg_locks`, after a first call has filled the session's caches; "
              "PostgreSQL 15 takes up to 16 by fast path per backend, the rest through the shared lock table): " +
              "; ".join(f"{name} {v['locks']} ({v['fastpath']} fast path, {v['relations']} relations)"
                        for name, v in lk.items()) + ".")
        w("")
        w(plan_cache_note(prof))
        pc = prof.get("usage_proconfig")
        if pc and pc.get("installed"):
            inst, rem = pc["installed"], pc["removed"]
            ratios = pc.get("removed_over_installed", {})
            w("**Experiment: the pinned search_path of ff_report_usage.** As installed the function carries "
              f"`{' '.join(pc['installed_config'])}`; the function manager applies and rolls back these settings on "
              "every call. In the scratch database only, its `search_path` setting was removed (`ALTER FUNCTION ... "
              "RESET search_path`, the other settings kept, the database's search_path set to `flowfabric, public` "
              "so the function still finds its tables), A/B interleaved: " + "; ".join(
                  f"{cl} client{'s' if str(cl) != '1' else ''}: installed {', '.join(f(x) for x in inst[cl])}/s, "
                  f"without the pin {', '.join(f(x) for x in rem[cl])}/s (**{f(ratios.get(cl), 2)}x**)"
                  for cl in inst) + ". The spec requires the pin (no object resolved through a schema another role "
                  "can write); this prices it, it is not an option.\n")
        for key, title in (("perf_claim", "ff_claim_for_worker"), ("perf_usage", "ff_report_usage")):
            p = prof.get(key)
            if not p:
                continue
            w(f"**perf** (`perf record -g -p <backend>`, 1 client, {title}; full report in "
              f"`bench/out/perf-{key.split('_')[1]}.txt`): self time by object: " +
              ", ".join(re.sub(r"\s+", " ", ln.strip()) for ln in p["reports"].get("dso", [])[:6]) + ". Top symbols:\n")
            w("```")
            for ln in p["reports"].get("symbol", [])[:14]:
                w(re.sub(r"\s{3,}", "  ", ln.strip()))
            w("```")
            kids = [ln for ln in p["reports"].get("children", [])
                    if re.search(r"(GetCachedPlan|pg_plan_queries|standard_ExecutorStart|ExecInitNode|"
                                 r"SPI_execute_plan$|standard_ExecutorFinish|ExecInsertIndexTuples|"
                                 r"AfterTriggerEndQuery|__send|CommitTransaction)", ln)]
            if kids:
                w("Inclusive (children) time of selected functions:\n")
                w("```")
                for ln in kids[:12]:
                    w(re.sub(r"\s{3,}", "  ", ln.strip()))
                w("```")
            w("")


def render_notes(doc, R):
    """How to read the numbers, and the run time per section."""
    w = doc.w
    w("## Notes on reading the numbers\n")
    fl = (R.get("profile") or {}).get("floors")
    floor = f" (`SELECT 1` manages {f(fl['select1']['tps'])}/s here)" if fl else ""
    w(f"- At 1 client every variant is bound by the round trip and process wake-ups of this virtual machine{floor}, "
      "so 1-client ratios understate server-side differences; at 4 and 16 clients both cores are busy and the "
      "ratios reflect CPU per operation (pgbench's own CPU included, on the same cores).")
    w("- The baselines are deliberately minimal (one narrow table, one statement). flowfabric does more per "
      "operation by design (signed grants, attempts, completion events, budget policies); the ratios say what "
      "that costs, not that the two are interchangeable. pgmq sits in between: plain SQL and plpgsql, no lease "
      "token or attempts, dynamic SQL planned on every call.")
    w("- The worker-pool sections (FlowFabric's scenarios, batches, the long transaction, the chain) use the C "
      "driver `bench/ffdrive.c`, cheap enough that it does not decide the minimal queue's rate; pgbench runs "
      "the rest.")
    w("- fsync is off: with durable commits both variants would pay the same WAL flush per transaction, which "
      "would likely narrow the gaps at low client counts (not measured here).\n")
    if R.get("timing_s"):
        w("## Run time per scenario\n")
        w(", ".join(f"{k} {v:.0f} s" for k, v in R["timing_s"].items()) + ".\n")


class Doc:
    """The markdown being written: lines, and numbered section headings."""

    def __init__(self):
        self.lines = []
        self.section_no = 0

    def w(self, line):
        self.lines.append(line)

    def h(self, title):
        self.section_no += 1
        self.w(f"## {self.section_no}. {title}\n")


def server_us(prof, key):
    """(server us per call, us inside its SPI statements, number of SPI
    statements per call) from a pg_stat_statements profile."""
    p = (prof or {}).get(key)
    if not p:
        return None
    st = [x for x in p["statements"] if "pg_stat_statements" not in x["query"] and x["calls"] > 0]
    top = [x for x in st if x["toplevel"]]
    if not top:
        return None
    calls = max(x["calls"] for x in top)
    nested = [x for x in st if not x["toplevel"]]
    inner = sum(x["total_ms"] + (x["plan_total_ms"] or 0) for x in nested) * 1000 / calls
    per_call = sum(x["calls"] for x in nested) / calls
    return sum(x["total_ms"] for x in top) * 1000 / calls, inner, per_call


def render_gaps(doc, R):
    """Why each missed target is missed, from this run's profile."""
    w = doc.w
    prof = R.get("profile") or {}
    claim, base = server_us(prof, "pgss_claim"), server_us(prof, "pgss_claim_base")
    cycle, usage, ubase = server_us(prof, "pgss_cycle"), server_us(prof, "pgss_usage"), server_us(prof, "pgss_usage_base")
    if not (claim and base):
        return
    w("## The targets against the profile: where the time goes\n")
    w("From this run's profile (section *Profile*, one client, pg_stat_statements with nested statements):\n")
    rest = claim[0] - claim[1]
    w(f"- **Claim alone.** A claim costs {f(claim[0], 1)} us of server time against {f(base[0], 1)} us for the "
      f"minimal claim ({x_(base[0] / claim[0])}). It runs {f(claim[2], 1)} SPI statements per call (the pick, "
      "and the lease: execution update, attempt insert, signed grant insert and the lane counter in one "
      f"statement), {f(claim[1], 1)} us together, against one statement writing one row; the other "
      f"{f(rest, 1)} us are outside the statements: the function call with its pinned `search_path` (required "
      "by the security rules; its price is measured below for ff_report_usage), SPI, executor start-up of the "
      "cached plans (not counted by pg_stat_statements), the HMAC signature and the result row. The attempt "
      "and grant rows are what fencing and `ff_verify_grant` read, so they cannot be left out; reaching 0.75x "
      "would need the whole claim in about one statement's cost, which this design does not get to.")
    if cycle:
        w(f"- **Scenario 1 (claim + complete).** The cycle costs {f(cycle[0], 1)} us of server time at one "
          f"client ({f(cycle[2], 1)} SPI statements: the claim's, the fence read of grant, key and execution, "
          "and the finish statement that ends the attempt, writes the completion event and counts the lane) "
          "against two one-row statements for the minimal queue; at 16 workers on 2 cores the ratio is this "
          "CPU ratio, the driver sharing the same cores.")
    if usage and ubase:
        w(f"- **ff_report_usage.** {f(usage[0], 1)} us per report against {f(ubase[0], 1)} us for the minimal "
          f"counter ({x_(ubase[0] / usage[0])} at one client): {f(usage[2], 1)} SPI statements (usage rows and the "
          "policy's limits in one statement, dedup and breach bookkeeping when they apply) plus the pinned "
          "search_path. On one hot budget every report queues on the same usage row for one statement; the row "
          "lock is not held across the call any more, but each report is still one locked update of one row, so "
          "the hot case is bounded by how fast one row can be updated, for both sides, with flowfabric's longer "
          "statement inside the lock.")
    w("- **Capability routing.** With S requirement sets in a lane, a worker that satisfies k of them ranks its k "
      "sets by one index probe each and then locks a row of the best set; it never reads rows of sets it does not "
      "satisfy. So latency is flat in the sets the worker *lacks* (the *backlog* rows) and grows with the sets "
      "it *has* (the *mixed* rows, where k = S/10: 100 probes at S = 1,000). Scenario 5 against scenario 1 is "
      "the same per-claim cost plus one probe per satisfied set.\n")


RENDERERS = [render_header, render_conditions, render_machine, render_targets, render_glance, render_queues,
             render_shapes, render_routing, render_pgmq, render_batch, render_create, render_reserve, render_usage,
             render_submit, render_fanin, render_metrics, render_longtxn, render_scale, render_reconcile,
             render_profile, render_gaps, render_notes]


def main():
    with open(SRC) as fh:
        R = json.load(fh)
    doc = Doc()
    for render in RENDERERS:
        render(doc, R)
    with open(DST, "w") as fh:
        fh.write("\n".join(doc.lines).rstrip() + "\n")
    print(f"wrote {DST}")


if __name__ == "__main__":
    sys.exit(main())

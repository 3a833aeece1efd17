#!/usr/bin/env python3
"""flowfabric benchmark driver.

Starts a private PostgreSQL 15 cluster from the bench prefix (a private copy
of the server with the release build of the extension installed), runs every
scenario against it with pgbench, stops the cluster and writes
bench/out/results.json.  bench/report.py turns that into bench/RESULTS.md.

Each measured run gets a fresh scratch database holding only the tables of
the variant being measured (flowfabric or the hand-written baseline), filled,
vacuumed and checkpointed before the clock starts.

Environment:
  BENCH_QUICK=1       short durations and smaller queues (~3 minutes)
  BENCH_PG_PREFIX     prefix of the private server (default target/bench-pg)
  BENCH_PORT          port (default 54350)
  BENCH_ONLY          comma-separated scenario names to run (debugging)
"""
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import psycopg

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")
LOGS = os.path.join(OUT, "logs")
PREFIX = os.environ.get("BENCH_PG_PREFIX", os.path.join(REPO, "target", "bench-pg"))
BIN = os.path.join(PREFIX, "lib", "postgresql", "15", "bin")
PORT = int(os.environ.get("BENCH_PORT", "54350"))
DIR = f"/tmp/flowfabric-bench-{PORT}"
DATA = os.path.join(DIR, "data")
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
ONLY = {s for s in os.environ.get("BENCH_ONLY", "").split(",") if s}

CLIENTS = [1, 4, 16]
if QUICK:
    CFG = dict(claim_s=3, cycle_s=3, usage_s=3, hot_s=3, scale_sizes=[10_000, 100_000],
               lanes=1000, lane_rows=100, scale_reps=3, scale_claims=300, lane_claims=30,
               reconcile_reps=1, profile_s=3, profile_rows=30_000)
else:
    CFG = dict(claim_s=15, cycle_s=15, usage_s=15, hot_s=10, scale_sizes=[10_000, 100_000, 1_000_000],
               lanes=1000, lane_rows=1000, scale_reps=3, scale_claims=300, lane_claims=300,
               reconcile_reps=3, profile_s=6, profile_rows=100_000)
BUDGETS = 64
FANIN_WIDTH = 1000
STALE_EVENTS = 1000
# Rows pre-filled per second of a claim run: comfortably above the fastest
# rate seen on this machine, and checked after every run (never drained).
FILL_PER_S = {"base": 14_000, "ff": 9_000}

SERVER_CONF = {
    "port": PORT,
    "listen_addresses": "''",
    "unix_socket_directories": f"'{DIR}'",
    "max_connections": 100,
    "shared_buffers": "'1GB'",
    "fsync": "off",
    "max_wal_size": "'8GB'",
    "checkpoint_timeout": "'30min'",
    "jit": "off",
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "none",
    "logging_collector": "off",
}

results = {"meta": {}, "quick": QUICK, "config": CFG}


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)


# ---------------------------------------------------------------------------
# cluster
# ---------------------------------------------------------------------------

def as_postgres(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


def pg_ctl(*args, check=True):
    return subprocess.run(as_postgres([f"{BIN}/pg_ctl", "-D", DATA] + list(args)), check=check,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cluster_stop():
    if os.path.exists(os.path.join(DATA, "postmaster.pid")):
        pg_ctl("-m", "fast", "-w", "stop", check=False)


def cluster_start():
    cluster_stop()
    shutil.rmtree(DIR, ignore_errors=True)
    os.makedirs(DIR)
    if os.geteuid() == 0:
        shutil.chown(DIR, "postgres", "postgres")
    subprocess.run(as_postgres([f"{BIN}/initdb", "-D", DATA, "-A", "trust", "-U", "postgres", "--no-sync"]),
                   check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(DATA, "postgresql.conf"), "a") as f:
        for k, v in SERVER_CONF.items():
            f.write(f"{k} = {v}\n")
    pg_ctl("-l", os.path.join(DIR, "server.log"), "-w", "-t", "60", "start")


def dsn(db="postgres"):
    return f"host={DIR} port={PORT} dbname={db} user=postgres"


def connect(db="postgres"):
    return psycopg.connect(dsn(db), autocommit=True)


def q1(db, sql, args=None):
    with connect(db) as c:
        return c.execute(sql, args).fetchone()


def fresh_db(name):
    with connect() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')
    with connect(name) as c:
        c.execute("CREATE EXTENSION flowfabric")
        with open(os.path.join(HERE, "schema.sql")) as f:
            c.execute(f.read())
    return name


def drop_db(name):
    with connect() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def settle(db, tables):
    """VACUUM ANALYZE and CHECKPOINT so every run starts from the same state."""
    with connect(db) as c:
        for t in tables:
            c.execute(f"VACUUM ANALYZE {t}")
        c.execute("CHECKPOINT")


# ---------------------------------------------------------------------------
# pgbench
# ---------------------------------------------------------------------------

def pgbench_cmd(db, script, clients, seconds=None, transactions=None, defines=None):
    cmd = [f"{BIN}/pgbench", "-n", "-M", "prepared", "-f", os.path.join(HERE, "pgbench", script),
           "-c", str(clients), "-j", str(min(clients, 2))]
    cmd += ["-T", str(seconds)] if seconds else ["-t", str(transactions)]
    for k, v in (defines or {}).items():
        cmd += ["-D", f"{k}={v}"]
    return cmd + ["-h", DIR, "-p", str(PORT), "-U", "postgres", db]


def parse_pgbench(out):
    def num(pattern):
        m = re.search(pattern, out)
        return float(m.group(1)) if m else None
    return {
        "tps": num(r"tps = ([0-9.]+) \(without initial connection time\)"),
        "lat_ms": num(r"latency average = ([0-9.]+) ms"),
        "processed": num(r"number of transactions actually processed: ([0-9]+)"),
        "failed": num(r"number of failed transactions: ([0-9]+)"),
    }


def pgbench(name, db, script, clients, seconds=None, transactions=None, defines=None):
    cmd = pgbench_cmd(db, script, clients, seconds, transactions, defines)
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    os.makedirs(LOGS, exist_ok=True)
    with open(os.path.join(LOGS, f"{name}.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n\n" + out)
    r = parse_pgbench(out)
    r["rc"] = p.returncode
    r["aborted"] = "aborted" in out
    return r


# ---------------------------------------------------------------------------
# fills
# ---------------------------------------------------------------------------

def fill_ff(db, lane_expr, n, batch=100_000):
    """Queues n executions with the real ff_create_execution; returns rows/s.
    lane_expr is an SQL expression over the series value i."""
    t0 = time.perf_counter()
    with connect(db) as c:
        done = 0
        while done < n:
            k = min(batch, n - done)
            c.execute(f"SELECT count(ff_create_execution({lane_expr})) FROM generate_series(%s::bigint, %s) i",
                      (done + 1, done + k))
            done += k
    return n / (time.perf_counter() - t0)


def fill_base(db, lane_expr, n):
    with connect(db) as c:
        c.execute(f"INSERT INTO bench_queue (lane, created_at) SELECT {lane_expr}, bench_now_ms() "
                  "FROM generate_series(1::bigint, %s) i", (n,))


def queued_ff(db, lane):
    return q1(db, "SELECT count(*) FROM ff_exec_core WHERE lane_id = %s AND lifecycle_phase = 'runnable'", (lane,))[0]


def queued_base(db, lane):
    return q1(db, "SELECT count(*) FROM bench_queue WHERE lane = %s AND state = 'ready'", (lane,))[0]


# ---------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------

def queue_run(kind, scenario, clients, seconds):
    """One claim (or claim+complete) run of one variant on a fresh queue."""
    db = fresh_db(f"ffb_{scenario}_{kind}_{clients}")
    n = FILL_PER_S[kind] * seconds + 5_000
    if kind == "ff":
        fill_ff(db, "'bench'", n)
        settle(db, ["ff_exec_core"])
        r = pgbench(f"{scenario}_ff_c{clients}", db, f"{scenario}_ff.sql", clients, seconds, defines={"lane": "bench"})
        left = queued_ff(db, "bench")
    else:
        fill_base(db, "'bench'", n)
        settle(db, ["bench_queue"])
        r = pgbench(f"{scenario}_base_c{clients}", db, f"{scenario}_base.sql", clients, seconds,
                    defines={"lane": "bench"})
        left = queued_base(db, "bench")
    r.update(prefilled=n, left=left, valid=left > 0 and r["rc"] == 0 and not r["aborted"])
    drop_db(db)
    return r


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def scenario_queue(scenario, seconds):
    rows = []
    for clients in CLIENTS:
        base = queue_run("base", scenario, clients, seconds)
        ff = queue_run("ff", scenario, clients, seconds)
        rows.append({"clients": clients, "base": base, "ff": ff, "ratio": ratio(ff["tps"], base["tps"])})
        log(f"{scenario} c={clients}: base {base['tps']:.0f} tps, ff {ff['tps']:.0f} tps, ratio {rows[-1]['ratio']}")
    results[scenario] = {"seconds": seconds, "rows": rows}
    save()


def scenario_usage():
    db = fresh_db("ffb_usage")
    with connect(db) as c:
        c.execute("INSERT INTO bench_counter (id, v, lim) SELECT i, 0, 1000000000000000 FROM generate_series(1, %s) i",
                  (BUDGETS,))
        for i in range(1, BUDGETS + 1):
            c.execute("SELECT ff_create_budget(%s, '{tokens}', '{1000000000000000}', '{0}')", (f"b{i}",))
            c.execute("SELECT * FROM ff_report_usage(%s, '{\"tokens\": 0}')", (f"b{i}",))  # usage row exists
    tables = ["bench_counter", "ff_budget_policy", "ff_budget_usage"]
    for key, budgets, seconds in (("usage", BUDGETS, CFG["usage_s"]), ("usage_hot", 1, CFG["hot_s"])):
        rows = []
        for clients in CLIENTS:
            settle(db, tables)
            base = pgbench(f"{key}_base_c{clients}", db, "usage_base.sql", clients, seconds, defines={"budgets": budgets})
            settle(db, tables)
            ff = pgbench(f"{key}_ff_c{clients}", db, "usage_ff.sql", clients, seconds, defines={"budgets": budgets})
            for r in (base, ff):
                r["valid"] = r["rc"] == 0 and not r["aborted"]
            rows.append({"clients": clients, "base": base, "ff": ff, "ratio": ratio(ff["tps"], base["tps"])})
            log(f"{key} c={clients}: base {base['tps']:.0f} tps, ff {ff['tps']:.0f} tps, ratio {rows[-1]['ratio']}")
        results[key] = {"seconds": seconds, "budgets": budgets, "rows": rows}
        save()
    # Sanity: every ff report applied (no hard breach, nothing lost).
    with connect(db) as c:
        results["usage_check"] = {
            "ff_total": c.execute("SELECT sum(current_value) FROM ff_budget_usage").fetchone()[0],
            "base_total": c.execute("SELECT sum(v) FROM bench_counter").fetchone()[0],
            "ff_breaches": c.execute("SELECT sum(breach_count) FROM ff_budget_policy").fetchone()[0],
        }
    drop_db(db)
    save()


def run_until(db, script, clients, done_sql, name, timeout=300):
    """Runs pgbench until done_sql answers true, then stops it."""
    cmd = pgbench_cmd(db, script, clients, seconds=timeout)
    os.makedirs(LOGS, exist_ok=True)
    logf = open(os.path.join(LOGS, f"{name}.txt"), "w")
    logf.write(" ".join(cmd) + "\n\n")
    logf.flush()
    p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    finished = False
    with connect(db) as c:
        deadline = time.time() + timeout
        while time.time() < deadline and p.poll() is None:
            if c.execute(done_sql).fetchone()[0]:
                finished = True
                break
            time.sleep(0.02)
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    p.wait()
    logf.close()
    return finished


def scenario_fanin():
    rows = []
    for clients in CLIENTS:
        # flowfabric: root -> 1000 middles -> sink, built with the real API.
        db = fresh_db(f"ffb_fanin_ff_{clients}")
        t0 = time.perf_counter()
        flow, root, sink = q1(db, "SELECT * FROM bench_build_fanin('fanin', %s)", (FANIN_WIDTH,))
        build_s = time.perf_counter() - t0
        with connect(db) as c:
            got = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('fanin', 'root', 'root-1')").fetchone()
            assert got and got[0] == root, (got, root)
            t0 = time.perf_counter()
            c.execute("SELECT ff_complete_execution(%s, %s)", got)
            root_s = time.perf_counter() - t0
            eligible = c.execute("SELECT count(*) FROM ff_exec_core WHERE lane_id = 'fanin' "
                                 "AND eligibility_state = 'eligible_now'").fetchone()[0]
        settle(db, ["ff_exec_core", "ff_edge_group", "ff_edge"])
        sink_uuid = sink.split("}:", 1)[1]
        finished = run_until(db, "fanin_ff.sql", clients,
                             f"SELECT eligibility_state <> 'blocked_by_dependencies' FROM ff_exec_core "
                             f"WHERE execution_id = '{sink_uuid}'", f"fanin_ff_c{clients}")
        with connect(db) as c:
            mids = c.execute(
                "SELECT count(*) FILTER (WHERE public_state = 'completed'), max(terminal_at_ms) - min(started_at_ms) "
                "FROM ff_exec_core WHERE flow_id = %s AND execution_id NOT IN (%s, %s)",
                (flow, root.split("}:", 1)[1], sink_uuid)).fetchone()
            group = c.execute("SELECT success_count, group_state FROM ff_edge_group WHERE flow_id = %s "
                              "AND downstream_eid = %s", (flow, sink_uuid)).fetchone()
        drop_db(db)
        ff = {"build_s": build_s, "root_complete_s": root_s, "eligible_after_root": eligible,
              "completed": mids[0], "ms": mids[1], "sink_group": list(group), "finished": finished,
              "valid": finished and mids[0] == FANIN_WIDTH and group[1] == "satisfied"}
        ff["execs_per_s"] = FANIN_WIDTH / (mids[1] / 1000) if mids[1] else None

        # baseline: the same work on the minimal queue plus a countdown row.
        db = fresh_db(f"ffb_fanin_base_{clients}")
        with connect(db) as c:
            c.execute("INSERT INTO bench_fanin_queue (lane, created_at) SELECT 'fanin', bench_now_ms() "
                      "FROM generate_series(1, %s)", (FANIN_WIDTH,))
            c.execute("INSERT INTO bench_fanin_sink VALUES (1, %s, NULL)", (FANIN_WIDTH,))
        settle(db, ["bench_fanin_queue", "bench_fanin_sink"])
        finished = run_until(db, "fanin_base.sql", clients,
                             "SELECT fired_at IS NOT NULL FROM bench_fanin_sink", f"fanin_base_c{clients}")
        with connect(db) as c:
            done, ms = c.execute("SELECT count(*) FILTER (WHERE state = 'done'), "
                                 "(SELECT fired_at FROM bench_fanin_sink) - min(started_at) FROM bench_fanin_queue").fetchone()
        drop_db(db)
        base = {"completed": done, "ms": ms, "finished": finished, "valid": finished and done == FANIN_WIDTH}
        base["execs_per_s"] = FANIN_WIDTH / (ms / 1000) if ms else None
        rows.append({"clients": clients, "ff": ff, "base": base, "ratio": ratio(ff["execs_per_s"], base["execs_per_s"])})
        log(f"fanin c={clients}: ff {ff['execs_per_s']} exec/s ({mids[1]} ms), base {base['execs_per_s']} exec/s, "
            f"build {build_s:.2f}s, root cascade {root_s*1000:.0f} ms")
    results["fanin"] = {"width": FANIN_WIDTH, "rows": rows}
    save()


def capture_plans(db, call_sql, reps=8):
    """auto_explain (ANALYZE, BUFFERS, nested statements) of the last of
    `reps` calls, so the SPI plans are the cached ones a hot backend uses."""
    notices = []
    with connect(db) as c:
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        for s in ("LOAD 'auto_explain'", "SET auto_explain.log_level = notice",
                  "SET auto_explain.log_nested_statements = on", "SET auto_explain.log_analyze = on",
                  "SET auto_explain.log_buffers = on", "SET auto_explain.log_timing = on",
                  "SET auto_explain.log_min_duration = -1"):
            c.execute(s)
        for _ in range(reps - 1):
            c.execute(call_sql).fetchall()
        c.execute("SET auto_explain.log_min_duration = 0")
        notices.clear()
        c.execute(call_sql).fetchall()
    return notices


def scenario_scale():
    out = []
    plans = {}

    def measure(db, lane, label, queued_rows, lanes, claims):
        settle(db, ["ff_exec_core", "bench_queue"])
        reps = {"ff": [], "base": []}
        for i in range(CFG["scale_reps"]):
            for kind in ("base", "ff"):
                r = pgbench(f"scale_{label}_{kind}_{i}", db, f"claim_{kind}.sql", 1, transactions=claims,
                            defines={"lane": lane})
                reps[kind].append(r)
        row = {"label": label, "queued": queued_rows, "lanes": lanes, "claims_per_rep": claims,
               "reps": CFG["scale_reps"], "queued_in_lane_ff": queued_ff(db, lane),
               "queued_in_lane_base": queued_base(db, lane)}
        for kind in ("ff", "base"):
            lats = [r["lat_ms"] for r in reps[kind] if r["lat_ms"]]
            row[kind] = {"lat_ms": statistics.median(lats) if lats else None, "all_lat_ms": lats,
                         "valid": all(r["rc"] == 0 and not r["aborted"] for r in reps[kind])}
        row["ratio"] = ratio(row["base"]["lat_ms"], row["ff"]["lat_ms"])
        plans[label] = capture_plans(db, f"SELECT * FROM ff_claim_for_worker('{lane}', 'explain', 'explain-1')")
        log(f"scale {label}: ff {row['ff']['lat_ms']} ms, base {row['base']['lat_ms']} ms")
        out.append(row)

    db = fresh_db("ffb_scale")
    have = 0
    gen = []
    for size in CFG["scale_sizes"]:
        rate = fill_ff(db, "'scale'", size - have)
        fill_base(db, "'scale'", size - have)
        gen.append({"rows": size - have, "ff_rows_per_s": rate})
        have = size
        measure(db, "scale", f"{size}", size, 1, CFG["scale_claims"])
    drop_db(db)

    db = fresh_db("ffb_lanes")
    n = CFG["lanes"] * CFG["lane_rows"]
    lanes = CFG["lanes"]
    rate = fill_ff(db, f"'lane-' || (i % {lanes})", n)
    fill_base(db, f"'lane-' || (i % {lanes})", n)
    gen.append({"rows": n, "ff_rows_per_s": rate})
    measure(db, "lane-7", f"{n} over {lanes} lanes", n, lanes, CFG["lane_claims"])
    drop_db(db)
    results["scale"] = {"rows": out, "generation": gen}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "plans-claim.txt"), "w") as f:
        for label, ns in plans.items():
            f.write(f"===== queue: {label} =====\n")
            for n_ in ns:
                f.write(n_ + "\n\n")
    results["scale_plans"] = {k: v for k, v in plans.items()}
    save()


def scenario_reconcile():
    db = fresh_db("ffb_reconcile")
    rows = []
    for i in range(CFG["reconcile_reps"]):
        t0 = time.perf_counter()
        q1(db, "SELECT bench_make_stale_events('stale', %s)", (STALE_EVENTS,))
        build_s = time.perf_counter() - t0
        settle(db, ["ff_completion_event", "ff_exec_core", "ff_edge_group"])
        with connect(db) as c:
            t0 = time.perf_counter()
            r = c.execute("SELECT scanned, reconciled, noop, filtered, errors FROM ff_reconcile_tick(0)").fetchone()
            ms = (time.perf_counter() - t0) * 1000
            eligible = c.execute("SELECT count(*) FROM ff_exec_core WHERE lane_id = 'stale' "
                                 "AND eligibility_state = 'eligible_now'").fetchone()[0]
        rows.append({"ms": ms, "scanned": r[0], "reconciled": r[1], "noop": r[2], "errors": r[4],
                     "build_s": build_s, "downstream_eligible_total": eligible,
                     "valid": r[1] == STALE_EVENTS and r[4] == 0})
        log(f"reconcile rep {i}: {ms:.1f} ms, {r}")
    drop_db(db)
    results["reconcile"] = {"events": STALE_EVENTS, "rows": rows}
    save()


# ---------------------------------------------------------------------------
# profiling
# ---------------------------------------------------------------------------

def pgss(db, clients, script, seconds, defines):
    with connect(db) as c:
        c.execute("SELECT pg_stat_statements_reset()")
    r = pgbench(f"profile_{script[:-4]}", db, script, clients, seconds, defines=defines)
    with connect(db) as c:
        rows = c.execute(
            "SELECT toplevel, calls, total_exec_time, mean_exec_time, rows, shared_blks_hit, shared_blks_read, "
            "wal_records, regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY total_exec_time DESC LIMIT 25").fetchall()
    keys = ["toplevel", "calls", "total_ms", "mean_ms", "rows", "blks_hit", "blks_read", "wal_records", "query"]
    return {"pgbench": r, "statements": [dict(zip(keys, row)) for row in rows]}


def perf_profile(db, script, seconds, defines, name):
    if not shutil.which("perf"):
        return None
    pdir = os.path.join("/tmp", f"flowfabric-bench-perf-{PORT}")
    os.makedirs(pdir, exist_ok=True)
    data = os.path.join(pdir, f"{name}.data")
    rec = subprocess.Popen(["perf", "record", "-F", "1999", "-g", "-a", "-o", data, "--", "sleep", str(seconds)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    r = pgbench(f"perf_{name}", db, script, 1, seconds - 1, defines=defines)
    rec.wait()
    reports = {}
    for key, extra in (("dso", ["--sort", "dso"]), ("symbol", ["--sort", "dso,symbol"]),
                       ("children", ["--children", "--sort", "dso,symbol"])):
        args = ["perf", "report", "-i", data, "--stdio", "--comms", "postgres", "-g", "none",
                "--percent-limit", "0.7"] + (["--no-children"] if key != "children" else []) + extra
        p = subprocess.run(args, capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
        reports[key] = lines[:60]
    with open(os.path.join(OUT, f"perf-{name}.txt"), "w") as f:
        for key, lines in reports.items():
            f.write(f"===== perf report ({key}), postgres processes only =====\n" + "\n".join(lines) + "\n\n")
    shutil.rmtree(pdir, ignore_errors=True)
    return {"pgbench": r, "reports": reports}


def scenario_profile():
    db = fresh_db("ffb_profile")
    fill_ff(db, "'bench'", CFG["profile_rows"] * 2)
    fill_base(db, "'bench'", CFG["profile_rows"] * 2)
    with connect(db) as c:
        c.execute("INSERT INTO bench_counter (id, v, lim) SELECT i, 0, 1000000000000000 FROM generate_series(1, %s) i",
                  (BUDGETS,))
        for i in range(1, BUDGETS + 1):
            c.execute("SELECT ff_create_budget(%s, '{tokens}', '{1000000000000000}', '{0}')", (f"b{i}",))
            c.execute("SELECT * FROM ff_report_usage(%s, '{\"tokens\": 0}')", (f"b{i}",))
    settle(db, ["ff_exec_core", "bench_queue", "ff_budget_usage", "ff_budget_policy"])
    prof = {}
    s = CFG["profile_s"]
    with connect(db) as c:
        c.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
        c.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)
    try:
        prof["pgss_claim"] = pgss(db, 1, "claim_ff.sql", s, {"lane": "bench"})
        prof["pgss_cycle"] = pgss(db, 1, "cycle_ff.sql", s, {"lane": "bench"})
        prof["pgss_usage"] = pgss(db, 1, "usage_ff.sql", s, {"budgets": BUDGETS})
        prof["pgss_claim_base"] = pgss(db, 1, "claim_base.sql", s, {"lane": "bench"})
        prof["pgss_usage_base"] = pgss(db, 1, "usage_base.sql", s, {"budgets": BUDGETS})
    finally:
        with connect(db) as c:
            c.execute("ALTER SYSTEM SET pg_stat_statements.track = 'none'")
            c.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)
    plans = {
        "report_usage": capture_plans(db, "SELECT * FROM ff_report_usage('b1', '{\"tokens\": 1}')"),
        "claim": capture_plans(db, "SELECT * FROM ff_claim_for_worker('bench', 'explain', 'explain-1')"),
    }
    with open(os.path.join(OUT, "plans-profile.txt"), "w") as f:
        for label, ns in plans.items():
            f.write(f"===== {label} =====\n" + "\n\n".join(ns) + "\n\n")
    prof["plans"] = plans
    settle(db, ["ff_exec_core", "bench_queue", "ff_budget_usage", "ff_budget_policy"])
    prof["perf_claim"] = perf_profile(db, "claim_ff.sql", s + 1, {"lane": "bench"}, "claim")
    prof["perf_usage"] = perf_profile(db, "usage_ff.sql", s + 1, {"budgets": BUDGETS}, "usage")
    drop_db(db)
    results["profile"] = prof
    save()


# ---------------------------------------------------------------------------

def meta():
    def read(path):
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""
    cpu = re.search(r"model name\s*:\s*(.*)", read("/proc/cpuinfo"))
    mem = re.search(r"MemTotal:\s*(\d+)", read("/proc/meminfo"))
    git = lambda *a: subprocess.run(["git", "-C", REPO] + list(a), capture_output=True, text=True).stdout.strip()
    with connect() as c:
        version = c.execute("SELECT version()").fetchone()[0]
        settings = dict(c.execute(
            "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings WHERE name = ANY(%s)",
            (["shared_buffers", "fsync", "synchronous_commit", "max_wal_size", "checkpoint_timeout", "jit",
              "autovacuum", "wal_level", "max_connections", "work_mem", "full_page_writes"],)).fetchall())
    pgbench_version = subprocess.run([f"{BIN}/pgbench", "--version"], capture_output=True, text=True).stdout.strip()
    results["meta"] = {
        "nproc": os.cpu_count(), "mem_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "cpu": cpu.group(1).strip() if cpu else platform.processor(), "kernel": platform.release(),
        "pg_version": version, "pgbench": pgbench_version, "settings": settings,
        "server_conf": {k: str(v).strip("'") for k, v in SERVER_CONF.items()},
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty_src": bool(git("status", "--porcelain", "--", "src", "sql")),
        "ext_build": os.environ.get("BENCH_BUILD_INFO", "release (cargo pgrx install --release)"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "clients": CLIENTS,
    }
    save()


SCENARIOS = [
    ("claim", lambda: scenario_queue("claim", CFG["claim_s"])),
    ("cycle", lambda: scenario_queue("cycle", CFG["cycle_s"])),
    ("usage", scenario_usage),
    ("fanin", scenario_fanin),
    ("scale", scenario_scale),
    ("reconcile", scenario_reconcile),
    ("profile", scenario_profile),
]


def main():
    os.makedirs(LOGS, exist_ok=True)
    for f in os.listdir(LOGS):
        os.remove(os.path.join(LOGS, f))
    t_start = time.time()
    log(f"mode: {'quick' if QUICK else 'full'}; server {BIN}; cluster {DIR}")
    cluster_start()
    try:
        meta()
        for name, fn in SCENARIOS:
            if ONLY and name not in ONLY:
                continue
            t0 = time.time()
            log(f"--- {name}")
            fn()
            results.setdefault("timing_s", {})[name] = round(time.time() - t0, 1)
            save()
    finally:
        results["total_s"] = round(time.time() - t_start, 1)
        save()
        cluster_stop()
        log(f"cluster stopped; total {results['total_s']} s")


if __name__ == "__main__":
    sys.exit(main())

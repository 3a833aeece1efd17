#!/usr/bin/env python3
"""Version-regression benchmark: flowfabric 0.2.0 against the current version.

Run by bench/versions.sh, which builds both versions as release packages and
installs each into its own private copy of PostgreSQL 15. This script starts
one cluster per version (same server binaries, same settings), runs the same
workload shapes on both, and writes bench/out/versions.json and
bench/RESULTS-versions.md.

Workloads (pgbench -M prepared, 1/4/16 clients):
  cycle  claim one execution from a pre-filled lane, then complete it with its
         grant: two transactions per cycle, as a worker does;
  usage  ff_report_usage of 1 token on one of 64 budgets whose hard limit is
         far away;
  fanin  root -> 1,000 middles -> sink (all_of): after the root completed,
         N clients loop claim -> complete until the sink's group fires; the
         figure is 1,000 / (last middle completion - first middle claim),
         from the server's own stamps.

Each workload runs `reps` repetitions; in each, both versions run once,
0.2.0 first in even repetitions and the current version first in odd ones, so
slow drift on the shared machine falls on both sides alike. Figures are
medians over repetitions. Every run records the CPU used by processes outside
this benchmark (other CPU, in cores); a repetition whose runs competed for the
CPU is measured again while a small budget lasts, keeping the calmer pair.

Environment:
  VERSIONS_QUICK=1       smoke run (shorter runs, two repetitions)
  VERSIONS_ONLY=a,b      run some workloads only (cycle, usage, fanin)
  VERSIONS_PREFIX_OLD / VERSIONS_PREFIX_CUR   the private servers (set by versions.sh)

  python3 bench/versions.py --report   rewrites RESULTS-versions.md from versions.json
"""
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time

import psycopg
from psycopg.types.json import Jsonb

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "router"))
from shardkit import postmaster_cpu_seconds  # noqa: E402  (the scale benchmark's server kit)
OUT = os.path.join(HERE, "out")
LOGS = os.path.join(REPO, "target", "bench-versions", "logs")   # pgbench output per run (not kept in git)
JSON_OUT = os.path.join(OUT, "versions.json")
MD_OUT = os.path.join(HERE, "RESULTS-versions.md")
SCRIPTS = os.path.join(REPO, "target", "bench-versions", "pgbench")
QUICK = os.environ.get("VERSIONS_QUICK", "") not in ("", "0")
ONLY = {s for s in os.environ.get("VERSIONS_ONLY", "").split(",") if s}
CUR_VERSION = os.environ.get("VERSIONS_CUR_VERSION", "0.3.0")

CLIENTS = [1, 4, 16]
if QUICK:
    CFG = dict(reps=2, cycle_s=2, usage_s=2, fanin_reps=2, quiet_wait_s=5, quiet_budget_s=20, retry_pairs=1)
else:
    CFG = dict(reps=5, cycle_s=6, usage_s=5, fanin_reps=5, quiet_wait_s=10, quiet_budget_s=60, retry_pairs=4)
BUDGETS = 64
FANIN_WIDTH = 1000
TOLERANCE = 0.90       # "no more than 10% slower": current / 0.2.0 >= 0.90
CONTENDED = 0.3        # other CPU (cores) during a run that makes its pair measured again
QUIET_CORES = 0.25     # other CPU tolerated before a run starts
FILL_CHUNK = 10_000
WARM_UP_S = 2        # unmeasured cycles before the first repetition (see warm_up)


class Side:
    """One version: its private server, its cluster, how its API is named."""

    def __init__(self, version, prefix, port, ns):
        self.version = version
        self.prefix = prefix
        self.bin = os.path.join(prefix, "lib", "postgresql", "15", "bin")
        self.port = port
        self.dir = f"/tmp/flowfabric-vbench-{port}"
        self.data = os.path.join(self.dir, "data")
        # 0.2.0 installs into public and is called unqualified; 0.3.0 lives
        # in its own schema and every call names it.
        self.ns = ns

    def t(self, table):
        return self.ns + table

    def dsn(self, db="postgres"):
        return f"host={self.dir} port={self.port} dbname={db} user=postgres"

    def connect(self, db="postgres"):
        return psycopg.connect(self.dsn(db), autocommit=True)


OLD = Side("0.2.0", os.environ.get("VERSIONS_PREFIX_OLD", os.path.join(REPO, "target", "bench-versions", "pg-0.2.0")),
           54352, "")
CUR = Side(CUR_VERSION, os.environ.get("VERSIONS_PREFIX_CUR",
                                       os.path.join(REPO, "target", "bench-versions", f"pg-{CUR_VERSION}")),
           54353, "flowfabric.")
SIDES = (OLD, CUR)

SERVER_CONF = {                     # the same for both clusters (port and socket aside)
    "listen_addresses": "''",
    "max_connections": 100,
    "shared_buffers": "'1GB'",
    "fsync": "off",
    "max_wal_size": "'8GB'",
    "checkpoint_timeout": "'30min'",
    "jit": "off",
    "logging_collector": "off",
}

results = {"quick": QUICK, "config": CFG, "runs": []}


def log(msg):
    print(f"[versions {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save():
    os.makedirs(OUT, exist_ok=True)
    with open(JSON_OUT, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True, default=str)


# ---------------------------------------------------------------------------
# clusters
# ---------------------------------------------------------------------------

def as_postgres(cmd):
    # initdb refuses root; the benchmark runs as root, the servers as postgres.
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


def pg_ctl(side, *args, check=True):
    return subprocess.run(as_postgres([f"{side.bin}/pg_ctl", "-D", side.data] + list(args)), check=check,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cluster_stop(side):
    if os.path.exists(os.path.join(side.data, "postmaster.pid")):
        pg_ctl(side, "-m", "fast", "-w", "stop", check=False)


def cluster_start(side):
    cluster_stop(side)
    shutil.rmtree(side.dir, ignore_errors=True)
    os.makedirs(side.dir)
    if os.geteuid() == 0:
        shutil.chown(side.dir, "postgres", "postgres")
    subprocess.run(as_postgres([f"{side.bin}/initdb", "-D", side.data, "-A", "trust", "-U", "postgres", "--no-sync"]),
                   check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(side.data, "postgresql.conf"), "a") as f:
        for k, v in dict(SERVER_CONF, port=side.port, unix_socket_directories=f"'{side.dir}'").items():
            f.write(f"{k} = {v}\n")
    pg_ctl(side, "-l", os.path.join(side.dir, "server.log"), "-w", "-t", "60", "start")


# Objects the workloads need besides the extension, in public of each
# scratch database. 0.2.0 has no one-call flow builder, so the fan-in is
# built there with its incremental API (create the flow, create and add
# every member, stage and apply every edge, tracking the graph revision),
# all in one transaction so that only the root is claimable afterwards.
HELPERS_OLD = """
CREATE FUNCTION vbench_build_fanin(lane text, width int, OUT flow uuid, OUT root text, OUT sink text)
LANGUAGE plpgsql AS $$
DECLARE
    mids text[];
    m text;
    rev bigint;
BEGIN
    flow := gen_random_uuid();
    PERFORM ff_create_flow(flow);
    root := ff_create_execution(lane, flow_id => flow);
    PERFORM ff_add_execution_to_flow(flow, root);
    sink := ff_create_execution(lane, flow_id => flow);
    PERFORM ff_add_execution_to_flow(flow, sink);
    mids := ARRAY(SELECT ff_create_execution(lane, flow_id => flow) FROM generate_series(1, width));
    FOREACH m IN ARRAY mids LOOP
        PERFORM ff_add_execution_to_flow(flow, m);
    END LOOP;
    -- Staging checks the revision it is given; read it rather than assume
    -- how adds count.
    SELECT graph_revision INTO rev FROM ff_flow_core WHERE flow_id = flow;
    FOREACH m IN ARRAY mids LOOP
        DECLARE e1 uuid := gen_random_uuid(); e2 uuid := gen_random_uuid();
        BEGIN
            rev := ff_stage_dependency_edge(flow, e1, root, m, rev);
            PERFORM ff_apply_dependency_to_child(flow, e1, m);
            rev := ff_stage_dependency_edge(flow, e2, m, sink, rev);
            PERFORM ff_apply_dependency_to_child(flow, e2, sink);
        END;
    END LOOP;
END $$;
"""


def fresh_db(side, name):
    with side.connect() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')
    with side.connect(name) as c:
        c.execute("CREATE EXTENSION flowfabric")
        if side is OLD:
            c.execute(HELPERS_OLD)
    return name


def drop_db(side, name):
    with side.connect() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def q1(side, db, sql, args=None):
    with side.connect(db) as c:
        return c.execute(sql, args).fetchone()


def settle(side, db):
    """VACUUM ANALYZE (the whole scratch database: the two versions keep
    their state in different sets of tables) and CHECKPOINT, so every run
    starts from the same state."""
    with side.connect(db) as c:
        c.execute("VACUUM ANALYZE")
        c.execute("CHECKPOINT")


# ---------------------------------------------------------------------------
# CPU accounting. The machine is shared (2 cores): for every run, how much
# CPU did processes other than this benchmark (both clusters, pgbench, this
# script) use? Backends that exit are reaped by their postmaster, so their
# time shows up in its cutime/cstime: nothing of ours is missed.
# ---------------------------------------------------------------------------

HZ = os.sysconf("SC_CLK_TCK")
QUIET_LEFT = {"s": CFG["quiet_budget_s"]}
RETRIES_LEFT = {"n": CFG["retry_pairs"]}


def cpu_snapshot():
    """(busy CPU seconds of the whole machine, CPU seconds of this benchmark)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / HZ
    ours = sum(postmaster_cpu_seconds(side.data) for side in SIDES)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = os.times()
    return busy, ours + ru.ru_utime + ru.ru_stime + me.user + me.system


def foreign_cores(before, after, seconds):
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / seconds) if seconds > 0 else 0.0


def wait_for_quiet():
    """Waits, briefly and within a budget for the whole run, until other
    processes use under QUIET_CORES. Returns (seconds waited, load seen)."""
    waited = 0.0
    while True:
        a = cpu_snapshot()
        time.sleep(0.5)
        load = foreign_cores(a, cpu_snapshot(), 0.5)
        if load <= QUIET_CORES or waited >= CFG["quiet_wait_s"] or QUIET_LEFT["s"] <= 0:
            return round(waited, 1), round(load, 2)
        waited += 0.5
        QUIET_LEFT["s"] -= 0.5


class Meter:
    """Measures one run: elapsed time, other CPU, and what the server did
    (rows written, WAL, buffer hits: from pg_stat_database / pg_stat_wal, so
    work per operation can be compared between versions)."""

    STATS = ("SELECT d.xact_commit, d.tup_inserted, d.tup_updated, d.tup_deleted, d.blks_hit + d.blks_read, "
             "w.wal_records, w.wal_bytes FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = %s")

    def __init__(self, side, db):
        self.side, self.db = side, db

    def _stats(self):
        with self.side.connect(self.db) as c:
            c.execute("SELECT pg_stat_clear_snapshot()")
            return [float(x) for x in c.execute(self.STATS, (self.db,)).fetchone()]

    def __enter__(self):
        self.waited, self.load_before = wait_for_quiet()
        self.s0 = self._stats()
        self.c0, self.t0 = cpu_snapshot(), time.perf_counter()
        self.server0 = postmaster_cpu_seconds(self.side.data)
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.t0
        self.foreign = foreign_cores(self.c0, cpu_snapshot(), self.elapsed)
        # Backends flush their counters when they exit; give the last ones a
        # moment (and the postmaster time to reap them, so their CPU counts).
        time.sleep(0.2)
        self.server = postmaster_cpu_seconds(self.side.data) - self.server0
        s1 = self._stats()
        self.delta = dict(zip(("xacts", "ins", "upd", "del", "blks", "wal_records", "wal_bytes"),
                              (b - a for a, b in zip(self.s0, s1))))
        return False

    def fill(self, r, ops):
        # CPU times tick at 100 Hz: a run under a second cannot be judged.
        r["foreign_cores"] = round(self.foreign, 3) if self.elapsed >= 1.0 else None
        r["quiet_wait_s"], r["foreign_before"] = self.waited, self.load_before
        if ops:
            d = self.delta
            r["per_op"] = {"rows_written": round((d["ins"] + d["upd"] + d["del"]) / ops, 2),
                           "inserted": round(d["ins"] / ops, 2), "updated": round(d["upd"] / ops, 2),
                           "deleted": round(d["del"] / ops, 2), "buffers": round(d["blks"] / ops, 1),
                           "wal_records": round(d["wal_records"] / ops, 2), "wal_bytes": round(d["wal_bytes"] / ops),
                           "commits": round(d["xacts"] / ops, 2),
                           # CPU ticks at 100 Hz: +-10 ms over the run.
                           "server_cpu_us": round(self.server * 1e6 / ops)}
        return r


# ---------------------------------------------------------------------------
# pgbench scripts: one template per workload, rendered per version, so the
# shapes are identical and only the schema qualification differs.
# ---------------------------------------------------------------------------

TEMPLATES = {
    # Two transactions (autocommit): claim, then complete with the grant.
    "cycle": ("SELECT execution_id AS eid, grant_key AS gk FROM {ns}ff_claim_for_worker(:lane, 'w' || :client_id, "
              "'w' || :client_id || '-1') \\gset\n"
              "SELECT {ns}ff_complete_execution(:eid, :gk);\n"),
    "usage": ("\\set b random(1, :budgets)\n"
              "SELECT * FROM {ns}ff_report_usage('b' || :b, '{{\"tokens\": 1}}');\n"),
    # A claim that finds nothing (the sink, still blocked, is the only
    # member left) sleeps 1 ms instead of spinning.
    "fanin": ("SELECT count(*) AS got, coalesce(max(execution_id), '') AS eid, coalesce(max(grant_key), '') AS gk "
              "FROM {ns}ff_claim_for_worker(:lane, 'w' || :client_id, 'w' || :client_id || '-1') \\gset\n"
              "\\if :got\n"
              "SELECT {ns}ff_complete_execution(:eid, :gk);\n"
              "\\else\n"
              "\\sleep 1 ms\n"
              "\\endif\n"),
}


def script(side, name):
    d = os.path.join(SCRIPTS, side.version)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{name}.sql")
    with open(path, "w") as f:
        f.write(TEMPLATES[name].format(ns=side.ns))
    return path


def pgbench_cmd(side, db, name, clients, seconds, defines):
    cmd = [f"{side.bin}/pgbench", "-n", "-M", "prepared", "-f", script(side, name),
           "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds)]
    for k, v in defines.items():
        cmd += ["-D", f"{k}={v}"]
    return cmd + ["-h", side.dir, "-p", str(side.port), "-U", "postgres", db]


def write_log(label, cmd, out):
    os.makedirs(LOGS, exist_ok=True)
    with open(os.path.join(LOGS, f"{label}.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n\n" + out)


def pgbench(side, db, name, clients, seconds, defines, label):
    cmd = pgbench_cmd(side, db, name, clients, seconds, defines)
    with Meter(side, db) as m:
        p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    write_log(label, cmd, out)

    def num(pattern):
        x = re.search(pattern, out)
        return float(x.group(1)) if x else None
    r = {"rate": num(r"tps = ([0-9.]+) \(without initial connection time\)"),
         "lat_ms": num(r"latency average = ([0-9.]+) ms"),
         "processed": num(r"number of transactions actually processed: ([0-9]+)"),
         "failed": num(r"number of failed transactions: ([0-9]+)"),
         "rc": p.returncode, "aborted": "aborted" in out}
    r["valid"] = p.returncode == 0 and not r["aborted"] and bool(r["rate"])
    return m.fill(r, r["processed"])


# ---------------------------------------------------------------------------
# repetitions: both versions per repetition, alternating which goes first
# ---------------------------------------------------------------------------

def paired(label, reps, run):
    """run(side, rep) -> result dict with `rate` and `foreign_cores`.
    Returns {version: [result per rep]}. A repetition in which either run
    saw more than CONTENDED cores of other CPU is repeated (whole pair, same
    order) while the retry budget lasts; the pair with less other CPU is kept."""
    out = {s.version: [] for s in SIDES}
    for i in range(reps):
        order = SIDES if i % 2 == 0 else SIDES[::-1]
        best, attempts = None, 0
        while True:
            attempts += 1
            pair = {s.version: run(s, i) for s in order}
            worst = max((r.get("foreign_cores") or 0) for r in pair.values())
            if best is None or worst < best[0]:
                best = (worst, pair)
            if worst <= CONTENDED or RETRIES_LEFT["n"] <= 0 or attempts >= 3:
                break
            RETRIES_LEFT["n"] -= 1
            log(f"{label} rep {i + 1}: other processes used {worst:.2f} cores; measuring the pair again")
        for v, r in best[1].items():
            r["attempts"], r["rep"], r["first"] = attempts, i + 1, order[0].version
            out[v].append(r)
            results["runs"].append({"label": label, "version": v, "rep": i + 1, "rate": r.get("rate"),
                                    "foreign_cores": r.get("foreign_cores")})
        log(f"{label} rep {i + 1} ({order[0].version} first): "
            + ", ".join(f"{v} {best[1][v].get('rate') or 0:,.0f}/s (other CPU {best[1][v].get('foreign_cores')})"
                        for v in out))
    return out


def summarize(label, runs_by_version, extra=None):
    """Medians per version, the ratio current / 0.2.0 and the verdict."""
    row = {"label": label}
    for v, runs in runs_by_version.items():
        rates = [r["rate"] for r in runs if r.get("rate")]
        fc = [r.get("foreign_cores") for r in runs]
        per_op = {}
        for k in (runs[0].get("per_op") or {}):
            vals = [r["per_op"][k] for r in runs if r.get("per_op")]
            per_op[k] = round(statistics.median(vals), 2) if vals else None
        row[v] = {"rate": statistics.median(rates) if rates else None, "all_rates": rates,
                  "lat_ms": statistics.median([r["lat_ms"] for r in runs if r.get("lat_ms")] or [0]) or None,
                  "foreign_cores": fc, "valid": all(r.get("valid") for r in runs),
                  "attempts": [r.get("attempts", 1) for r in runs], "per_op": per_op}
        for k in (extra or []):
            row[v][k] = [r.get(k) for r in runs]
    o, c = row[OLD.version]["rate"], row[CUR.version]["rate"]
    row["ratio"] = round(c / o, 3) if o and c else None
    # The same ratio within each repetition (both runs back to back): shows
    # how stable the comparison was.
    pairs = zip(runs_by_version[OLD.version], runs_by_version[CUR.version])
    row["paired_ratios"] = [round(b["rate"] / a["rate"], 3) if a.get("rate") and b.get("rate") else None
                            for a, b in pairs]
    row["valid"] = row[OLD.version]["valid"] and row[CUR.version]["valid"]
    row["contended"] = any((x or 0) > CONTENDED for v in runs_by_version for x in row[v]["foreign_cores"])
    row["verdict"] = ("invalid" if not row["valid"] or row["ratio"] is None
                      else "met" if row["ratio"] >= TOLERANCE else "missed")
    log(f"{label}: 0.2.0 {o or 0:,.0f}/s, {CUR.version} {c or 0:,.0f}/s, ratio {row['ratio']} -> {row['verdict']}")
    return row


# ---------------------------------------------------------------------------
# fills
# ---------------------------------------------------------------------------

def fill(side, db, lane, n):
    """Queues n executions in `lane` through each version's own API, in
    statements of FILL_CHUNK rows. 0.2.0 has only the one-row create; the
    current version's batch create is used there because many one-row
    creates in one transaction slow down while its metrics are on. The rows
    are alike either way: no flow, no budget, priority 0."""
    with side.connect(db) as c:
        done = 0
        while done < n:
            k = min(FILL_CHUNK, n - done)
            if side is OLD:
                c.execute("SELECT count(ff_create_execution(%s)) FROM generate_series(1, %s)", (lane, k))
            else:
                c.execute("SELECT cardinality(flowfabric.ff_create_executions(%s, array_fill(NULL::jsonb, ARRAY[%s])))",
                          (lane, k))
            done += k


def queued(side, db, lane):
    return q1(side, db, f"SELECT count(*) FROM {side.t('ff_exec_core')} WHERE lane_id = %s "
                        "AND lifecycle_phase = 'runnable'", (lane,))[0]


# ---------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------

def warm_up(side, db, clients):
    """Runs cycles for WARM_UP_S, unmeasured, on a fresh database. Both
    versions plan each statement once per session: a first run would plan
    against empty ff_attempt and ff_claim_grant tables, and 0.2.0 then keeps
    sequential scans of them for the whole run (its own bug, fixed in 0.3.0
    and not what this row compares). Afterwards the tables have rows and
    statistics, as in a system that has been running."""
    fill(side, db, "bench", 8_000 * WARM_UP_S)   # more than either version claims in that time
    settle(side, db)
    cmd = pgbench_cmd(side, db, "cycle", clients, WARM_UP_S, {"lane": "bench"})
    p = subprocess.run(cmd, capture_output=True, text=True)
    write_log(f"cycle_{side.version}_c{clients}_warmup", cmd, p.stdout + p.stderr)
    settle(side, db)


def workload_cycle():
    secs = CFG["cycle_s"]
    rows = []
    # Rows a run may consume: the fastest rate seen for this side and client
    # count (before the first run, a guess above anything seen on this
    # machine) x the run's length, with margin. The lane is topped up before
    # every run and checked after it: a run that drained it is invalid.
    for clients in CLIENTS:
        dbs = {s.version: fresh_db(s, f"vb_cycle_{clients}") for s in SIDES}
        seen = {s.version: 7_000 for s in SIDES}
        for s in SIDES:
            warm_up(s, dbs[s.version], clients)

        def run(side, i):
            db = dbs[side.version]
            need = int(seen[side.version] * secs * 2) + 2_000   # load here swings rates 1.5x
            have = queued(side, db, "bench")
            t0 = time.perf_counter()
            if have < need:
                fill(side, db, "bench", need - have)
            fill_s = time.perf_counter() - t0
            settle(side, db)
            r = pgbench(side, db, "cycle", clients, secs, {"lane": "bench"},
                        f"cycle_{side.version}_c{clients}_r{i + 1}")
            r["left"] = queued(side, db, "bench")
            r["valid"] = r["valid"] and r["left"] > 0
            r["filled"], r["fill_s"] = max(0, need - have), round(fill_s, 2)
            # The first run replaces the guess; later ones only raise it.
            seen[side.version] = max(seen[side.version] if i else 0, r["rate"] or 0)
            log(f"  cycle {side.version} c={clients}: filled {r['filled']:,} rows in {fill_s:.1f} s, {r['left']:,} left")
            # Leave nothing for autovacuum to do during the other side's run.
            settle(side, db)
            return r
        runs = paired(f"cycle c={clients}", CFG["reps"], run)
        for s in SIDES:
            drop_db(s, dbs[s.version])
        rows.append(dict(summarize(f"cycle c={clients}", runs, extra=["left"]), clients=clients))
        save()
    results["cycle"] = {"seconds": secs, "reps": CFG["reps"], "rows": rows}
    save()


def workload_usage():
    secs = CFG["usage_s"]
    dbs = {}
    for s in SIDES:
        dbs[s.version] = fresh_db(s, "vb_usage")
        with s.connect(dbs[s.version]) as c:
            for i in range(1, BUDGETS + 1):
                c.execute(f"SELECT {s.ns}ff_create_budget(%s, '{{tokens}}', '{{1000000000000000}}', '{{0}}')",
                          (f"b{i}",))
                # The usage row exists before the clock starts.
                c.execute(f"SELECT * FROM {s.ns}ff_report_usage(%s, '{{\"tokens\": 0}}')", (f"b{i}",))
    rows = []
    made = {s.version: 0 for s in SIDES}
    for clients in CLIENTS:
        def run(side, i):
            db = dbs[side.version]
            settle(side, db)
            r = pgbench(side, db, "usage", clients, secs, {"budgets": BUDGETS},
                        f"usage_{side.version}_c{clients}_r{i + 1}")
            made[side.version] += int(r["processed"] or 0)
            return r
        runs = paired(f"usage c={clients}", CFG["reps"], run)
        rows.append(dict(summarize(f"usage c={clients}", runs), clients=clients))
        save()
    # Sanity: every report applied (1 token each), none refused.
    check = {}
    for s in SIDES:
        with s.connect(dbs[s.version]) as c:
            total = c.execute(f"SELECT sum(current_value) FROM {s.t('ff_budget_usage')}").fetchone()[0]
            breaches = c.execute(f"SELECT sum(breach_count) FROM {s.t('ff_budget_policy')}").fetchone()[0]
        # Every report made (re-measured pairs included) added one token.
        check[s.version] = {"usage_total": int(total or 0), "reports_made": made[s.version],
                            "breaches": int(breaches or 0),
                            # pgbench may leave a report in flight at the end of -T uncounted.
                            "ok": 0 <= int(total or 0) - made[s.version] <= 64 and not breaches}
        drop_db(s, dbs[s.version])
    results["usage"] = {"seconds": secs, "reps": CFG["reps"], "budgets": BUDGETS, "rows": rows, "check": check}
    save()


def build_fanin(side, db):
    """Builds root -> width middles -> sink in lane 'fanin'; returns
    (flow, root, sink, seconds)."""
    t0 = time.perf_counter()
    if side is OLD:
        flow, root, sink = q1(side, db, "SELECT * FROM vbench_build_fanin('fanin', %s)", (FANIN_WIDTH,))
    else:
        spec = {"nodes": [{"name": "root", "lane": "fanin"}, {"name": "sink", "lane": "fanin"}]
                + [{"name": f"m{j}", "lane": "fanin"} for j in range(FANIN_WIDTH)],
                "edges": [{"from": "root", "to": f"m{j}"} for j in range(FANIN_WIDTH)]
                + [{"from": f"m{j}", "to": "sink"} for j in range(FANIN_WIDTH)]}
        ans = q1(side, db, "SELECT flowfabric.ff_submit_flow(%s)", (Jsonb(spec),))[0]
        flow, root, sink = ans["flow_id"], ans["executions"]["root"], ans["executions"]["sink"]
    return str(flow), root, sink, time.perf_counter() - t0


def fanin_run(side, clients, i):
    db = fresh_db(side, f"vb_fanin_{clients}")
    flow, root, sink, build_s = build_fanin(side, db)
    uuid = lambda eid: eid.split("}:", 1)[1]      # execution ids read "{partition}:uuid"
    core = side.t("ff_exec_core")
    with side.connect(db) as c:
        got = c.execute(f"SELECT execution_id, grant_key FROM {side.ns}ff_claim_for_worker('fanin', 'root', 'root-1')"
                        ).fetchone()
        assert got and got[0] == root, (side.version, got, root)
        t0 = time.perf_counter()
        c.execute(f"SELECT {side.ns}ff_complete_execution(%s, %s)", got)   # fans out to the middles
        root_s = time.perf_counter() - t0
        eligible = c.execute(f"SELECT count(*) FROM {core} WHERE lane_id = 'fanin' "
                             "AND eligibility_state = 'eligible_now'").fetchone()[0]
    settle(side, db)
    # pgbench runs until the sink's group fired (polled), then is stopped.
    cmd = pgbench_cmd(side, db, "fanin", clients, 300, {"lane": "fanin"})
    label = f"fanin_{side.version}_c{clients}_r{i + 1}"
    finished = False
    with Meter(side, db) as m:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with side.connect(db) as c:
            deadline = time.time() + 300
            while time.time() < deadline and p.poll() is None:
                if c.execute(f"SELECT eligibility_state <> 'blocked_by_dependencies' FROM {core} "
                             f"WHERE execution_id = %s", (uuid(sink),)).fetchone()[0]:
                    finished = True
                    break
                time.sleep(0.02)
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        out = p.communicate()[0]
    write_log(label, cmd, out)
    with side.connect(db) as c:
        # Server-side stamps: first claim of a middle to the last middle's
        # completion (whose transaction fired the sink's group).
        done, ms = c.execute(
            f"SELECT count(*) FILTER (WHERE public_state = 'completed'), max(terminal_at_ms) - min(started_at_ms) "
            f"FROM {core} WHERE flow_id = %s AND execution_id NOT IN (%s, %s)",
            (flow, uuid(root), uuid(sink))).fetchone()
        group = c.execute(f"SELECT group_state FROM {side.t('ff_edge_group')} WHERE flow_id = %s "
                          "AND downstream_eid = %s", (flow, uuid(sink))).fetchone()
    drop_db(side, db)
    r = {"rate": FANIN_WIDTH / (ms / 1000) if ms else None, "ms": ms, "completed": done, "finished": finished,
         "build_s": round(build_s, 3), "root_complete_ms": round(root_s * 1000, 1), "eligible_after_root": eligible,
         "sink_group": group[0] if group else None}
    r["valid"] = finished and done == FANIN_WIDTH and r["sink_group"] == "satisfied" and eligible == FANIN_WIDTH
    # The drain is short (often under a second): per-op figures divide the
    # server's counters by the 1,000 middles; other CPU needs >= 1 s to judge.
    return m.fill(r, FANIN_WIDTH)


def workload_fanin():
    rows = []
    for clients in CLIENTS:
        runs = paired(f"fanin c={clients}", CFG["fanin_reps"], lambda side, i: fanin_run(side, clients, i))
        rows.append(dict(summarize(f"fanin c={clients}", runs, extra=["ms", "build_s", "root_complete_ms"]),
                         clients=clients))
        save()
    results["fanin"] = {"width": FANIN_WIDTH, "reps": CFG["fanin_reps"], "rows": rows}
    save()


# ---------------------------------------------------------------------------
# metadata and checks
# ---------------------------------------------------------------------------

def loaded_library(side, db):
    """Which flowfabric.so the backend mapped after a call (read from
    /proc/<pid>/maps): proof that each cluster runs its own version."""
    with side.connect(db) as c:
        c.execute(f"SELECT {side.ns}ff_claim_for_worker('nothing-here', 'probe', 'probe-1')").fetchall()
        pid = c.info.backend_pid
        try:
            with open(f"/proc/{pid}/maps") as f:
                libs = sorted({ln.split()[-1] for ln in f if ln.rstrip().endswith("flowfabric.so")})
        except OSError:
            libs = []
    return libs


def meta():
    def read(path):
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""
    cpu = re.search(r"model name\s*:\s*(.*)", read("/proc/cpuinfo"))
    mem = re.search(r"MemTotal:\s*(\d+)", read("/proc/meminfo"))
    sides = {}
    for s in SIDES:
        db = fresh_db(s, "vb_meta")
        ext = q1(s, db, "SELECT extversion, extnamespace::regnamespace::text FROM pg_extension "
                        "WHERE extname = 'flowfabric'")
        libs = loaded_library(s, db)
        drop_db(s, db)
        with s.connect() as c:
            version = c.execute("SELECT version()").fetchone()[0]
            settings = dict(c.execute(
                "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings WHERE name = ANY(%s)",
                (["shared_buffers", "fsync", "synchronous_commit", "max_wal_size", "checkpoint_timeout", "jit",
                  "autovacuum", "max_connections", "work_mem"],)).fetchall())
        if ext[0] != s.version or not libs or not all(lib.startswith(s.prefix + "/") for lib in libs):
            sys.exit(f"versions: cluster {s.port} runs flowfabric {ext[0]} from {libs}, expected {s.version} "
                     f"from {s.prefix}")
        sides[s.version] = {"port": s.port, "prefix": os.path.relpath(s.prefix, REPO), "ext_version": ext[0],
                            "schema": ext[1], "library": [os.path.relpath(x, REPO) for x in libs],
                            "pg_version": version, "settings": settings}
    git = lambda *a: subprocess.run(["git", "-C", REPO] + list(a), capture_output=True, text=True).stdout.strip()
    pgbench_version = subprocess.run([f"{CUR.bin}/pgbench", "--version"], capture_output=True, text=True).stdout.strip()
    results["meta"] = {
        "nproc": os.cpu_count(), "mem_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "cpu": cpu.group(1).strip() if cpu else platform.processor(), "kernel": platform.release(),
        "pgbench": pgbench_version, "sides": sides,
        "old_commit": os.environ.get("VERSIONS_OLD_COMMIT", "93bb79e"),
        "cur_built_from": os.environ.get("VERSIONS_CUR_BUILT_FROM", git("rev-parse", "--short", "HEAD")),
        "build_s": int(os.environ.get("VERSIONS_BUILD_S", "0")),
        "server_conf": {k: str(v).strip("'") for k, v in SERVER_CONF.items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "clients": CLIENTS,
    }
    save()


WORKLOADS = [("cycle", workload_cycle), ("usage", workload_usage), ("fanin", workload_fanin)]


def main():
    os.makedirs(LOGS, exist_ok=True)
    for f in os.listdir(LOGS):
        os.remove(os.path.join(LOGS, f))
    t_start = time.time()
    log(f"mode: {'quick' if QUICK else 'full'}; 0.2.0 on port {OLD.port}, {CUR.version} on port {CUR.port}")
    load0 = os.getloadavg()
    run0 = None
    try:
        for s in SIDES:
            cluster_start(s)
        run0 = cpu_snapshot()
        meta()
        for name, fn in WORKLOADS:
            if ONLY and name not in ONLY:
                continue
            t0 = time.time()
            log(f"--- {name}")
            fn()
            results.setdefault("timing_s", {})[name] = round(time.time() - t0, 1)
            save()
    finally:
        judged = [r["foreign_cores"] for r in results["runs"] if r.get("foreign_cores") is not None]
        results["total_s"] = round(time.time() - t_start, 1)
        results["conditions"] = {
            "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "foreign_cores_whole_run": round(foreign_cores(run0, cpu_snapshot(), time.time() - t_start), 2)
            if run0 else None,
            "runs": len(results["runs"]), "runs_judged": len(judged),
            "runs_contended": sum(1 for x in judged if x > CONTENDED),
            "foreign_cores_median": round(statistics.median(judged), 2) if judged else None,
            "foreign_cores_max": max(judged) if judged else None,
            "quiet_wait_budget_left_s": QUIET_LEFT["s"], "pair_retries_left": RETRIES_LEFT["n"]}
        save()
        for s in SIDES:
            cluster_stop(s)
        log(f"clusters stopped; {results['total_s']} s")
    report(results)
    log(f"wrote {os.path.relpath(JSON_OUT, REPO)} and {os.path.relpath(MD_OUT, REPO)}")


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def report(res):
    from versions_report import render     # bench/versions_report.py
    with open(MD_OUT, "w") as f:
        f.write(render(res))


if __name__ == "__main__":
    if sys.argv[1:] == ["--report"]:
        with open(JSON_OUT) as f:
            report(json.load(f))
        sys.exit(0)
    sys.exit(main())

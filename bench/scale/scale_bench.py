#!/usr/bin/env python3
"""Scale-out benchmark: FlowFabric's scenario 1 through the PL/Proxy router
and over two shards (bench/scale/run.sh runs it; results in
bench/scale/RESULTS-scale.md and bench/scale/out/results.json).

Scenario 1: 10,000 tasks queued through the real API, 16 workers with one
connection each, claim + complete, 5 ms sleep when a claim finds nothing;
throughput = tasks / drain wall time (clock start to the last completion),
latency per task = claim start to completion end. Like bench/bench.py, every
run gets fresh databases, filled, vacuumed and checkpointed before the
clock starts, and records the CPU that processes outside the run used.

Setups (each repeated, the median run reported):
  direct        16 workers -> one server
  router        16 workers -> router -> the same one server
  1 shard/1 core   one server pinned to CPU 0 (taskset), workers direct
  2 shards/2 cores two servers pinned to CPUs 0 and 1, 8 workers on each
  2 shards/router  the same two pinned servers, 16 workers through the router

Environment: SCALE_TASKS (10000), SCALE_WORKERS (16), SCALE_REPS (3).
"""
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time

import psycopg
from psycopg.types.json import Jsonb

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "router"))
from shardkit import Server, machine_busy_seconds, make_router, make_shard  # noqa: E402

TASKS = int(os.environ.get("SCALE_TASKS", "10000"))
WORKERS = int(os.environ.get("SCALE_WORKERS", "16"))
REPS = int(os.environ.get("SCALE_REPS", "3"))
SLEEP_S = 0.005
LANE = "bench"
OUT = os.path.join(HERE, "out")
CONF = {"shared_buffers": "'512MB'", "max_wal_size": "'4GB'", "checkpoint_timeout": "'30min'"}

SHARD_A = Server("bench-a", 54363, conf=CONF, db="postgres")
SHARD_B = Server("bench-b", 54364, conf=CONF, db="postgres")
ROUTER = Server("bench-router", 54365, conf=CONF, db="postgres")


def log(msg):
    print(f"[scale-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pin(server, cpus):
    """Sets the CPU affinity of a running server's postmaster and children
    (new backends inherit the postmaster's)."""
    with open(os.path.join(server.data, "postmaster.pid")) as f:
        pm = f.readline().strip()
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, pm], check=True, stdout=subprocess.DEVNULL)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == pm:
                        subprocess.run(["taskset", "-p", "-c", cpus, d], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            except OSError:
                pass


def fresh_db(server, name, shard):
    with server.connect("postgres") as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')
    s = Server(server.name, server.port, db=name)
    if shard:
        make_shard(s)
    return s


def fill(conn, n, flow_id=None):
    """Queues n tasks on LANE through ff_create_executions, 1,000 a call."""
    for i in range(0, n, 1000):
        k = min(1000, n - i)
        conn.execute("SELECT flowfabric.ff_create_executions(%s, %s, flow_id => %s)",
                     (LANE, [Jsonb({"i": i + j}) for j in range(k)], flow_id))


def settle(shard):
    with shard.connect() as c:
        c.execute("VACUUM ANALYZE")
        c.execute("CHECKPOINT")


def worker(idx, dsn, start, done_count, release, out):
    """One worker: claim, complete the claimed task, sleep 5 ms on an empty
    claim; stops when all tasks are done. Reports (claim start, claim end,
    done) per task, seconds on the shared monotonic clock."""
    conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=0)
    claim = "SELECT execution_id, grant_key FROM flowfabric.ff_claim_for_worker(%s, %s, %s)"
    complete = "SELECT flowfabric.ff_complete_execution(%s, %s)"
    me = (LANE, f"w{idx}", f"w{idx}-{os.getpid()}")
    conn.execute(claim, ("warm-up-lane",) + me[1:])   # connect the router to the shards before the clock
    out.put(("ready", idx))
    while start.value == 0:
        time.sleep(0.001)
    tasks, empty = [], 0
    while done_count.value < TASKS:
        t0 = time.monotonic()
        row = conn.execute(claim, me).fetchone()
        t1 = time.monotonic()
        if row is None:
            empty += 1
            time.sleep(SLEEP_S)
            continue
        conn.execute(complete, row)
        tasks.append((t0, t1, time.monotonic()))
        with done_count.get_lock():
            done_count.value += 1
    cpu = sum(os.times()[:2])
    out.put(("done", idx, tasks, empty, cpu))
    release.wait()      # keep the connections (and their backends' CPU counters) until measured
    conn.close()


def wait_for_quiet(servers, limit_s=20, quiet_cores=0.3):
    """Waits (bounded) until processes outside the benchmark use under
    `quiet_cores`, as bench/bench.py does; returns (seconds waited, load)."""
    waited = 0.0
    while True:
        b0, o0 = machine_busy_seconds(), sum(s.cpu_seconds() for s in servers)
        time.sleep(1.0)
        load = max(0.0, (machine_busy_seconds() - b0) - (sum(s.cpu_seconds() for s in servers) - o0))
        if load <= quiet_cores or waited >= limit_s:
            return waited, load
        waited += 1.0


def drain(dsns, servers, label):
    """Runs the workers (dsns[i] for worker i) until every task is done."""
    start, done_count = mp.Value("d", 0.0), mp.Value("i", 0)
    release, out = mp.Event(), mp.Queue()
    procs = [mp.Process(target=worker, args=(i, dsns[i], start, done_count, release, out)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    for _ in procs:
        assert out.get(timeout=60)[0] == "ready"
    cpu0, busy0 = {s.name: s.cpu_seconds() for s in servers}, machine_busy_seconds()
    t0 = time.monotonic()
    start.value = t0
    results = [out.get(timeout=600) for _ in procs]
    busy1 = machine_busy_seconds()
    cpu1 = {s.name: s.cpu_seconds() for s in servers}
    release.set()
    for p in procs:
        p.join()
    tasks = [t for r in results for t in r[2]]
    wall = max(t[2] for t in tasks) - t0
    cycle = sorted((t[2] - t[0]) * 1000 for t in tasks)
    pct = lambda q: cycle[min(len(cycle) - 1, int(q * len(cycle)))]
    server_cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    client_cpu = sum(r[4] for r in results)
    ours = sum(server_cpu.values()) + client_cpu
    r = {"label": label, "tasks": len(tasks), "wall_s": wall, "ops_per_s": len(tasks) / wall,
         "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "mean_ms": statistics.mean(cycle),
         "empty_claims": sum(r[3] for r in results), "server_cpu_s": server_cpu, "client_cpu_s": client_cpu,
         "other_cores": max(0.0, (busy1 - busy0) - ours) / wall,
         "server_cpu_us_per_task": sum(v for k, v in server_cpu.items() if k != ROUTER.name) / len(tasks) * 1e6,
         "router_cpu_us_per_task": server_cpu.get(ROUTER.name, 0) / len(tasks) * 1e6}
    r["valid"] = len(tasks) == TASKS
    return r


def setup_run(kind, rep):
    """Fresh databases for one run; returns (worker dsns, servers measured)."""
    tag = f"s1_{kind.replace('-', '_')}_{rep}"
    user = " user=postgres"
    if kind in ("direct", "one-core"):
        a = fresh_db(SHARD_A, tag, shard=True)
        with a.connect() as c:
            fill(c, TASKS)
        settle(a)
        return [a.connstr() + user] * WORKERS, [SHARD_A]
    if kind == "two-cores":
        shards = [fresh_db(SHARD_A, tag, True), fresh_db(SHARD_B, tag, True)]
        for s in shards:
            with s.connect() as c:
                fill(c, TASKS // 2)
            settle(s)
        return [shards[i % 2].connstr() + user for i in range(WORKERS)], [SHARD_A, SHARD_B]
    # Through the router: one shard owning every slot, or two owning half each.
    shards = [fresh_db(SHARD_A, tag, True)] + ([fresh_db(SHARD_B, tag, True)] if kind == "two-router" else [])
    router = fresh_db(ROUTER, tag, shard=False)
    ranges = {shards[0].name: (0, 255)} if len(shards) == 1 else {shards[0].name: (0, 127), shards[1].name: (128, 255)}
    make_router(router, shards, ranges)
    with router.connect() as c:
        for s in shards:   # seeded through the router, spread by placement flow ids
            place = c.execute("SELECT flowfabric_router.placement_flow_id(%s)", (s.name,)).fetchone()[0]
            fill(c, TASKS // len(shards), place)
    for s in shards:
        settle(s)
    return [router.connstr() + user] * WORKERS, [ROUTER] + [SHARD_A, SHARD_B][:len(shards)]


SETUPS = [  # (kind, label, CPU pinning of A, B, router)
    ("direct", "one server, direct", "0-1", "0-1", "0-1"),
    ("router", "one server, through the router", "0-1", "0-1", "0-1"),
    ("one-core", "1 shard on 1 core (CPU 0), direct", "0", "1", "0-1"),
    ("two-cores", "2 shards on 2 cores (CPU 0, CPU 1), 8 workers each, direct", "0", "1", "0-1"),
    ("two-router", "2 shards on 2 cores (CPU 0, CPU 1), through the router", "0", "1", "0-1"),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    started = time.time()
    servers = [SHARD_A, SHARD_B, ROUTER]
    runs = {kind: [] for kind, *_ in SETUPS}
    try:
        for s in servers:
            s.init().start()
        for rep in range(REPS):
            for kind, label, ca, cb, cr in SETUPS:
                pin(SHARD_A, ca), pin(SHARD_B, cb), pin(ROUTER, cr)
                dsns, measured_servers = setup_run(kind, rep)
                waited, load = wait_for_quiet(servers)
                r = drain(dsns, measured_servers, label)
                r["waited_for_quiet_s"], r["load_before"] = waited, load
                runs[kind].append(r)
                log(f"{label} #{rep + 1}: {r['ops_per_s']:.0f} tasks/s, p50/p95/p99 "
                    f"{r['p50_ms']:.1f}/{r['p95_ms']:.1f}/{r['p99_ms']:.1f} ms, other load {r['other_cores']:.2f} cores")
                for s in servers:   # drop the run's databases
                    with s.connect("postgres") as c:
                        c.execute(f'DROP DATABASE IF EXISTS "s1_{kind.replace("-", "_")}_{rep}" WITH (FORCE)')
    finally:
        for s in servers:
            s.stop()
    results = {"meta": meta(started), "setups": [
        {"kind": kind, "label": label, "pinning": {"a": ca, "b": cb, "router": cr},
         "median": sorted(runs[kind], key=lambda r: r["ops_per_s"])[len(runs[kind]) // 2], "runs": runs[kind]}
        for kind, label, ca, cb, cr in SETUPS]}
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"done in {(time.time() - started) / 60:.1f} min")


def meta(started):
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    git = first(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src", "sql"],
                           capture_output=True, text=True).stdout.strip()
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
            "minutes": (time.time() - started) / 60, "cpu": cpu, "nproc": os.cpu_count(),
            "kernel": platform.release(), "server": first(["/usr/lib/postgresql/15/bin/postgres", "--version"]),
            "plproxy": first(["dpkg-query", "-W", "-f=${Version}", "postgresql-15-plproxy"]),
            "built_from": git + ("+dirty" if dirty else ""), "tasks": TASKS, "workers": WORKERS, "reps": REPS,
            "loadavg_before": open("/proc/loadavg").read().split()[:3]}


if __name__ == "__main__":
    mp.set_start_method("fork")
    main()

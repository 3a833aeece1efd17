"""Private PostgreSQL 15 servers for the sharding demo and benchmark:
flowfabric shards and a PL/Proxy router in front of them.

Each server runs as the `postgres` OS user (initdb refuses root) with a
unix socket only, in /tmp/flowfabric-scale-<name>-<port>; never the
machine's default cluster. A server may be pinned to CPUs (taskset): the
postmaster's affinity is inherited by every backend it starts.
"""
import os
import shutil
import subprocess
import time

import psycopg

PG_BIN = os.environ.get("FF_PG_BIN", "/usr/lib/postgresql/15/bin")
ROUTER_SQL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flowfabric_router.sql")
HZ = os.sysconf("SC_CLK_TCK")


def as_postgres(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


class Server:
    def __init__(self, name, port, cpus=None, conf=None, db="ff"):
        self.name, self.port, self.cpus, self.db = name, port, cpus, db
        self.dir = f"/tmp/flowfabric-scale-{name}-{port}"
        self.data = os.path.join(self.dir, "data")
        self.conf = conf or {}

    def connstr(self, db=None):
        """libpq connection string without a user (PL/Proxy adds the caller's)."""
        return f"host={self.dir} port={self.port} dbname={db or self.db}"

    def connect(self, db=None, autocommit=True):
        return psycopg.connect(self.connstr(db) + " user=postgres", autocommit=autocommit)

    def init(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(as_postgres([f"{PG_BIN}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres",
                                    "--no-sync"]), check=True, stdout=subprocess.DEVNULL)
        settings = {"port": self.port, "listen_addresses": "''", "unix_socket_directories": f"'{self.dir}'",
                    "max_connections": 120, "fsync": "off", "logging_collector": "off", "jit": "off"}
        settings.update(self.conf)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())
        return self

    def start(self):
        cmd = as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "server.log"),
                           "-w", "-t", "60", "start"])
        if self.cpus is not None:
            cmd = ["taskset", "-c", str(self.cpus)] + cmd
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUST_")}
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        if self.db != "postgres":
            with self.connect("postgres") as c:
                c.execute(f'CREATE DATABASE "{self.db}"')
        return self

    def stop(self):
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            subprocess.run(as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cpu_seconds(self):
        return postmaster_cpu_seconds(self.data)


def postmaster_cpu_seconds(data):
    """CPU seconds used so far by the server in `data`: its postmaster, the
    backends it has reaped (the postmaster's children times) and those still
    running."""
    try:
        with open(os.path.join(data, "postmaster.pid")) as f:
            pm = int(f.readline())
    except (OSError, ValueError):
        return 0.0
    total = _stat(pm)[1]
    for d in os.listdir("/proc"):
        if d.isdigit():
            ppid, t = _stat(d)
            if ppid == pm:
                total += t
    return total / HZ


def _stat(pid):
    """(ppid, CPU ticks) of a process: its own user and system time and
    that of the children it has waited for; (None, 0) when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # after the comm: state ppid ... utime(12) stime(13) cutime(14) cstime(15)
        return int(fields[1]), sum(int(x) for x in fields[11:15])
    except (OSError, IndexError, ValueError):
        return None, 0


def machine_busy_seconds():
    """Busy CPU seconds of the whole machine (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / HZ


def make_shard(server):
    with server.connect() as c:
        c.execute("CREATE EXTENSION flowfabric")
        n = c.execute("SELECT num_flow_partitions FROM flowfabric.ff_partition_config").fetchone()[0]
        if n != 256:
            raise RuntimeError(f"{server.name}: the router needs 256 flow partitions, the shard has {n}")


def make_router(router, shards, ranges):
    """Installs the router schema and gives each shard its slot range
    (ranges: {shard name: (lo, hi)})."""
    # The documented install command.
    subprocess.run([f"{PG_BIN}/psql", router.connstr() + " user=postgres", "-q", "-v", "ON_ERROR_STOP=1", "-1",
                    "-f", ROUTER_SQL], check=True, stdout=subprocess.DEVNULL)
    with router.connect() as c:
        for s in shards:
            c.execute("SELECT flowfabric_router.add_shard(%s, %s)", (s.name, s.connstr()))
            lo, hi = ranges[s.name]
            c.execute("SELECT flowfabric_router.assign_slots(%s, %s, %s)", (lo, hi, s.name))
        return c.execute("SELECT shard_name, slots, ranges FROM flowfabric_router.apply_shard_map()").fetchall()


def wait_for(predicate, timeout, interval=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()

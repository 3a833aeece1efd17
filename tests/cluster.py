"""A private PostgreSQL 15 cluster for client tests, demos and benchmarks.

The server runs as the `postgres` user (initdb refuses root) on its own port
and socket directory, never the machine's default cluster.
"""
import os
import shutil
import subprocess
import time

import psycopg

# FF_PG_BIN selects another installation (e.g. a private copy used for development).
PG_BIN = os.environ.get("FF_PG_BIN", "/usr/lib/postgresql/15/bin")


def _as_postgres(cmd):
    """Runs cmd as the postgres user when we are root, else as ourselves."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + cmd
    return cmd


class Cluster:
    def __init__(self, name, port, conf=None, pg_bin=None):
        self.dir = f"/tmp/flowfabric-{name}-{port}"
        self.data = os.path.join(self.dir, "data")
        self.port = port
        self.conf = conf or {}
        self.pg_bin = pg_bin or PG_BIN

    @property
    def host(self):
        return self.dir

    def dsn(self, dbname="postgres", user="postgres", search_path="flowfabric, public"):
        """A libpq connection string. Clients put the extension's schema on
        their search_path, as the README tells users to."""
        options = f" options='-c search_path={search_path.replace(' ', '')}'" if search_path else ""
        return f"host={self.dir} port={self.port} dbname={dbname} user={user}{options}"

    def connect(self, dbname="postgres", user="postgres", autocommit=True, search_path="flowfabric, public"):
        return psycopg.connect(self.dsn(dbname, user, search_path), autocommit=autocommit)

    def init(self):
        self.stop(quiet=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(_as_postgres([f"{self.pg_bin}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres",
                                     "--no-sync"]), check=True, stdout=subprocess.DEVNULL)
        settings = {
            "port": self.port,
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.dir}'",
            "max_connections": 100,
            "fsync": "off",
            "logging_collector": "off",
        }
        settings.update(self.conf)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            for k, v in settings.items():
                f.write(f"{k} = {v}\n")
        return self

    def start(self):
        # A production server has no RUST_BACKTRACE; with it, pgrx appends a
        # Rust backtrace to error details.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUST_")}
        subprocess.run(_as_postgres([f"{self.pg_bin}/pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "server.log"),
                                     "-w", "-t", "60", "start"]), check=True, stdout=subprocess.DEVNULL, env=env)
        return self

    def stop(self, mode="fast", quiet=False):
        if not os.path.exists(os.path.join(self.data, "postmaster.pid")):
            return
        subprocess.run(_as_postgres([f"{self.pg_bin}/pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"]),
                       check=not quiet, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def log(self):
        try:
            with open(os.path.join(self.dir, "server.log")) as f:
                return f.read()
        except OSError:
            return ""

    def create_db(self, name):
        with self.connect() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            c.execute(f'CREATE DATABASE "{name}"')
        with self.connect(name) as c:
            c.execute("CREATE EXTENSION flowfabric")
        return name


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()

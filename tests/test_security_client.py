"""Roles and dump/restore, as separate logins and processes see them. (The
look-alike attack is tests/test_lookalike_client.py; upgrades are
tests/test_upgrade_client.py.)"""
import os
import subprocess
import uuid

import psycopg
import pytest

from ffhelp import build_flow

PG_BIN = "/usr/lib/postgresql/15/bin"


def login(cluster, role, member_of=None):
    with cluster.connect() as c:
        if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            c.execute(f'CREATE ROLE "{role}" LOGIN' + (f" IN ROLE {member_of}" if member_of else ""))
    return role


def denied(conn, sql, args=None):
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(sql, args)


def test_worker_role_can_work_but_not_read_secrets_or_write_tables(cluster, db):
    worker = login(cluster, "ff_test_worker", "flowfabric_worker")
    with cluster.connect(db) as admin:
        admin.execute("SELECT ff_create_budget('b', '{t}', '{10}', '{0}')")
        admin.execute("SELECT ff_create_budget('other-b', '{t}', '{10}', '{0}')")
        theirs = admin.execute("SELECT ff_create_execution('sec', budget_ids => '{b}')").fetchone()[0]
        mine = admin.execute("SELECT ff_create_execution('sec', budget_ids => '{b}')").fetchone()[0]
        _, their_grant = admin.execute(
            "SELECT execution_id, grant_key FROM ff_claim_for_worker('sec', 'other', 'other-1')").fetchone()
        queued = admin.execute("SELECT ff_create_execution('sec-later', budget_ids => '{b}')").fetchone()[0]
    with cluster.connect(db, user=worker) as w:
        eid, grant = w.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('sec', 'w', 'w-1')").fetchone()
        assert eid == mine
        assert w.execute("SELECT ff_verify_grant(%s)", (grant,)).fetchone()[0] == "ok"
        w.execute("SELECT ff_renew_lease(%s, %s, 5000)", (eid, grant))
        w.execute("SELECT * FROM ff_record_spend('b', %s, '{\"t\": 3}', 'k')", (eid,))
        w.execute("SELECT * FROM ff_report_usage('b', '{\"t\": 1}')")
        # Worker calls touch only what they name and hold: no budget is
        # created by reporting to it, no spend lands on made-up or foreign work.
        with pytest.raises(psycopg.errors.NoDataFound, match="made-up"):
            w.execute("SELECT * FROM ff_report_usage('made-up', '{\"t\": 1}')")
        with pytest.raises(psycopg.errors.NoDataFound):
            w.execute("SELECT * FROM ff_record_spend('b', %s, '{\"t\": 1}', 'k2')",
                      ("{fp:7}:" + str(uuid.uuid4()),))
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="does not name budget"):
            w.execute("SELECT * FROM ff_record_spend('other-b', %s, '{\"t\": 1}', 'k3')", (eid,))
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            w.execute("SELECT * FROM ff_record_spend('b', %s, '{\"t\": 1}', 'k4')", (queued,))
        assert w.execute("SELECT ff_get_execution(%s) ->> 'public_state'", (eid,)).fetchone()[0] == "active"
        # No secrets, no tables, no admin functions.
        for sql in ["SELECT secret FROM ff_waitpoint_hmac", "SELECT * FROM ff_exec_core",
                    "SELECT * FROM ff_claim_grant", "SELECT * FROM ff_queue_depth",
                    "UPDATE ff_exec_core SET lifecycle_phase = 'terminal'",
                    "INSERT INTO ff_waitpoint_hmac VALUES ('evil', '\\x00112233445566778899aabbccddeeff', 0, true)",
                    "SELECT ff_rotate_hmac_secret('mine')", "SELECT ff_create_budget('x', '{t}', '{1}', '{0}')",
                    "SELECT ff_create_execution('sec')", "SELECT ff_run_reconcilers()",
                    "SELECT ff_reset_budget('b')", "SELECT ff_cancel_flow(gen_random_uuid(), 'x')"]:
            denied(w, sql)
        # A forged grant (right shape, wrong key) and another worker's execution are refused.
        forged = grant[:-64] + "0" * 64
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
            w.execute("SELECT ff_complete_execution(%s, %s)", (eid, forged))
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
            w.execute("SELECT ff_complete_execution(%s, %s)", (theirs, grant))
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
            w.execute("SELECT ff_complete_execution(%s, %s)", (eid, their_grant))
        w.execute("SELECT ff_complete_execution(%s, %s, '{\"ok\": 1}')", (eid, grant))
    with cluster.connect(db) as admin:
        assert admin.execute("SELECT public_state FROM ff_exec_core WHERE current_worker_id = 'other'").fetchone()[0] \
            == "active"
        assert admin.execute("SELECT count(*) FROM ff_budget_usage WHERE budget_id = 'made-up'").fetchone()[0] == 0
        assert admin.execute("SELECT ff_get_budget_status('b') -> 'usage' ->> 't'").fetchone()[0] == "4"
        assert admin.execute("SELECT ff_get_budget_status('other-b') -> 'usage' ->> 't'").fetchone()[0] == "0"


def test_admin_role_manages_but_cannot_read_secrets_or_write_tables(cluster, db):
    admin = login(cluster, "ff_test_admin", "flowfabric_admin")
    with cluster.connect(db, user=admin) as a:
        a.execute("SELECT ff_create_budget('b', '{t}', '{10}', '{0}')")
        a.execute("SELECT ff_create_quota_policy('q', 60, 10, 1)")
        flow, ids = build_flow(a, "adm", 2, [(0, 1)])
        a.execute("SELECT ff_rotate_hmac_secret('admin-rotated')")
        # Choosing the secret is for the superuser only.
        denied(a, "SELECT ff_rotate_hmac_secret('admin-chosen', '\\x00112233445566778899aabbccddeeff')")
        assert a.execute("SELECT ff_verify_grant('pg:{fp:1}:' || gen_random_uuid() || ':1:admin-rotated:00')"
                         ).fetchone()[0] in ("malformed", "expired", "unknown_grant", "signature_mismatch")
        a.execute("SELECT ff_run_reconcilers()")
        assert a.execute("SELECT count(*) FROM ff_exec_core").fetchone()[0] == 2
        assert a.execute("SELECT count(*) FROM ff_queue_depth").fetchone()[0] >= 1
        a.execute("SELECT * FROM ff_budget_health")
        denied(a, "SELECT secret FROM ff_waitpoint_hmac")
        denied(a, "DELETE FROM ff_exec_core")
        denied(a, "UPDATE ff_budget_usage SET current_value = 0")
        assert a.execute("SELECT ff_cancel_flow(%s, 'admin')", (flow,)).fetchone()[0] == 2


def test_public_gets_nothing(cluster, db):
    nobody = login(cluster, "ff_test_nobody")
    with cluster.connect(db, user=nobody) as n:
        for sql in ["SELECT * FROM flowfabric.ff_claim_for_worker('l', 'w', 'i')",
                    "SELECT flowfabric.ff_create_execution('l')",
                    "SELECT * FROM flowfabric.ff_report_usage('b', '{}')", "SELECT * FROM flowfabric.ff_budget_policy",
                    "SELECT * FROM flowfabric.ff_waitpoint_hmac", "SELECT flowfabric.ff_get_execution('x')",
                    "CREATE TABLE flowfabric.planted (x int)"]:
            denied(n, sql)


def test_the_schema_is_the_superusers_and_nobody_else_may_create_in_it(cluster, db):
    owner = login(cluster, "ff_test_dbowner")
    with cluster.connect(db) as c:
        c.execute(f'ALTER DATABASE "{db}" OWNER TO ff_test_dbowner')
        nsp_owner, acl = c.execute("SELECT nspowner::regrole::text, nspacl::text FROM pg_namespace "
                                   "WHERE nspname = 'flowfabric'").fetchone()
        assert nsp_owner == "postgres"
        for entry in acl.strip("{}").split(","):
            grantee, privileges = entry.split("=", 1)
            assert grantee == "postgres" or "C" not in privileges.split("/")[0], acl
    with cluster.connect(db, user=owner) as o:
        denied(o, "CREATE FUNCTION flowfabric.ff_now() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        denied(o, "CREATE TABLE flowfabric.ff_exec_core_shadow (x int)")


def test_security_definer_functions_pin_search_path(conn):
    rows = conn.execute("""
        SELECT p.proname, p.prosecdef, p.proconfig
        FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
        JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'flowfabric'
        WHERE p.proname LIKE 'ff\\_%' AND p.prorettype <> 'trigger'::regtype""").fetchall()
    assert len(rows) > 20
    for name, secdef, config in rows:
        if name == "ff_lane_channel":
            continue
        assert secdef, name
        assert "search_path=flowfabric, pg_temp" in (config or []), (name, config)


def run_pg(tool, *args):
    return subprocess.run([f"{PG_BIN}/{tool}", *args], capture_output=True, text=True)


def test_dump_and_restore_keep_all_engine_state(cluster, tmp_path):
    with cluster.connect() as c:
        for name in ("dump_src", "dump_dst"):
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute("CREATE DATABASE dump_src")
    with cluster.connect("dump_src") as c:
        c.execute("CREATE EXTENSION flowfabric")
        c.execute("UPDATE ff_partition_config SET num_budget_partitions = 64")
        c.execute("SELECT ff_rotate_hmac_secret('second')")
        c.execute("SELECT ff_create_budget('b', '{t}', '{100}', '{0}', reset_interval_ms => 60000)")
        c.execute("SELECT ff_create_quota_policy('q', 60, 100, 10)")
        flow, ids = build_flow(c, "dump", 3, [(0, 1), (1, 2)], budget_ids=["b"])
        eid, grant = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('dump', 'w', 'i')").fetchone()
        c.execute("SELECT * FROM ff_record_spend('b', %s, '{\"t\": 7}', 'spend-1')", (eid,))
        done = c.execute("SELECT ff_create_execution('solo', quota_policy_id => 'q')").fetchone()[0]
        _, g2 = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('solo', 'w', 'i')").fetchone()
        c.execute("SELECT ff_complete_execution(%s, %s)", (done, g2))
        tables = [r[0] for r in c.execute(
            "SELECT cfg::regclass::text FROM pg_extension, unnest(extconfig) cfg "
            "WHERE extname = 'flowfabric' AND cfg::regclass::text NOT LIKE '%%seq'").fetchall()]
        snapshot = {t: c.execute(f"SELECT md5(string_agg(x::text, '|' ORDER BY x::text)) FROM {t} x").fetchone()[0]
                    for t in tables}
        max_event = c.execute("SELECT max(event_id) FROM ff_completion_event").fetchone()[0]
    dump = str(tmp_path / "ff.dump")
    host = ["-h", cluster.host, "-p", str(cluster.port), "-U", "postgres"]
    r = run_pg("pg_dump", *host, "-Fc", "-f", dump, "dump_src")
    assert r.returncode == 0, r.stderr
    with cluster.connect() as c:
        c.execute("CREATE DATABASE dump_dst")
    r = run_pg("pg_restore", *host, "-d", "dump_dst", "--exit-on-error", dump)
    assert r.returncode == 0, r.stderr
    with cluster.connect("dump_dst") as c:
        for t, digest in snapshot.items():
            got = c.execute(f"SELECT md5(string_agg(x::text, '|' ORDER BY x::text)) FROM {t} x").fetchone()[0]
            assert got == digest, f"{t} differs after restore"
        assert c.execute("SELECT count(*) FROM ff_waitpoint_hmac WHERE active").fetchone()[0] == 1
        assert c.execute("SELECT kid FROM ff_waitpoint_hmac WHERE active").fetchone()[0] == "second"
        # The engine works on the restored state: the old grant completes and cascades.
        assert c.execute("SELECT ff_verify_grant(%s)", (grant,)).fetchone()[0] == "ok"
        c.execute("SELECT ff_complete_execution(%s, %s)", (eid, grant))
        assert c.execute("SELECT ff_get_execution(%s) ->> 'public_state'", (ids[1],)).fetchone()[0] == "waiting"
        assert c.execute("SELECT max(event_id) FROM ff_completion_event").fetchone()[0] > max_event
        new = c.execute("SELECT ff_create_execution('after-restore')").fetchone()[0]
        assert c.execute("SELECT execution_id FROM ff_claim_for_worker('after-restore', 'w', 'i')").fetchone()[0] == new
        assert c.execute("SELECT num_budget_partitions FROM ff_partition_config").fetchone()[0] == 64

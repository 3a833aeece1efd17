"""Upgrades as an operator runs them: a database created and used by a
released version (built from this repository's history by
scripts/old-builds.sh), with data and a lease still open; then the package
of the current build is installed over it and ALTER EXTENSION flowfabric
UPDATE runs. Every path (0.1.0 -> current, 0.2.0 -> current) must keep all
data, let the open lease complete and cascade, move everything into the
schema flowfabric, and end identical, object for object, to a fresh
install. The 0.2.0 path also runs with look-alike operators planted in
public by the database owner beforehand, which must never run."""
import os
import shutil
import subprocess

import pytest

from cluster import Cluster
from ffhelp import build_flow, invariant_violations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = os.path.join(ROOT, "target", "upgrade-pg")
BIN = os.path.join(PREFIX, "lib", "postgresql", "15", "bin")
LIBDIR = os.path.join(PREFIX, "lib", "postgresql", "15", "lib")
EXTDIR = os.path.join(PREFIX, "share", "postgresql", "15", "extension")
CURRENT = "0.3.0"

CATALOG = """
WITH members AS (
    SELECT d.classid, d.objid FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
    WHERE e.extname = 'flowfabric' AND d.deptype = 'e')
SELECT string_agg(line, E'\\n' ORDER BY line) FROM (
    SELECT 'fn ' || p.oid::regprocedure || ' ' || md5(pg_get_functiondef(p.oid)) || ' ' || coalesce(p.proacl::text, '')
    FROM pg_proc p JOIN members m ON m.classid = 'pg_proc'::regclass AND m.objid = p.oid
    UNION ALL
    SELECT 'rel ' || c.relnamespace::regnamespace || '.' || c.relname || ' ' || c.relkind::text || ' '
           || coalesce(c.relacl::text, '') || ' ' || coalesce(c.reloptions::text, '')
    FROM pg_class c JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
    UNION ALL
    SELECT 'col ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' '
           || a.attnotnull || ' ' || coalesce(pg_get_expr(ad.adbin, ad.adrelid), '') || ' ' || a.attidentity::text
    FROM pg_class c JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
    UNION ALL
    SELECT 'idx ' || pg_get_indexdef(i.indexrelid)
    FROM pg_index i JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = i.indrelid
    UNION ALL
    SELECT 'con ' || conrelid::regclass || ' ' || pg_get_constraintdef(co.oid)
    FROM pg_constraint co JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = co.conrelid
    UNION ALL
    SELECT 'trg ' || pg_get_triggerdef(t.oid)
    FROM pg_trigger t JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = t.tgrelid
    WHERE NOT t.tgisinternal
    UNION ALL
    SELECT 'view ' || c.relname || ' ' || md5(pg_get_viewdef(c.oid))
    FROM pg_class c JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid WHERE c.relkind = 'v'
    UNION ALL
    SELECT 'dump ' || string_agg(cfg::regclass::text || ':' || coalesce(cond, ''), ',' ORDER BY cfg::regclass::text)
    FROM pg_extension, unnest(extconfig, extcondition) AS x(cfg, cond) WHERE extname = 'flowfabric'
    UNION ALL
    SELECT 'schema ' || n.nspname || ' ' || n.nspowner::regrole || ' ' || coalesce(n.nspacl::text, '')
    FROM pg_namespace n WHERE n.nspname = 'flowfabric'
    UNION ALL
    SELECT 'ext ' || extname || ' ' || extnamespace::regnamespace || ' ' || extversion || ' ' || extrelocatable
    FROM pg_extension WHERE extname = 'flowfabric'
) lines(line)
"""

COUNTED = ("ff_exec_core", "ff_edge", "ff_edge_group", "ff_budget_usage_dedup", "ff_claim_grant",
           "ff_waitpoint_hmac", "ff_attempt", "ff_completion_event", "ff_flow_core", "ff_quota_window",
           "ff_quota_admitted")


def copy_tree(src, dst):
    for name in os.listdir(src):
        s = os.path.join(src, name)
        tmp = os.path.join(dst, f".{name}.tmp")
        shutil.copy2(s, tmp)
        os.replace(tmp, os.path.join(dst, name))  # never write over a mapped library


@pytest.fixture(scope="module")
def prefix():
    """A private copy of PostgreSQL 15 whose flowfabric files the test swaps."""
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "old-builds.sh")], check=True)
    if not os.path.exists(os.path.join(BIN, "postgres")):
        os.makedirs(os.path.join(PREFIX, "lib", "postgresql"), exist_ok=True)
        os.makedirs(os.path.join(PREFIX, "share", "postgresql"), exist_ok=True)
        shutil.copytree("/usr/lib/postgresql/15", os.path.join(PREFIX, "lib", "postgresql", "15"), symlinks=True)
        shutil.copytree("/usr/share/postgresql/15", os.path.join(PREFIX, "share", "postgresql", "15"), symlinks=True)
    for d in (ROOT, os.path.join(ROOT, "target")):
        os.chmod(d, os.stat(d).st_mode | 0o005)
    return PREFIX


def install_release(version):
    """Installs a released version's package, as `dpkg -i` of it would."""
    for f in os.listdir(EXTDIR):
        if f.startswith("flowfabric"):
            os.remove(os.path.join(EXTDIR, f))
    tree = os.path.join(ROOT, "target", "old", version, "usr")
    copy_tree(os.path.join(tree, "lib", "postgresql", "15", "lib"), LIBDIR)
    copy_tree(os.path.join(tree, "share", "postgresql", "15", "extension"), EXTDIR)


def install_current():
    env = dict(os.environ, PG_CONFIG=os.path.join(BIN, "pg_config"))
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "install.sh"), "--release"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def populate(c):
    """Data of every kind the old versions keep, and a lease still open.
    The old API lives in public, unqualified."""
    c.execute("SELECT ff_create_budget('b', '{t}', '{100}', '{50}')")
    c.execute("SELECT ff_report_usage('b', '{\"t\": 60}', 'd1')")
    c.execute("SELECT ff_create_quota_policy('q', 60, 10, 2)")
    flow, ids = build_flow(c, "up", 3, [(0, 1), (1, 2)])
    # A long lease: it must still be in force after the package is swapped.
    leased = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('up', 'w', 'i', '{}', 3600000)").fetchone()
    c.execute("SELECT ff_create_execution('qq', quota_policy_id => 'q')")
    quota_lease = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('qq', 'w', 'i', '{}', 3600000)").fetchone()
    c.execute("SELECT ff_create_execution('done')")
    done = c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('done', 'w', 'i')").fetchone()
    c.execute("SELECT ff_complete_execution(%s, %s)", done)
    return flow, ids, leased, quota_lease


def plant_lookalikes(cluster, db):
    """The database owner (not a superuser) plants exact-type look-alikes of
    operators the upgrade script's own SQL could resolve through public."""
    with cluster.connect(db, user="owner_up", search_path=None) as c:
        c.execute("CREATE TABLE public.pwned (who text, what text)")
        c.execute("GRANT INSERT ON public.pwned TO PUBLIC")
        for name, left, right, ret in [("*", "numeric", "integer", "numeric"), ("=", "name", "text", "boolean"),
                                       ("=", "text", "text", "boolean"), ("<>", "name", "name", "boolean"),
                                       ("=", "oid", "oid", "boolean"), ("||", "text", "text", "text")]:
            fn = f"public.pwn_{abs(hash((name, left, right))) % 10**8}"
            c.execute(f"""CREATE FUNCTION {fn}(a {left}, b {right}) RETURNS {ret} LANGUAGE plpgsql AS $$
                          BEGIN INSERT INTO public.pwned VALUES (current_user, '{name}({left},{right})');
                          BEGIN ALTER ROLE owner_up SUPERUSER; EXCEPTION WHEN OTHERS THEN NULL; END;
                          RETURN NULL; END $$""")
            c.execute(f"CREATE OPERATOR public.{name} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {fn})")


@pytest.mark.parametrize("start", ["0.1.0", "0.2.0"])
def test_every_release_upgrades_to_the_current_one(prefix, start):
    install_release(start)
    cl = Cluster(f"upgrade-{start}", 54336 + (start == "0.2.0"), pg_bin=BIN).init().start()
    try:
        with cl.connect(search_path=None) as c:
            c.execute("CREATE ROLE owner_up LOGIN")
            c.execute("CREATE DATABASE up_old OWNER owner_up")
            c.execute("CREATE DATABASE up_fresh")
        with cl.connect("up_old", search_path=None) as c:
            c.execute(f"CREATE EXTENSION flowfabric VERSION '{start}'")
            flow, ids, leased, quota_lease = populate(c)
            before = {t: c.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in COUNTED}
        plant_lookalikes(cl, "up_old")

        # The operator installs the new package, then updates the database.
        install_current()
        with cl.connect("up_old", search_path=None) as c:
            c.execute("ALTER EXTENSION flowfabric UPDATE")
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'flowfabric'").fetchone()[0] == CURRENT
            assert c.execute("SELECT count(*) FROM public.pwned").fetchone()[0] == 0, "a planted operator ran"
            assert not c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'owner_up'").fetchone()[0]
            elsewhere = c.execute("""
                SELECT count(*) FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'flowfabric'
                LEFT JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
                LEFT JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
                WHERE d.deptype = 'e' AND coalesce(c.relnamespace, p.pronamespace) <> 'flowfabric'::regnamespace
            """).fetchone()[0]
            assert elsewhere == 0, "every object moved into the schema flowfabric"
            upgraded = c.execute(CATALOG).fetchone()[0]
        with cl.connect("up_fresh", search_path=None) as c:
            c.execute("CREATE EXTENSION flowfabric")
            fresh = c.execute(CATALOG).fetchone()[0]
        assert upgraded.splitlines() == fresh.splitlines()

        with cl.connect("up_old") as c:  # flowfabric on the search path from now on
            after = {t: c.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in COUNTED}
            assert after == before
            assert c.execute("SELECT ff_get_budget_status('b') -> 'usage' ->> 't'").fetchone()[0] == "60"
            assert c.execute("SELECT outcome FROM ff_report_usage('b', '{\"t\": 60}', 'd1')").fetchone()[0] == "soft_breach"
            # The leases issued by the old version complete, and the cascade goes on.
            assert c.execute("SELECT ff_verify_grant(%s)", (leased[1],)).fetchone()[0] == "ok"
            c.execute("SELECT ff_complete_execution(%s, %s)", leased)
            nxt = ids[1] if leased[0] == ids[0] else ids[0]
            assert c.execute("SELECT ff_get_execution(%s) ->> 'public_state'", (nxt,)).fetchone()[0] in ("waiting", "completed")
            assert c.execute("SELECT count(*) FROM ff_quota_admitted").fetchone()[0] == 1
            c.execute("SELECT ff_complete_execution(%s, %s)", quota_lease)
            assert c.execute("SELECT count(*) FROM ff_quota_admitted").fetchone()[0] == 0
            # The flow runs to its end under 0.3 rules.
            while (row := c.execute("SELECT execution_id, grant_key FROM ff_claim_for_worker('up', 'w', 'i')").fetchone()):
                c.execute("SELECT ff_complete_execution(%s, %s)", row)
            assert c.execute("SELECT ff_get_flow(%s) ->> 'state'", (flow,)).fetchone()[0] == "completed"
            assert invariant_violations(c) == []
    finally:
        cl.stop(quiet=True)


def test_a_library_newer_than_the_database_refuses_until_updated(prefix):
    """Between installing a new package and ALTER EXTENSION UPDATE, every
    call is a clear 55000 naming both versions (never a half-working engine
    whose statements could name tables the old schema lacks)."""
    install_release("0.2.0")
    cl = Cluster("upgrade-skew", 54338, pg_bin=BIN).init().start()
    try:
        with cl.connect(search_path=None) as c:
            c.execute("CREATE EXTENSION flowfabric VERSION '0.2.0'")
            c.execute("SELECT ff_create_execution('l')")
        install_current()
        with cl.connect(search_path=None) as c:
            with pytest.raises(Exception) as e:
                c.execute("SELECT ff_create_execution('l')")
            assert getattr(e.value, "sqlstate", None) == "55000", e.value
            assert "0.2.0" in str(e.value) and CURRENT in str(e.value)
            c.execute("ALTER EXTENSION flowfabric UPDATE")
            c.execute("SELECT flowfabric.ff_create_execution('l')")
            assert c.execute("SELECT count(*) FROM flowfabric.ff_exec_core").fetchone()[0] == 2
    finally:
        cl.stop(quiet=True)

"""Hostile input at scale: a seeded generator throws random and adversarial
arguments at every function. Each call must end in a correct result or an
error with a proper SQLSTATE (never an internal error or a dead backend),
and the engine's invariants must hold afterwards."""
import os
import random
import uuid

import psycopg
from psycopg.types.json import Jsonb

from ffhelp import invariant_violations

SEED = int(os.environ.get("FF_FUZZ_SEED", "20261123"))
CALLS = int(os.environ.get("FF_FUZZ_CALLS", "3000"))


class Raw(str):
    """JSON text passed as is (Python's encoder cannot nest this deep)."""


def deep(n):
    return Raw("[" * n + "1" + "]" * n)


def pools(known):
    text = [None, "", "a", "lane", "x" * 300, "x" * 200_000, "'; DROP TABLE ff_exec_core; --", "Robert'); --",
            "ünïcødé ☃ 𝄞", "NaN", "Infinity", "-0", "null", "{fp:1}:" + str(uuid.uuid4()), "{fp:99999}:x",
            "pg:{fp:1}:" + str(uuid.UUID(int=0)) + ":1:k:" + "0" * 64, "a:b", "w|x", " ", "\t\n",
            "$$", "\\x00", "%s%n", "../../etc/passwd"] + known
    big = [None, 0, 1, -1, 30000, 2**31 - 1, -2**31, 2**63 - 1, -2**63, 86_400_001]
    small = [None, 0, 1, -1, 5, 1000, 1001, 2**31 - 1, -2**31]
    json = [None, {}, [], "str", 1, 1.5, None, {"t": 1}, {"t": -1}, {"t": 1.5}, {"t": "NaN"}, {"t": 2**70},
            {"t": None}, {"": 1}, {"x" * 300: 1}, deep(1000), {f"k{i}": i for i in range(400)},
            {"kind": "quorum", "k": 2**40}, {"kind": "any_of", "on_satisfied": 7}, {"kind": "all_of"},
            {"tokens": 2**63 - 1}, {"blob": "y" * 100_000}]
    arrays = [None, [], [None], ["a"] * 300, ["x" * 5000], ["gpu", "cuda"], ["'; drop"], ["", "a"], ["a,b"],
              ["t"], ["t", "t"], ["ünï"]]
    bigarrays = [None, [], [None], [1], [-1], [2**63 - 1], [1, 2], [0] * 300]
    uuids = [None, uuid.uuid4(), uuid.UUID(int=0)]
    return {"text": text, "bigint": big, "int": small, "jsonb": json, "text[]": arrays,
            "bigint[]": bigarrays, "uuid": uuids, "bool": [None, True, False],
            "bytea": [None, b"", b"x" * 16, b"x" * 100_000],
            "jsonb[]": [None, [], [None], [Jsonb({})], [Jsonb({"n": i}) for i in range(50)], [Jsonb(deep(10))]]}


# Every function of the extension with its argument types, read from the
# catalog, so a new function is fuzzed without editing this file.
CATALOG_FUNCTIONS = """
    SELECT p.proname, array(SELECT format_type(t.oid, NULL) FROM unnest(p.proargtypes) WITH ORDINALITY AS a(oid, i)
                            JOIN pg_type t ON t.oid = a.oid ORDER BY a.i)
    FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
    JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'flowfabric'
    WHERE p.prorettype <> 'trigger'::regtype ORDER BY 1"""
SHORT = {"integer": "int", "boolean": "bool"}


def catalog_functions(conn):
    functions = {name: [SHORT.get(t, t) for t in types] for name, types in conn.execute(CATALOG_FUNCTIONS)}
    assert len(functions) >= 38, sorted(functions)
    return functions


# SQLSTATE classes a well-behaved function may answer hostile input with.
ALLOWED = ("22", "23", "28", "40", "42", "55", "P0", "54")


def test_hostile_arguments_never_break_the_engine(cluster, db):
    rng = random.Random(SEED)
    with cluster.connect(db) as c:
        start = c.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
        flow = uuid.uuid4()
        c.execute("SELECT ff_create_flow(%s)", (flow,))
        known = [c.execute("SELECT ff_create_execution('lane', flow_id => %s)", (flow,)).fetchone()[0] for _ in range(5)]
        for eid in known:
            c.execute("SELECT ff_add_execution_to_flow(%s, %s)", (flow, eid))
        c.execute("SELECT ff_create_budget('b', '{t}', '{1000}', '{10}')")
        grants = [r[1] for r in c.execute("SELECT * FROM ff_claim_for_worker('lane', 'w', 'i')").fetchall()]
        values = pools(known + grants + ["b"])
        values["uuid"].append(flow)
        functions = catalog_functions(c)
        unknown = {t for types in functions.values() for t in types} - set(values)
        assert not unknown, f"no fuzz values for argument types {unknown}"
        outcomes = {"ok": 0}
        for i in range(CALLS):
            name = rng.choice(sorted(functions))
            types = functions[name]
            args = [rng.choice(values[t]) for t in types]
            args = [str(a) if isinstance(a, Raw) else Jsonb(a) if t == "jsonb" and a is not None else a
                    for a, t in zip(args, types)]
            placeholders = ", ".join(f"%s::{t}" for t in types)
            try:
                c.execute(f"SELECT * FROM {name}({placeholders})", args).fetchall()
                outcomes["ok"] += 1
            except psycopg.errors.ProgramLimitExceeded:
                outcomes["54"] = outcomes.get("54", 0) + 1  # e.g. PostgreSQL's own jsonb depth limit
            except psycopg.Error as e:
                assert e.sqlstate and e.sqlstate.startswith(ALLOWED), (name, args, e.sqlstate, str(e)[:300])
                outcomes[e.sqlstate] = outcomes.get(e.sqlstate, 0) + 1
        assert c.execute("SELECT pg_postmaster_start_time()").fetchone()[0] == start, "the server restarted"
        assert invariant_violations(c) == []
        print("fuzz outcomes:", outcomes)
        assert outcomes["ok"] > CALLS // 20 and len(outcomes) > 4, outcomes

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
            "bytea": [None, b"", b"x" * 16, b"x" * 100_000]}


FUNCTIONS = {
    "ff_create_budget": ["text", "text[]", "bigint[]", "bigint[]", "bigint", "text", "text", "text", "text", "text"],
    "ff_report_usage": ["text", "jsonb", "text"],
    "ff_report_usage_admin": ["text", "text[]", "bigint[]", "text"],
    "ff_reset_budget": ["text"],
    "ff_get_budget_status": ["text"],
    "ff_create_quota_policy": ["text", "bigint", "bigint", "bigint"],
    "ff_record_spend": ["text", "text", "jsonb", "text"],
    "ff_release_budget": ["text", "text"],
    "ff_create_execution": ["text", "jsonb", "int", "text[]", "text[]", "text", "uuid", "uuid", "bigint", "int"],
    "ff_claim_for_worker": ["text", "text", "text", "text[]", "bigint"],
    "ff_verify_grant": ["text"],
    "ff_renew_lease": ["text", "text", "bigint"],
    "ff_complete_execution": ["text", "text", "jsonb"],
    "ff_fail_execution": ["text", "text", "text", "bool"],
    "ff_get_execution": ["text"],
    "ff_rotate_hmac_secret": ["text", "bytea"],
    "ff_create_flow": ["uuid", "text", "text"],
    "ff_add_execution_to_flow": ["uuid", "text"],
    "ff_stage_dependency_edge": ["uuid", "uuid", "text", "text", "bigint", "text", "text"],
    "ff_apply_dependency_to_child": ["uuid", "uuid", "text"],
    "ff_set_edge_group_policy": ["uuid", "text", "jsonb"],
    "ff_dispatch_completion": ["bigint"],
    "ff_cancel_flow": ["uuid", "text"],
    "ff_reconcile_tick": ["bigint", "text", "text"],
    "ff_run_reconcilers": [],
    "ff_lane_channel": ["text"],
}

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
        outcomes = {"ok": 0}
        for i in range(CALLS):
            name = rng.choice(list(FUNCTIONS))
            types = FUNCTIONS[name]
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

#!/usr/bin/env python3
"""flowfabric over two shards behind a PL/Proxy router (scripts/scale-demo.sh).

Starts two shard servers with the extension (ports 54361, 54362) and a router
(54360) holding router/flowfabric_router.sql, creates a workload through the
router -- plain executions, flows, a budget -- and drains it with two kinds of
workers: two that claim through the router (which visits the shards in turn)
and one per shard connected to it directly (claim, spend and complete in one
local transaction). Prints where each execution ran. With --check, asserts
the outcome and that the router answers exactly like a shard; exit 1 when
anything is wrong. The servers are always stopped at the end.
"""
import collections
import contextlib
import os
import sys
import threading
import time
import uuid

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shardkit import Server, make_router, make_shard, wait_for  # noqa: E402

# Each shard runs its own reconcilers (background worker), as in production.
SHARD_CONF = {"shared_preload_libraries": "'flowfabric'", "flowfabric.database": "'ff'"}
ROUTER = Server("router", 54360)
SHARDS = [Server("s1", 54361, conf=SHARD_CONF), Server("s2", 54362, conf=SHARD_CONF)]
RANGES = {"s1": (0, 127), "s2": (128, 255)}

# A budget lives with the executions that name it: its hash tag is their lane.
ENRICH_BUDGET = "{enrich}:tokens"
ENRICH_N, ENRICH_COST, ENRICH_LIMIT = 12, 250, 2000          # 8 fit, 4 stay queued
GPU_BUDGET = "{gpu}:minutes"      # named by one flow's nodes: the router puts that flow on its shard
GPU_COST = 10
WORK_HOME_N, WORK_SPREAD_N, FLOWS, CHUNKS = 20, 15, 4, 3
LANES = ["work", "flow", "enrich"]

failures = []


def check(ok, what):
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        failures.append(what)


def slot_of(execution_id):
    return int(execution_id[4:execution_id.index("}")])


def shard_of(execution_id):
    n = slot_of(execution_id)
    return next(name for name, (lo, hi) in RANGES.items() if lo <= n <= hi)


def flow_spec(flow_id, tag, budget=None):
    """plan -> CHUNKS chunks -> merge; with `budget`, every node spends on it."""
    spend = {"spend": {"budget": budget, "deltas": {"minutes": GPU_COST}}} if budget else {}
    node = lambda name, **kw: {"name": name, "lane": "flow", "payload": {"node": name, "flow": tag, **spend, **kw},
                               **({"budget_ids": [budget]} if budget else {})}
    chunks = [f"chunk-{i}" for i in range(CHUNKS)]
    spec = {"nodes": [node("plan")] + [node(c) for c in chunks] + [node("merge", merge=True)],
            "edges": [{"from": "plan", "to": c} for c in chunks] + [{"from": c, "to": "merge"} for c in chunks]}
    if flow_id:
        spec["flow_id"] = str(flow_id)
    return spec


def create_workload(r):
    """Everything goes through the router connection `r`. Returns the ids
    expected to complete, the enrich ids and the flow ids."""
    one = lambda sql, args=(): r.execute(sql, args).fetchone()[0]
    one("SELECT flowfabric.ff_create_budget(%s, '{tokens}', %s, '{0}')", (ENRICH_BUDGET, [ENRICH_LIMIT]))
    one("SELECT flowfabric.ff_create_budget(%s, '{minutes}', '{100000}', '{0}')", (GPU_BUDGET,))
    work = one("SELECT flowfabric.ff_create_executions('work', %s)",
               ([Jsonb({"i": i}) for i in range(WORK_HOME_N)],))
    # One lane over both shards: a placement flow id picks each batch's shard.
    for s in SHARDS:
        place = one("SELECT flowfabric_router.placement_flow_id(%s)", (s.name,))
        work += one("SELECT flowfabric.ff_create_executions('work', %s, flow_id => %s)",
                    ([Jsonb({"i": i, "placed": s.name}) for i in range(WORK_SPREAD_N)], place))
    enrich = one("SELECT flowfabric.ff_create_executions('enrich', %s, budget_ids => %s, budget_reserve => %s)",
                 ([Jsonb({"spend": {"budget": ENRICH_BUDGET, "deltas": {"tokens": ENRICH_COST}}})] * ENRICH_N,
                  [ENRICH_BUDGET], Jsonb({"tokens": ENRICH_COST})))
    flows, nodes = [], []
    for i in range(FLOWS):   # alternate shards so both get flows
        place = one("SELECT flowfabric_router.placement_flow_id(%s)", (SHARDS[i % 2].name,))
        answer = one("SELECT flowfabric.ff_submit_flow(%s)", (Jsonb(flow_spec(place, f"f{i}")),))
        flows.append(answer["flow_id"])
        nodes += answer["executions"].values()
    # No flow_id: the router generates one on the shard of the budget its nodes name.
    answer = one("SELECT flowfabric.ff_submit_flow(%s)", (Jsonb(flow_spec(None, "gpu", GPU_BUDGET)),))
    flows.append(answer["flow_id"])
    gpu_nodes = list(answer["executions"].values())
    return {"work": work, "enrich": enrich, "flows": flows, "nodes": nodes + gpu_nodes, "gpu_nodes": gpu_nodes}


def worker(name, dsn, local, records, errors, stop):
    """Claims over LANES, spends what a payload says, reads the inputs of a
    merge node, completes. A local worker (connected to its shard) claims
    one execution and does all of that in one transaction (the documented
    claim + spend + complete pattern); a router worker claims up to 2 and
    every call is its own transaction on the execution's shard."""
    def one_round(c):
        rows = c.execute("SELECT execution_id, grant_key, payload FROM flowfabric.ff_claim_batch(%s, %s, %s,"
                         " max_count => %s)", (LANES, name, f"{name}-{os.getpid()}", 1 if local else 2)).fetchall()
        for eid, grant, payload in rows:
            payload = payload or {}
            if "spend" in payload:
                c.execute("SELECT * FROM flowfabric.ff_record_spend(%s, %s, %s, %s)",
                          (payload["spend"]["budget"], eid, Jsonb(payload["spend"]["deltas"]), f"{eid}:spend"))
            result = {"by": name}
            if payload.get("merge"):
                result["inputs"] = len(c.execute("SELECT flowfabric.ff_get_inputs(%s)", (eid,)).fetchone()[0])
            c.execute("SELECT flowfabric.ff_complete_execution(%s, %s, %s)", (eid, grant, Jsonb(result)))
        return [(name, eid, grant) for eid, grant, _ in rows]

    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            while not stop.is_set():
                with c.transaction() if local else contextlib.nullcontext():
                    done = one_round(c)
                records.extend(done)
                if not done:
                    time.sleep(0.02)
    except Exception as e:  # noqa: BLE001 -- reported and failed by the driver
        errors.append(f"{name}: {e}")


def run_workers(expected):
    records, errors, stop = [], [], threading.Event()
    router_dsn = ROUTER.connstr() + " user=postgres"
    specs = [(f"router-w{i}", router_dsn, False) for i in (1, 2)] + \
            [(f"{s.name}-local", s.connstr() + " user=postgres", True) for s in SHARDS]
    threads = [threading.Thread(target=worker, args=(n, d, loc, records, errors, stop)) for n, d, loc in specs]
    t0 = time.time()
    for t in threads:
        t.start()
    done = wait_for(lambda: len(records) >= expected or errors, timeout=90)
    # Workers go on polling a moment: the budget must keep refusing the rest of lane enrich.
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    return records, errors, done and not errors, time.time() - t0


def api_signatures(conn):
    return {row[0]: row[1:] for row in conn.execute(
        "SELECT p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), p.provolatile,"
        "       p.proisstrict"
        "  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'flowfabric' AND p.prorettype <> 'trigger'::regtype")}


def error_of(conn, sql, args):
    try:
        conn.execute(sql, args)
    except psycopg.Error as e:
        return (e.sqlstate, e.diag.message_primary, e.diag.message_detail, e.diag.message_hint)
    return None


def verify(r, shard_conns, w, records):
    """The assertions of --check (printed either way)."""
    print("\nchecks")
    done_ids = [eid for _, eid, _ in records]
    counts = collections.Counter(done_ids)
    check(all(n == 1 for n in counts.values()), "no execution was completed twice")
    info = {eid: r.execute("SELECT flowfabric.ff_get_execution(%s)", (eid,)).fetchone()[0]
            for eid in w["work"] + w["nodes"] + w["enrich"]}
    must_run = w["work"] + w["nodes"]
    check(all(info[e]["public_state"] == "completed" and info[e]["attempt_index"] == 1 for e in must_run)
          and set(must_run) <= set(counts),
          f"all {len(w['work'])} plain executions and {len(w['nodes'])} flow nodes ran exactly once")
    ran = [e for e in w["enrich"] if info[e]["public_state"] == "completed"]
    held = [e for e in w["enrich"] if info[e]["public_state"] == "waiting" and info[e]["attempt_index"] == 0]
    fit = ENRICH_LIMIT // ENRICH_COST
    check(len(ran) == fit and len(held) == ENRICH_N - fit and all(info[e]["attempt_index"] == 1 for e in ran),
          f"enrich: {len(ran)} ran once, {len(held)} held back by the budget (expected {fit} and {ENRICH_N - fit})")
    check(set(counts) == set(must_run) | set(ran), "workers completed exactly the executions that ran")
    states = [r.execute("SELECT flowfabric.ff_get_flow(%s) ->> 'state'", (f,)).fetchone()[0] for f in w["flows"]]
    check(states == ["completed"] * len(w["flows"]), f"all {len(w['flows'])} flows completed ({states})")
    merges = [info[e]["result"].get("inputs") for e in w["nodes"] if info[e]["payload"].get("merge")]
    check(merges == [CHUNKS] * len(w["flows"]), f"each merge read its {CHUNKS} inputs through ff_get_inputs")
    eb = r.execute("SELECT flowfabric.ff_get_budget_status(%s)", (ENRICH_BUDGET,)).fetchone()[0]
    check(eb["usage"].get("tokens") == fit * ENRICH_COST and not any(eb.get("reserved", {}).values()),
          f"{ENRICH_BUDGET}: usage {eb['usage'].get('tokens')} == {fit * ENRICH_COST}, nothing left reserved")
    gb = r.execute("SELECT flowfabric.ff_get_budget_status(%s)", (GPU_BUDGET,)).fetchone()[0]
    check(gb["usage"].get("minutes") == GPU_COST * len(w["gpu_nodes"]),
          f"{GPU_BUDGET}: usage {gb['usage'].get('minutes')} == {GPU_COST * len(w['gpu_nodes'])}")

    # Placement
    where = lambda key: r.execute("SELECT flowfabric_router.shard_of_slot(flowfabric_router.slot_of_key(%s))",
                                  (key,)).fetchone()[0]
    check({shard_of(e) for e in w["gpu_nodes"]} == {where(GPU_BUDGET)},
          f"the flow naming {GPU_BUDGET} was placed on its shard ({where(GPU_BUDGET)})")
    check({shard_of(e) for e in w["enrich"]} == {where(ENRICH_BUDGET)},
          f"lane enrich and {ENRICH_BUDGET} share a shard ({where(ENRICH_BUDGET)})")
    check(all(counts_by_shard(records).get(s.name) for s in SHARDS), "both shards ran work")
    pages, after = [], None
    while True:   # keyset paging over both shards, 7 at a time
        page = [x["execution_id"] for (x,) in r.execute(
            "SELECT * FROM flowfabric.ff_list_executions('work', after_execution_id => %s, max_count => 7)", (after,))]
        if not page:
            break
        pages += page
        after = page[-1]
    check(sorted(pages) == sorted(w["work"]), f"ff_list_executions pages over both shards: {len(pages)} rows, each once")
    other = next(s.name for s in SHARDS if s.name != where(GPU_BUDGET))
    lane = next(f"lane-{i}" for i in range(1000) if where(f"lane-{i}") == other)
    err = error_of(r, "SELECT flowfabric.ff_create_execution(%s, budget_ids => %s)", (lane, [GPU_BUDGET]))
    check(err is not None and err[0] == "0A000", f"a budget on another shard is refused before any shard is touched ({err and err[0]})")

    # The router answers like the shard that owns the key: same rows, same errors.
    e, grant = next((eid, g) for _, eid, g in records if eid in w["work"])
    local = shard_conns[shard_of(e)]
    same = lambda sql, args, shard: r.execute(sql, args).fetchall() == shard_conns[shard].execute(sql, args).fetchall()
    check(same("SELECT flowfabric.ff_get_execution(%s)", (e,), shard_of(e)), "ff_get_execution: router == shard")
    check(same("SELECT flowfabric.ff_get_budget_status(%s)", (ENRICH_BUDGET,), where(ENRICH_BUDGET)),
          "ff_get_budget_status: router == shard")
    forged = grant[:grant.rindex(":") + 1] + "0" * 64
    check(same("SELECT flowfabric.ff_verify_grant(%s), flowfabric.ff_verify_grant(%s)", (grant, forged), shard_of(e)),
          "ff_verify_grant: router == shard")
    for sql, args, shard in [
            ("SELECT flowfabric.ff_complete_execution(%s, %s)", (e, grant), shard_of(e)),
            ("SELECT flowfabric.ff_renew_lease(%s, %s, 1000)", (e, forged), shard_of(e)),
            ("SELECT flowfabric.ff_get_execution(%s)", ("not-an-id",), "s1"),
            ("SELECT flowfabric.ff_get_execution(%s)", (f"{{fp:{slot_of(e)}}}:{uuid.uuid4()}",), shard_of(e)),
            ("SELECT * FROM flowfabric.ff_claim_for_worker(%s, %s, %s)", ("work", "", "x"), "s1"),
            ("SELECT flowfabric.ff_reset_budget(%s)", ("{enrich}:nope",), where("{enrich}:nope"))]:
        a, b = error_of(r, sql, args), error_of(shard_conns[shard], sql, args)
        check(a is not None and a == b, f"same error through the router: {a[0] if a else None} {a[1][:70] if a else ''}")

    # The API surface and the router's hygiene.
    shard_api, router_api = api_signatures(local), api_signatures(r)
    missing = sorted(set(shard_api) - set(router_api) - {"ff_dispatch_completion"})
    differ = sorted(f for f in router_api if f in shard_api and router_api[f] != shard_api[f])
    check(not missing and not differ and set(router_api) <= set(shard_api),
          f"router API == extension API ({len(router_api)} functions; missing {missing}, different {differ})")
    unpinned = r.execute("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                         " WHERE n.nspname IN ('flowfabric', 'flowfabric_router')"
                         "   AND NOT coalesce(p.proconfig, '{}') @> '{\"search_path=pg_catalog, pg_temp\"}'").fetchone()[0]
    in_public = r.execute("SELECT (SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace)"
                          " + (SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace)").fetchone()[0]
    check(unpinned == 0 and in_public == 0, f"router functions pin search_path ({unpinned} do not), nothing in public ({in_public})")


def counts_by_shard(records):
    return collections.Counter(shard_of(eid) for _, eid, _ in records)


def report(w, records, seconds):
    lane_of = {e: "work" for e in w["work"]} | {e: "flow" for e in w["nodes"]} | {e: "enrich" for e in w["enrich"]}
    table = collections.Counter((shard_of(e), lane_of[e], who) for who, e, _ in records)
    print(f"\nwhere work ran ({len(records)} executions in {seconds:.1f} s)")
    workers = sorted({who for who, _, _ in records})
    print(f"  {'shard':6} {'lane':7} " + " ".join(f"{n:>12}" for n in workers))
    for s in SHARDS:
        for lane in LANES:
            cells = [table.get((s.name, lane, who), 0) for who in workers]
            if any(cells):
                print(f"  {s.name:6} {lane:7} " + " ".join(f"{c:>12}" for c in cells))
    by = counts_by_shard(records)
    print("  total  " + ", ".join(f"{s.name}: {by.get(s.name, 0)}" for s in SHARDS))


def main():
    checking = "--check" in sys.argv[1:]
    started = time.time()
    servers = [ROUTER] + SHARDS
    try:
        for s in servers:
            s.init().start()
        for s in SHARDS:
            make_shard(s)
        print("shards and their slots:")
        for name, slots, ranges in make_router(ROUTER, SHARDS, RANGES):
            print(f"  {name}: {slots} slots ({ranges})  {next(s for s in SHARDS if s.name == name).connstr()}")
        print(f"router: psql \"{ROUTER.connstr()} user=postgres\"")
        with ROUTER.connect() as r:
            w = create_workload(r)
            expected = len(w["work"]) + len(w["nodes"]) + ENRICH_LIMIT // ENRICH_COST
            print(f"created through the router: {len(w['work'])} plain executions on lane work, "
                  f"{len(w['flows'])} flows ({len(w['nodes'])} nodes), {ENRICH_N} enrich executions on a "
                  f"{ENRICH_LIMIT}-token budget")
            records, errors, ok, seconds = run_workers(expected)
            for e in errors:
                print(f"worker error: {e}")
            if not ok:
                failures.append(f"the workload did not drain ({len(records)} of {expected} done)")
            report(w, records, seconds)
            shard_conns = {s.name: s.connect() for s in SHARDS}
            try:
                verify(r, shard_conns, w, records)
            finally:
                for c in shard_conns.values():
                    c.close()
    finally:
        for s in servers:
            s.stop()
    print(f"\n{len(failures)} failed checks, {time.time() - started:.1f} s" if failures
          else f"\nall checks passed, {time.time() - started:.1f} s")
    return 1 if failures and checking else 0


if __name__ == "__main__":
    sys.exit(main())

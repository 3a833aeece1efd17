#!/usr/bin/env python3
"""A/B of two builds of the current version on the 1,000-wide fan-in.

Where bench/versions.sh compares release 0.2.0 with this tree, this compares
two installs of 0.3.0 (say, main and a change to it) on the same workload,
with the same alternating order, so a change aimed at the fan-in can be
judged on this noisy 2-core machine: single runs swing by 1.5x, a ratio of
medians over 6-10 repetitions is what to read.

    # 1. install main into a copy of the server (once per base):
    VERSIONS_BUILD_ONLY=1 bench/versions.sh
    rm -rf target/bench-versions/pg-base
    cp -a target/bench-versions/pg-0.3.0 target/bench-versions/pg-base
    # 2. make the change, install it (into pg-0.3.0), compare:
    VERSIONS_BUILD_ONLY=1 bench/versions.sh
    /usr/bin/python3 bench/ab_fanin.py              # 16 clients, 6 repetitions
    AB_CLIENTS=4,16 AB_REPS=10 /usr/bin/python3 bench/ab_fanin.py

AB_WIDTH sets the fan-in's width (default 1,000, as in bench/versions.sh):
at 1,000 a 16-client drain lasts about half a second, so the 16 sessions'
first calls (library load, planning: ~12 ms each) weigh in it; 3,000 reads
closer to steady state.

AB_SETUP runs SQL (statements separated by `|||`) in each fresh database of
the changed side before the flow is built, for changes that are SQL only
(an index dropped, a storage parameter): then both sides may be one build.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import versions as V  # noqa: E402

BASE = V.Side("0.3.0", os.environ.get("AB_PREFIX_BASE", os.path.join(V.REPO, "target", "bench-versions", "pg-base")),
              54354, "flowfabric.")
CHANGED = V.CUR
SETUP = [q for q in os.environ.get("AB_SETUP", "").split("|||") if q.strip()]


def fresh_db(side, name, _plain=V.fresh_db):
    db = _plain(side, name)
    if side is CHANGED:
        with side.connect(db) as c:
            for q in SETUP:
                c.execute(q)
    return db


def main():
    V.fresh_db = fresh_db
    V.FANIN_WIDTH = int(os.environ.get("AB_WIDTH", V.FANIN_WIDTH))
    clients = [int(x) for x in os.environ.get("AB_CLIENTS", "16").split(",")]
    reps = int(os.environ.get("AB_REPS", "6"))
    for side in (BASE, CHANGED):
        V.cluster_start(side)
    try:
        for n in clients:
            rates = {BASE: [], CHANGED: []}
            for i in range(reps):
                for side in ((BASE, CHANGED) if i % 2 == 0 else (CHANGED, BASE)):
                    r = V.fanin_run(side, n, i)
                    rates[side].append(r["rate"])
                    print(f"{n} clients, rep {i + 1}: {'changed' if side is CHANGED else 'base'} "
                          f"{r['rate']:,.0f} middles/s (server CPU {r['per_op']['server_cpu_us']} us/middle)",
                          flush=True)
            ratio = statistics.median(rates[CHANGED]) / statistics.median(rates[BASE])
            print(f"{n} clients, {V.FANIN_WIDTH:,}-wide: base {sorted(round(x) for x in rates[BASE])}, "
                  f"changed {sorted(round(x) for x in rates[CHANGED])}, changed / base {ratio:.3f}", flush=True)
    finally:
        for side in (BASE, CHANGED):
            V.cluster_stop(side)


if __name__ == "__main__":
    main()

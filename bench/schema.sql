-- Benchmark-only objects, created in `public` of each scratch database next
-- to the flowfabric extension (which lives in schema `flowfabric`): the
-- hand-written baseline tables and a helper that fabricates reconciler work
-- through the real flowfabric.ff_* functions (the incremental flow API).
-- Every flowfabric object is named with its schema.

-- Minimal one-table queue: the baseline for claims, cycles and creates.
CREATE TABLE bench_queue (
    id          bigserial PRIMARY KEY,
    lane        text NOT NULL,
    priority    int NOT NULL DEFAULT 0,
    created_at  bigint NOT NULL,
    state       text NOT NULL DEFAULT 'ready',
    worker      text,
    lease_until bigint,
    payload     jsonb
);
CREATE INDEX bench_queue_claim_idx ON bench_queue (lane, priority DESC, created_at, id)
    WHERE state = 'ready';

-- The same queue with a required-capabilities column: a worker claims the
-- best row whose requirements are a subset of its capabilities.
CREATE TABLE bench_capq (
    id          bigserial PRIMARY KEY,
    lane        text NOT NULL,
    priority    int NOT NULL DEFAULT 0,
    created_at  bigint NOT NULL,
    state       text NOT NULL DEFAULT 'ready',
    worker      text,
    lease_until bigint,
    caps        text[] NOT NULL DEFAULT '{}'
);
CREATE INDEX bench_capq_claim_idx ON bench_capq (lane, priority DESC, created_at, id)
    WHERE state = 'ready';

-- Minimal dependency queue: a row is 'blocked' while `pending` parents have
-- not finished; finishing a row decrements its children and readies those
-- that reach zero (one statement).
CREATE TABLE bench_dag (
    id          bigserial PRIMARY KEY,
    lane        text NOT NULL,
    flow        int NOT NULL,
    priority    int NOT NULL DEFAULT 0,
    created_at  bigint NOT NULL,
    state       text NOT NULL DEFAULT 'ready',
    pending     int NOT NULL DEFAULT 0,
    worker      text,
    lease_until bigint
);
CREATE INDEX bench_dag_claim_idx ON bench_dag (lane, priority DESC, created_at, id)
    WHERE state = 'ready';
CREATE TABLE bench_dag_edge (
    parent bigint NOT NULL,
    child  bigint NOT NULL,
    PRIMARY KEY (parent, child)
);
-- Completion events not yet applied to their children: the baseline of the
-- reconcile section (one statement applies them all).
CREATE TABLE bench_dag_event (
    parent     bigint PRIMARY KEY,
    dispatched boolean NOT NULL DEFAULT false
);

-- Minimal usage counters: the baseline for ff_report_usage and reservations.
CREATE TABLE bench_counter (
    id  int PRIMARY KEY,
    v   bigint NOT NULL DEFAULT 0,
    lim bigint NOT NULL
);

-- Fan-in baseline: the same queue plus start/finish stamps, and a counter
-- that fires the sink when it reaches zero.
CREATE TABLE bench_fanin_queue (
    id          bigserial PRIMARY KEY,
    lane        text NOT NULL,
    priority    int NOT NULL DEFAULT 0,
    created_at  bigint NOT NULL,
    state       text NOT NULL DEFAULT 'ready',
    worker      text,
    lease_until bigint,
    started_at  bigint,
    finished_at bigint
);
CREATE INDEX bench_fanin_queue_claim_idx ON bench_fanin_queue (lane, priority DESC, created_at, id)
    WHERE state = 'ready';
CREATE TABLE bench_fanin_sink (
    id        int PRIMARY KEY,
    remaining int NOT NULL,
    fired_at  bigint
);

CREATE FUNCTION bench_now_ms() RETURNS bigint LANGUAGE sql VOLATILE
AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;

-- n two-node flows whose root was made terminal by hand, each with an
-- undispatched completion event committed a minute ago: work only the
-- dependency reconciler can finish (as in tests/ffhelp.py make_stale_work).
CREATE FUNCTION bench_make_stale_events(lane text, n int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    flow uuid;
    a text;
    b text;
    e uuid;
BEGIN
    FOR i IN 1..n LOOP
        flow := gen_random_uuid();
        PERFORM flowfabric.ff_create_flow(flow);
        a := flowfabric.ff_create_execution(lane, flow_id => flow);
        PERFORM flowfabric.ff_add_execution_to_flow(flow, a);
        b := flowfabric.ff_create_execution(lane, flow_id => flow);
        PERFORM flowfabric.ff_add_execution_to_flow(flow, b);
        e := gen_random_uuid();
        PERFORM flowfabric.ff_stage_dependency_edge(flow, e, a, b, 2);
        PERFORM flowfabric.ff_apply_dependency_to_child(flow, e, b);
        UPDATE flowfabric.ff_exec_core SET lifecycle_phase = 'terminal', eligibility_state = 'not_applicable',
               public_state = 'completed', terminal_outcome = 'success'
         WHERE execution_id = split_part(a, '}:', 2)::uuid;
        INSERT INTO flowfabric.ff_completion_event (partition_key, execution_id, flow_id, outcome, occurred_at_ms,
                                                    committed_at_ms)
        VALUES (0, split_part(a, '}:', 2)::uuid, flow, 'success', 0, bench_now_ms() - 60000);
    END LOOP;
    RETURN n;
END $$;

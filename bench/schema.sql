-- Benchmark-only objects, created in each scratch database next to the
-- flowfabric extension: the hand-written baseline tables and the helpers
-- that build flows through the real ff_* functions.

-- Minimal one-table queue: the baseline for claims.
CREATE TABLE bench_queue (
    id          bigserial PRIMARY KEY,
    lane        text NOT NULL,
    priority    int NOT NULL DEFAULT 0,
    created_at  bigint NOT NULL,
    state       text NOT NULL DEFAULT 'ready',
    worker      text,
    lease_until bigint
);
CREATE INDEX bench_queue_claim_idx ON bench_queue (lane, priority DESC, created_at, id)
    WHERE state = 'ready';

-- Minimal usage counters: the baseline for ff_report_usage.
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

-- root -> width middles -> sink (all_of), built with the real API.
-- Afterwards only the root is claimable.
CREATE FUNCTION bench_build_fanin(lane text, width int, OUT flow uuid, OUT root text, OUT sink text)
LANGUAGE plpgsql AS $$
DECLARE
    mids text[] := '{}';
    m text;
    e uuid;
    rev bigint;
BEGIN
    flow := gen_random_uuid();
    PERFORM ff_create_flow(flow);
    root := ff_create_execution(lane, flow_id => flow);
    PERFORM ff_add_execution_to_flow(flow, root);
    sink := ff_create_execution(lane, flow_id => flow);
    PERFORM ff_add_execution_to_flow(flow, sink);
    FOR i IN 1..width LOOP
        m := ff_create_execution(lane, flow_id => flow);
        PERFORM ff_add_execution_to_flow(flow, m);
        mids := mids || m;
    END LOOP;
    rev := width + 2;
    FOREACH m IN ARRAY mids LOOP
        e := gen_random_uuid();
        rev := ff_stage_dependency_edge(flow, e, root, m, rev);
        PERFORM ff_apply_dependency_to_child(flow, e, m);
        e := gen_random_uuid();
        rev := ff_stage_dependency_edge(flow, e, m, sink, rev);
        PERFORM ff_apply_dependency_to_child(flow, e, sink);
    END LOOP;
END $$;

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
        PERFORM ff_create_flow(flow);
        a := ff_create_execution(lane, flow_id => flow);
        PERFORM ff_add_execution_to_flow(flow, a);
        b := ff_create_execution(lane, flow_id => flow);
        PERFORM ff_add_execution_to_flow(flow, b);
        e := gen_random_uuid();
        PERFORM ff_stage_dependency_edge(flow, e, a, b, 2);
        PERFORM ff_apply_dependency_to_child(flow, e, b);
        UPDATE ff_exec_core SET lifecycle_phase = 'terminal', eligibility_state = 'not_applicable',
               public_state = 'completed', terminal_outcome = 'success'
         WHERE execution_id = split_part(a, '}:', 2)::uuid;
        INSERT INTO ff_completion_event (partition_key, execution_id, flow_id, outcome, occurred_at_ms,
                                         committed_at_ms)
        VALUES (0, split_part(a, '}:', 2)::uuid, flow, 'success', 0, bench_now_ms() - 60000);
    END LOOP;
    RETURN n;
END $$;

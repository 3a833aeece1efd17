-- flowfabric schema, part 5: operations. The background worker's status and
-- views over queues, stale events and budgets.

CREATE TABLE ff_reconciler_status (
    runner            text PRIMARY KEY,
    pid               int,
    last_pass_at_ms   bigint,
    passes            bigint NOT NULL DEFAULT 0,
    last_counts       jsonb,
    last_error        text,
    last_error_at_ms  bigint,
    errors            bigint NOT NULL DEFAULT 0
);
COMMENT ON TABLE ff_reconciler_status IS
    'Last pass of the background worker in this database: time, counts, last error.';

CREATE VIEW ff_queue_depth AS
SELECT lane_id, public_state, count(*) AS executions, min(created_at_ms) AS oldest_created_at_ms
FROM ff_exec_core
WHERE lifecycle_phase <> 'terminal'
GROUP BY lane_id, public_state;
COMMENT ON VIEW ff_queue_depth IS 'Live executions per lane and public state.';

CREATE VIEW ff_stale_completion_events AS
SELECT event_id, execution_id, flow_id, outcome, namespace, instance_tag, committed_at_ms,
       (extract(epoch FROM clock_timestamp()) * 1000)::bigint - committed_at_ms AS age_ms
FROM ff_completion_event
WHERE dispatched_at_ms IS NULL;
COMMENT ON VIEW ff_stale_completion_events IS 'Completion events not dispatched yet, with their age.';

CREATE VIEW ff_budget_health AS
SELECT p.budget_id, d.dimension, coalesce(u.current_value, 0) AS current_usage, d.hard_limit, d.soft_limit,
       CASE WHEN d.hard_limit > 0 AND coalesce(u.current_value, 0) >= d.hard_limit THEN 'at_or_over_hard_limit'
            WHEN d.soft_limit > 0 AND coalesce(u.current_value, 0) > d.soft_limit THEN 'over_soft_limit'
            WHEN d.hard_limit > 0 AND coalesce(u.current_value, 0) >= d.hard_limit * 0.9 THEN 'near_hard_limit'
            ELSE 'ok' END AS status
FROM ff_budget_policy p
CROSS JOIN LATERAL (
    SELECT k AS dimension,
           coalesce((p.policy_json -> 'hard_limits' ->> k)::bigint, 0) AS hard_limit,
           coalesce((p.policy_json -> 'soft_limits' ->> k)::bigint, 0) AS soft_limit
    FROM (SELECT jsonb_object_keys(p.policy_json -> 'hard_limits') AS k
          UNION SELECT jsonb_object_keys(p.policy_json -> 'soft_limits')) keys
) d
LEFT JOIN ff_budget_usage u ON u.budget_id = p.budget_id AND u.dimensions_key = d.dimension;
COMMENT ON VIEW ff_budget_health IS 'Usage against limits per budget dimension: ok, near_hard_limit, over_soft_limit, at_or_over_hard_limit.';

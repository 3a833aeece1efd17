-- flowfabric code: re-created by every upgrade script (scripts/upgrade-sql.py).
-- flowfabric schema: views for operators.

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
SELECT u.budget_id, u.dimensions_key AS dimension, u.current_value AS current_usage,
       coalesce(r.reserved, 0)::bigint AS reserved, u.hard_limit, u.soft_limit, p.enforcement_mode,
       CASE WHEN u.hard_limit > 0 AND u.current_value >= u.hard_limit THEN 'at_or_over_hard_limit'
            WHEN u.soft_limit > 0 AND u.current_value > u.soft_limit THEN 'over_soft_limit'
            WHEN u.hard_limit > 0 AND u.current_value + coalesce(r.reserved, 0) >= u.hard_limit * 0.9
                THEN 'near_hard_limit'
            ELSE 'ok' END AS status
FROM ff_budget_usage u
JOIN ff_budget_policy p ON p.budget_id = u.budget_id
LEFT JOIN LATERAL (
    SELECT sum(l.reserved) AS reserved FROM ff_budget_usage_by_exec l
    WHERE l.budget_id = u.budget_id AND l.dimensions_key = u.dimensions_key AND l.reserved > 0
) r ON true;
COMMENT ON VIEW ff_budget_health IS 'Usage and reservations against limits per budget dimension: ok, near_hard_limit (usage + reserved >= 90 %), over_soft_limit, at_or_over_hard_limit.';

CREATE VIEW ff_dead_letters AS
SELECT format('{fp:%s}:%s', partition_key, execution_id) AS execution_id, lane_id, flow_id, node_name,
       terminal_outcome, last_error, attempt_index AS attempts, max_attempts, payload, terminal_at_ms, created_at_ms
FROM ff_exec_core
WHERE terminal_outcome IN ('failed', 'expired');
COMMENT ON VIEW ff_dead_letters IS 'Executions that ended failed or expired, with their last error; re-drive one with ff_retry_execution.';

CREATE VIEW ff_metrics AS
SELECT 'lane'::text AS scope, c.lane_id AS name, m.metric, sum(m.value)::bigint AS value
FROM ff_lane_counter c
CROSS JOIN LATERAL (VALUES ('created', c.created), ('claimed', c.claimed), ('completed', c.completed),
                           ('failed', c.failed), ('expired', c.expired), ('retried', c.retried)) AS m(metric, value)
GROUP BY c.lane_id, m.metric
UNION ALL
SELECT 'reconciler', reconciler, counter, value FROM ff_reconciler_total;
COMMENT ON VIEW ff_metrics IS 'Cumulative counters for scraping: per lane (created, claimed, completed, failed, expired, retried) and per reconciler.';

-- flowfabric schema, part 5: schedules. Each due time of a schedule creates
-- exactly one execution: the reconciler that takes a due schedule holds its
-- row (SKIP LOCKED for the others) while it creates the executions and
-- moves next_due_at_ms on, in one transaction.

CREATE TABLE ff_schedule (
    schedule_id            text PRIMARY KEY,
    cron                   text NOT NULL,
    lane_id                text NOT NULL,
    payload                jsonb,
    priority               int NOT NULL DEFAULT 0,
    required_capabilities  text[] NOT NULL DEFAULT '{}',
    budget_ids             text[] NOT NULL DEFAULT '{}',
    budget_reserve         jsonb,
    quota_policy_id        text,
    max_attempts           int NOT NULL DEFAULT 1,
    retry_policy           jsonb,
    -- The next due time (UTC, unix ms) not yet turned into an execution.
    next_due_at_ms         bigint NOT NULL,
    last_due_at_ms         bigint,
    runs                   bigint NOT NULL DEFAULT 0,
    -- Due times skipped because more than flowfabric.schedule_catchup were missed.
    missed                 bigint NOT NULL DEFAULT 0,
    created_at_ms          bigint NOT NULL,
    updated_at_ms          bigint NOT NULL
);
CREATE INDEX ff_schedule_due_idx ON ff_schedule (next_due_at_ms);

-- flowfabric schema, part 2: budgets and quotas.
--
-- Locks (see exec.rs for the whole order): a report or a claim with a
-- reservation locks the policy row of each budget, in ascending budget id,
-- then usage rows in ascending dimension; a claim locks its quota policy
-- row. Rows that belong to one execution (its ledger and quota admission)
-- are only written by whoever holds that execution's row, so ending a lease
-- never waits on a shared row: reserved amounts and quota concurrency are
-- sums over those rows, not counters.

CREATE TABLE ff_budget_policy (
    budget_id          text PRIMARY KEY,
    partition_key      smallint NOT NULL,
    -- {"hard_limits", "soft_limits", "reset_interval_ms", "on_hard_limit", "on_soft_limit"}
    policy_json        jsonb NOT NULL,
    scope_type         text NOT NULL DEFAULT '',
    scope_id           text NOT NULL DEFAULT '',
    enforcement_mode   text NOT NULL DEFAULT 'strict',
    on_hard_limit      text NOT NULL DEFAULT 'reject',
    on_soft_limit      text NOT NULL DEFAULT 'warn',
    breach_count       bigint NOT NULL DEFAULT 0,
    soft_breach_count  bigint NOT NULL DEFAULT 0,
    last_breach_at_ms  bigint,
    last_breach_dim    text,
    next_reset_at_ms   bigint,
    created_at_ms      bigint NOT NULL,
    updated_at_ms      bigint NOT NULL
);
CREATE INDEX ff_budget_policy_reset_due_idx ON ff_budget_policy (next_reset_at_ms)
    WHERE next_reset_at_ms IS NOT NULL;

-- One row per dimension: every limited dimension has one from creation, so
-- a report within limits is a single UPDATE; the limits are copied here
-- (they never change) so that UPDATE needs nothing else.
CREATE TABLE ff_budget_usage (
    budget_id         text NOT NULL,
    dimensions_key    text NOT NULL,
    partition_key     smallint NOT NULL,
    current_value     bigint NOT NULL DEFAULT 0,
    hard_limit        bigint NOT NULL DEFAULT 0,
    soft_limit        bigint NOT NULL DEFAULT 0,
    last_reset_at_ms  bigint,
    updated_at_ms     bigint NOT NULL,
    PRIMARY KEY (budget_id, dimensions_key)
);

-- Dedup keys are scoped to a budget: the same key on two budgets is two reports.
CREATE TABLE ff_budget_usage_dedup (
    budget_id      text NOT NULL,
    dedup_key      text NOT NULL,
    partition_key  smallint NOT NULL,
    outcome_json   jsonb NOT NULL DEFAULT '{}',
    applied_at_ms  bigint NOT NULL,
    expires_at_ms  bigint NOT NULL,
    PRIMARY KEY (budget_id, dedup_key)
);
CREATE INDEX ff_budget_usage_dedup_expiry_idx ON ff_budget_usage_dedup (expires_at_ms);

-- Per-execution ledger: what an execution spent (so ff_release_budget can
-- hand it back) and what it still holds in reserve while leased.
CREATE TABLE ff_budget_usage_by_exec (
    budget_id       text NOT NULL,
    execution_id    uuid NOT NULL,
    dimensions_key  text NOT NULL,
    partition_key   smallint NOT NULL,
    delta_total     bigint NOT NULL DEFAULT 0,
    reserved        bigint NOT NULL DEFAULT 0,
    updated_at_ms   bigint NOT NULL,
    PRIMARY KEY (budget_id, execution_id, dimensions_key)
);
CREATE INDEX ff_budget_usage_by_exec_execution_idx ON ff_budget_usage_by_exec (execution_id);
CREATE INDEX ff_budget_usage_by_exec_reserved_idx ON ff_budget_usage_by_exec (budget_id, dimensions_key)
    INCLUDE (reserved) WHERE reserved > 0;

CREATE TABLE ff_quota_policy (
    quota_policy_id             text PRIMARY KEY,
    partition_key               smallint NOT NULL,
    requests_per_window_seconds bigint NOT NULL CHECK (requests_per_window_seconds > 0),
    max_requests_per_window     bigint NOT NULL CHECK (max_requests_per_window >= 0),
    active_concurrency_cap      bigint NOT NULL CHECK (active_concurrency_cap >= 0),
    created_at_ms               bigint NOT NULL,
    updated_at_ms               bigint NOT NULL
);

-- One row per admission inside the sliding window (trimmed by the reconciler).
CREATE TABLE ff_quota_window (
    quota_policy_id  text NOT NULL,
    admitted_at_ms   bigint NOT NULL,
    execution_id     uuid NOT NULL,
    partition_key    smallint NOT NULL,
    PRIMARY KEY (quota_policy_id, admitted_at_ms, execution_id)
);

-- Executions currently holding a concurrency slot of a quota policy; the
-- active concurrency is the count of these rows.
CREATE TABLE ff_quota_admitted (
    quota_policy_id  text NOT NULL,
    execution_id     uuid NOT NULL,
    partition_key    smallint NOT NULL,
    admitted_at_ms   bigint NOT NULL,
    PRIMARY KEY (quota_policy_id, execution_id)
);

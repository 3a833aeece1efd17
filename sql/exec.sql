-- flowfabric schema, part 3: lanes, capability sets, executions, attempts
-- and claim grants.
--
-- Execution state is written by exec.rs only; the columns keep FlowFabric's
-- literals (lifecycle_phase / eligibility_state / public_state). There are
-- no CHECK constraints on this hot table: PostgreSQL re-parses them on every
-- write, and the one module that writes the states guarantees them.

-- A lane exists once anything names it; `paused` stops its claims.
CREATE TABLE ff_lane (
    lane_id        text PRIMARY KEY,
    paused         boolean NOT NULL DEFAULT false,
    paused_at_ms   bigint,
    created_at_ms  bigint NOT NULL
);

-- Each distinct set of required capabilities gets a small id, so the claim
-- index can keep the sets apart and a worker only looks at the sets its
-- capabilities satisfy. Sets are never deleted (ids are referenced by rows).
CREATE TABLE ff_capability_set (
    cap_set_id     int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    capabilities   text[] NOT NULL UNIQUE
);
INSERT INTO ff_capability_set (capabilities) VALUES ('{}');

CREATE TABLE ff_exec_core (
    execution_id               uuid PRIMARY KEY,
    -- Creation order, the FIFO tie-break among equal priority and millisecond.
    queue_seq                  bigint GENERATED ALWAYS AS IDENTITY,
    partition_key              smallint NOT NULL,
    flow_id                    uuid,
    node_name                  text,
    lane_id                    text NOT NULL,
    namespace                  text NOT NULL DEFAULT 'default',
    instance_tag               text,
    required_capabilities      text[] NOT NULL DEFAULT '{}',
    cap_set_id                 int NOT NULL DEFAULT 1,
    budget_ids                 text[] NOT NULL DEFAULT '{}',
    -- {"dim": n}: held against every strict budget while leased.
    budget_reserve             jsonb,
    quota_policy_id            text,
    unique_key                 text,
    priority                   int NOT NULL DEFAULT 0,
    lifecycle_phase            text NOT NULL,
    ownership_state            text NOT NULL DEFAULT 'unowned',
    eligibility_state          text NOT NULL,
    public_state               text NOT NULL,
    attempt_state              text NOT NULL,
    terminal_outcome           text,
    attempt_index              int NOT NULL DEFAULT 0,
    -- Attempts before the current allowance (ff_retry_execution moves it):
    -- another attempt is allowed while attempt_index - attempt_offset < max_attempts.
    attempt_offset             int NOT NULL DEFAULT 0,
    max_attempts               int NOT NULL DEFAULT 1,
    retry_base_ms              bigint NOT NULL DEFAULT 1000,
    retry_max_ms               bigint NOT NULL DEFAULT 60000,
    retry_jitter               boolean NOT NULL DEFAULT true,
    -- Not claimable before this time (delay_until_ms, retry backoff).
    eligible_at_ms             bigint NOT NULL DEFAULT 0,
    payload                    jsonb,
    result                     jsonb,
    last_error                 text,
    cancellation_reason        text,
    created_at_ms              bigint NOT NULL,
    started_at_ms              bigint,
    terminal_at_ms             bigint,
    lease_expires_at_ms        bigint,
    current_worker_id          text,
    current_worker_instance_id text,
    current_grant_id           bytea
);

-- The claim pick: best runnable execution of a lane and capability set, one
-- index range scan per set the worker satisfies.
CREATE INDEX ff_exec_core_claim_idx
    ON ff_exec_core (lane_id, cap_set_id, priority DESC, created_at_ms, queue_seq)
    WHERE lifecycle_phase = 'runnable'
      AND eligibility_state IN ('eligible_now', 'not_eligible_until_time');
CREATE INDEX ff_exec_core_lease_expiry_idx ON ff_exec_core (lease_expires_at_ms)
    WHERE lifecycle_phase = 'active';
CREATE INDEX ff_exec_core_delayed_idx ON ff_exec_core (eligible_at_ms)
    WHERE eligibility_state = 'not_eligible_until_time';
-- A flow's members, and node names unique within a flow (unnamed members,
-- node_name NULL, never conflict). One index for both: every claim and
-- ending of a flow member is a non-HOT update that adds an entry to each.
CREATE UNIQUE INDEX ff_exec_core_flow_idx ON ff_exec_core (flow_id, node_name)
    WHERE flow_id IS NOT NULL;
-- Listing in creation order (ff_list_executions keyset pagination).
CREATE INDEX ff_exec_core_lane_seq_idx ON ff_exec_core (lane_id, queue_seq);
CREATE UNIQUE INDEX ff_exec_core_seq_idx ON ff_exec_core (queue_seq);
-- Dead letters: failed and expired executions only.
CREATE INDEX ff_exec_core_dead_idx ON ff_exec_core (terminal_at_ms)
    WHERE terminal_outcome IN ('failed', 'expired');
-- unique_key: one live execution per lane and key.
CREATE UNIQUE INDEX ff_exec_core_unique_key_idx ON ff_exec_core (lane_id, unique_key)
    WHERE unique_key IS NOT NULL AND lifecycle_phase <> 'terminal';

-- No foreign key to ff_exec_core: its check would cost every claim a lookup,
-- and attempts are only ever written next to their execution.
CREATE TABLE ff_attempt (
    execution_id        uuid NOT NULL,
    attempt_index       int NOT NULL,
    partition_key       smallint NOT NULL,
    worker_id           text NOT NULL,
    worker_instance_id  text NOT NULL,
    lease_epoch         bigint NOT NULL DEFAULT 1,
    lease_expires_at_ms bigint,
    started_at_ms       bigint NOT NULL,
    terminal_at_ms      bigint,
    outcome             text,
    error               text,
    PRIMARY KEY (execution_id, attempt_index)
);

-- Signed grants handed to workers; grant_id is sha256(grant_key).
CREATE TABLE ff_claim_grant (
    grant_id            bytea PRIMARY KEY,
    partition_key       smallint NOT NULL,
    execution_id        uuid NOT NULL,
    kind                text NOT NULL DEFAULT 'claim',
    worker_id           text NOT NULL,
    worker_instance_id  text NOT NULL,
    lane_id             text NOT NULL,
    kid                 text NOT NULL,
    grant_ttl_ms        bigint NOT NULL,
    issued_at_ms        bigint NOT NULL,
    expires_at_ms       bigint NOT NULL
);
CREATE INDEX ff_claim_grant_expiry_idx ON ff_claim_grant (expires_at_ms);

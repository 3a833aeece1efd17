-- flowfabric schema, part 3: executions, attempts and claim grants.

CREATE TABLE ff_exec_core (
    execution_id               uuid PRIMARY KEY,
    -- Creation order, the FIFO tie-break among equal priority and millisecond.
    queue_seq                  bigint GENERATED ALWAYS AS IDENTITY,
    partition_key              smallint NOT NULL,
    flow_id                    uuid,
    lane_id                    text NOT NULL,
    namespace                  text NOT NULL DEFAULT 'default',
    instance_tag               text,
    required_capabilities      text[] NOT NULL DEFAULT '{}',
    budget_ids                 text[] NOT NULL DEFAULT '{}',
    quota_policy_id            text,
    priority                   int NOT NULL DEFAULT 0,
    lifecycle_phase            text NOT NULL
        CHECK (lifecycle_phase IN ('runnable', 'active', 'terminal')),
    ownership_state            text NOT NULL DEFAULT 'unowned'
        CHECK (ownership_state IN ('unowned', 'leased')),
    eligibility_state          text NOT NULL
        CHECK (eligibility_state IN ('eligible_now', 'not_eligible_until_time',
                                     'blocked_by_dependencies', 'not_applicable')),
    public_state               text NOT NULL,
    attempt_state              text NOT NULL,
    terminal_outcome           text
        CHECK (terminal_outcome IN ('success', 'failed', 'cancelled', 'skipped', 'expired')),
    attempt_index              int NOT NULL DEFAULT 0,
    max_attempts               int NOT NULL DEFAULT 1 CHECK (max_attempts >= 1),
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

-- The claim pick: best runnable execution of a lane, one index range scan.
CREATE INDEX ff_exec_core_claim_idx
    ON ff_exec_core (lane_id, priority DESC, created_at_ms, queue_seq)
    WHERE lifecycle_phase = 'runnable'
      AND eligibility_state IN ('eligible_now', 'not_eligible_until_time');
CREATE INDEX ff_exec_core_lease_expiry_idx ON ff_exec_core (lease_expires_at_ms)
    WHERE lifecycle_phase = 'active';
CREATE INDEX ff_exec_core_delayed_idx ON ff_exec_core (eligible_at_ms)
    WHERE eligibility_state = 'not_eligible_until_time';
CREATE INDEX ff_exec_core_flow_idx ON ff_exec_core (flow_id) WHERE flow_id IS NOT NULL;

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
    kind                text NOT NULL DEFAULT 'claim' CHECK (kind IN ('claim', 'reclaim')),
    worker_id           text NOT NULL,
    worker_instance_id  text NOT NULL,
    lane_id             text NOT NULL,
    kid                 text NOT NULL,
    grant_ttl_ms        bigint NOT NULL,
    issued_at_ms        bigint NOT NULL,
    expires_at_ms       bigint NOT NULL
);
CREATE INDEX ff_claim_grant_execution_idx ON ff_claim_grant (execution_id);
CREATE INDEX ff_claim_grant_expiry_idx ON ff_claim_grant (expires_at_ms);

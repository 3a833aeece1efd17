-- flowfabric schema, part 4: flows, edges, edge groups and the completion outbox.

CREATE TABLE ff_flow_core (
    flow_id            uuid PRIMARY KEY,
    partition_key      smallint NOT NULL,
    flow_kind          text NOT NULL DEFAULT 'dag',
    namespace          text NOT NULL DEFAULT 'default',
    graph_revision     bigint NOT NULL DEFAULT 0,
    -- open until every member is terminal, then completed / failed / cancelled.
    public_flow_state  text NOT NULL DEFAULT 'open'
        CHECK (public_flow_state IN ('open', 'completed', 'failed', 'cancelled')),
    node_count         int NOT NULL DEFAULT 0,
    edge_count         int NOT NULL DEFAULT 0,
    -- Members not terminal yet, and members that ended failed or expired.
    live_count         int NOT NULL DEFAULT 0,
    failed_count       int NOT NULL DEFAULT 0,
    cancel_reason      text,
    -- Set by ff_cancel_flow; members it could not end at once (held by an
    -- open transaction) are ended by the reconciler.
    cancel_requested_at_ms bigint,
    -- ff_submit_flow: digest of the spec and the answer it gave, so a
    -- re-submission is recognised.
    submit_digest      text,
    submit_answer      jsonb,
    created_at_ms      bigint NOT NULL,
    terminal_at_ms     bigint
);
-- Flows being cancelled with members still live (a cancelling flow stays
-- open until its last member ends). Not keyed on live_count: every member
-- ending updates that column, and an indexed one would make those updates
-- non-HOT.
CREATE INDEX ff_flow_core_cancelling_idx ON ff_flow_core (flow_id)
    WHERE cancel_requested_at_ms IS NOT NULL AND public_flow_state = 'open';
CREATE INDEX ff_flow_core_terminal_idx ON ff_flow_core (terminal_at_ms)
    WHERE public_flow_state <> 'open';

CREATE TABLE ff_edge (
    flow_id           uuid NOT NULL REFERENCES ff_flow_core ON DELETE CASCADE,
    edge_id           uuid NOT NULL,
    partition_key     smallint NOT NULL,
    upstream_eid      uuid NOT NULL,
    downstream_eid    uuid NOT NULL,
    dependency_kind   text NOT NULL DEFAULT 'success_only',
    data_passing_ref  text,
    edge_state        text NOT NULL DEFAULT 'pending' CHECK (edge_state IN ('pending', 'applied')),
    -- How the upstream resolved for this edge; set once, so a replayed
    -- completion never counts twice.
    resolution        text CHECK (resolution IN ('success', 'fail', 'skip')),
    created_at_ms     bigint NOT NULL,
    applied_at_ms     bigint,
    PRIMARY KEY (flow_id, edge_id)
);
CREATE INDEX ff_edge_upstream_idx ON ff_edge (upstream_eid);
CREATE INDEX ff_edge_downstream_idx ON ff_edge (downstream_eid);
-- Applied edges still waiting on their upstream (what the repair pass checks).
CREATE INDEX ff_edge_unresolved_idx ON ff_edge (upstream_eid)
    WHERE edge_state = 'applied' AND resolution IS NULL;

-- The inbound edges of one downstream. Counts: staged but not applied
-- (pending), applied and waiting (running), and resolved by outcome.
CREATE TABLE ff_edge_group (
    flow_id          uuid NOT NULL REFERENCES ff_flow_core ON DELETE CASCADE,
    downstream_eid   uuid NOT NULL,
    partition_key    smallint NOT NULL,
    policy           jsonb NOT NULL DEFAULT '{"kind":"all_of"}',
    pending_count    int NOT NULL DEFAULT 0,
    running_count    int NOT NULL DEFAULT 0,
    success_count    int NOT NULL DEFAULT 0,
    fail_count       int NOT NULL DEFAULT 0,
    skip_count       int NOT NULL DEFAULT 0,
    -- pending until the group fires once, then satisfied or impossible for good.
    group_state      text NOT NULL DEFAULT 'pending'
        CHECK (group_state IN ('pending', 'satisfied', 'impossible')),
    -- The decision has been carried out on the downstream (and siblings).
    settled          boolean NOT NULL DEFAULT false,
    PRIMARY KEY (flow_id, downstream_eid)
);
CREATE INDEX ff_edge_group_unsettled_idx ON ff_edge_group (flow_id)
    WHERE group_state <> 'pending' AND NOT settled;
-- A downstream has one group. The cascade finds groups by downstream alone:
-- given the flow too, the planner may walk the flow's whole key range.
CREATE UNIQUE INDEX ff_edge_group_downstream_idx ON ff_edge_group (downstream_eid);

CREATE TABLE ff_completion_event (
    event_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    partition_key     smallint NOT NULL,
    execution_id      uuid NOT NULL,
    flow_id           uuid,
    outcome           text NOT NULL,
    namespace         text,
    instance_tag      text,
    occurred_at_ms    bigint NOT NULL,
    committed_at_ms   bigint NOT NULL
        DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
    dispatched_at_ms  bigint
);
CREATE INDEX ff_completion_event_pending_idx ON ff_completion_event (event_id)
    WHERE dispatched_at_ms IS NULL;
-- A flow member's event is deleted with its flow (retention), found by flow.
-- Partial, so solo completions (the hot path) do not maintain it.
CREATE INDEX ff_completion_event_flow_idx ON ff_completion_event (flow_id)
    WHERE flow_id IS NOT NULL;

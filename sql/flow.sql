-- flowfabric schema, part 4: flows, edges, edge groups and the completion outbox.

CREATE TABLE ff_flow_core (
    flow_id            uuid PRIMARY KEY,
    partition_key      smallint NOT NULL,
    flow_kind          text NOT NULL DEFAULT 'dag',
    namespace          text NOT NULL DEFAULT 'default',
    graph_revision     bigint NOT NULL DEFAULT 0,
    public_flow_state  text NOT NULL DEFAULT 'open'
        CHECK (public_flow_state IN ('open', 'completed', 'failed', 'cancelled')),
    node_count         int NOT NULL DEFAULT 0,
    edge_count         int NOT NULL DEFAULT 0,
    cancel_reason      text,
    created_at_ms      bigint NOT NULL,
    terminal_at_ms     bigint
);

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

CREATE TABLE ff_edge_group (
    flow_id                          uuid NOT NULL REFERENCES ff_flow_core ON DELETE CASCADE,
    downstream_eid                   uuid NOT NULL,
    partition_key                    smallint NOT NULL,
    policy                           jsonb NOT NULL DEFAULT '{"kind":"all_of"}',
    success_count                    int NOT NULL DEFAULT 0,
    fail_count                       int NOT NULL DEFAULT 0,
    skip_count                       int NOT NULL DEFAULT 0,
    running_count                    int NOT NULL DEFAULT 0,
    -- pending until the group fires once, then satisfied or impossible for good.
    group_state                      text NOT NULL DEFAULT 'pending'
        CHECK (group_state IN ('pending', 'satisfied', 'impossible')),
    cancel_siblings_pending_flag     boolean NOT NULL DEFAULT false,
    cancel_siblings_pending_members  text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (flow_id, downstream_eid)
);

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
CREATE INDEX ff_completion_event_execution_idx ON ff_completion_event (execution_id);

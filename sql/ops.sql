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

-- Counters since the extension was created. Each backend adds to its own
-- row per lane (slot = its backend id), so counting never makes two
-- transactions wait for each other; the view sums the slots.
CREATE TABLE ff_lane_counter (
    lane_id    text NOT NULL,
    slot       int NOT NULL,
    created    bigint NOT NULL DEFAULT 0,
    claimed    bigint NOT NULL DEFAULT 0,
    completed  bigint NOT NULL DEFAULT 0,
    failed     bigint NOT NULL DEFAULT 0,
    expired    bigint NOT NULL DEFAULT 0,
    retried    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (lane_id, slot)
);

-- Totals of every reconciler pass, by reconciler and count.
CREATE TABLE ff_reconciler_total (
    reconciler  text NOT NULL,
    counter     text NOT NULL,
    value       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (reconciler, counter)
);

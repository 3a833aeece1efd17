-- flowfabric code: re-created by every upgrade script (scripts/upgrade-sql.py).
-- flowfabric schema, last part: runs after every table and function exists;
-- every statement here may run again (an upgrade re-runs it).

-- One random active signing key, so claims work right after CREATE EXTENSION.
-- It is marked as seeded (a restore replaces it); an upgrade keeps the keys it finds.
SELECT ff_rotate_hmac_secret('ff-' || (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
WHERE NOT EXISTS (SELECT FROM ff_waitpoint_hmac);
UPDATE ff_waitpoint_hmac SET seeded = true WHERE xmin = xid(pg_current_xact_id()) AND active;

-- Engine state is data to pg_dump, not part of the extension's definition.
-- One call per statement: each rewrites the extension's catalog row.
SELECT pg_catalog.pg_extension_config_dump('ff_partition_config', '');
SELECT pg_catalog.pg_extension_config_dump('ff_lane', '');
SELECT pg_catalog.pg_extension_config_dump('ff_capability_set', 'WHERE cap_set_id > 1');
SELECT pg_catalog.pg_extension_config_dump('ff_capability_set_cap_set_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ff_waitpoint_hmac', '');
SELECT pg_catalog.pg_extension_config_dump('ff_exec_core', '');
SELECT pg_catalog.pg_extension_config_dump('ff_attempt', '');
SELECT pg_catalog.pg_extension_config_dump('ff_claim_grant', '');
SELECT pg_catalog.pg_extension_config_dump('ff_flow_core', '');
SELECT pg_catalog.pg_extension_config_dump('ff_edge', '');
SELECT pg_catalog.pg_extension_config_dump('ff_edge_group', '');
SELECT pg_catalog.pg_extension_config_dump('ff_completion_event', '');
SELECT pg_catalog.pg_extension_config_dump('ff_budget_policy', '');
SELECT pg_catalog.pg_extension_config_dump('ff_budget_usage', '');
SELECT pg_catalog.pg_extension_config_dump('ff_budget_usage_dedup', '');
SELECT pg_catalog.pg_extension_config_dump('ff_budget_usage_by_exec', '');
SELECT pg_catalog.pg_extension_config_dump('ff_quota_policy', '');
SELECT pg_catalog.pg_extension_config_dump('ff_quota_window', '');
SELECT pg_catalog.pg_extension_config_dump('ff_quota_admitted', '');
SELECT pg_catalog.pg_extension_config_dump('ff_reconciler_status', '');
SELECT pg_catalog.pg_extension_config_dump('ff_schedule', '');
SELECT pg_catalog.pg_extension_config_dump('ff_lane_counter', '');
SELECT pg_catalog.pg_extension_config_dump('ff_reconciler_total', '');
SELECT pg_catalog.pg_extension_config_dump('ff_exec_core_queue_seq_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ff_completion_event_event_id_seq', '');

-- Every statement the functions run is written for one plan whatever its
-- parameters (index lookups by key; a set of keys as one = ANY array key,
-- not joined to the table, so no plan can redo the array for every row:
-- see db::keyed in the sources). Left alone, the plan cache keeps
-- re-planning statements whose custom plans look cheaper than the generic
-- one (an unnest of a one-element array versus an unknown one), and a
-- cascade then spends most of its time planning. So each function plans
-- its statements once.
--
-- That one plan is kept for the life of the session, and a worker's session
-- lives long: planned while ff_attempt or ff_claim_grant were nearly empty
-- (a fresh install, a queue just drained and vacuumed), a key lookup
-- becomes a sequential scan that then grows with the table until the
-- session ends (or autovacuum's next ANALYZE invalidates the plan). So the
-- functions also plan without sequential scans: every statement has an
-- index for its key, and a table without one (a one-row settings table) is
-- still scanned. Such a scan carries the planner's penalty cost, which
-- would cross jit_above_cost and compile the statement on every call: the
-- functions run without JIT (their statements touch a few rows each).
DO $$
DECLARE f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
             JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                  AND d.objid = p.oid AND d.deptype = 'e'
             JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'flowfabric'
             WHERE p.prosecdef
    LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off', f);
    END LOOP;
END $$;

-- The claim's one good plan is the ordered scan of ff_exec_core_claim_idx:
-- never let a sort-based plan replace the index order.
ALTER FUNCTION ff_claim_for_worker(text, text, text, text[], bigint)
    SET plan_cache_mode = force_generic_plan SET enable_sort = off;
ALTER FUNCTION ff_claim_batch(text[], text, text, text[], bigint, int)
    SET plan_cache_mode = force_generic_plan SET enable_sort = off;

-- Hot tables: rows are updated and deleted all day. Vacuum them early, and
-- leave free space in pages that take frequent updates so most are HOT.
ALTER TABLE ff_exec_core SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_attempt SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_claim_grant SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_completion_event SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_budget_usage_dedup SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_quota_window SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_quota_admitted SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_budget_usage_by_exec SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_budget_usage SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_budget_policy SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_quota_policy SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_edge_group SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.05);
-- Every member ending updates its flow row.
ALTER TABLE ff_flow_core SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE ff_lane_counter SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0);

-- flowfabric schema: roles and privileges.
--
-- flowfabric_worker may claim, renew, complete and fail executions, report
-- usage, read an execution and verify grants. flowfabric_admin may call
-- every function and read every table except the HMAC keystore. Neither
-- role (nor PUBLIC) can write engine tables directly: the functions are
-- SECURITY DEFINER with a pinned search_path and do the writing.
-- Roles are cluster-wide and outlive DROP EXTENSION.
DO $$
DECLARE
    ext oid := (SELECT oid FROM pg_extension WHERE extname = 'flowfabric');
    worker_functions text[] := ARRAY[
        'ff_claim_for_worker', 'ff_claim_batch', 'ff_renew_lease', 'ff_complete_execution', 'ff_fail_execution',
        'ff_report_usage', 'ff_record_spend', 'ff_verify_grant', 'ff_get_execution', 'ff_get_inputs',
        'ff_lane_channel'];
    f record;
    t record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'flowfabric_worker') THEN
        CREATE ROLE flowfabric_worker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'flowfabric_admin') THEN
        CREATE ROLE flowfabric_admin NOLOGIN;
    END IF;
    -- The roles may use the schema; only its owner may create in it.
    GRANT USAGE ON SCHEMA flowfabric TO flowfabric_worker, flowfabric_admin;
    FOR f IN
        SELECT p.oid::regprocedure AS sig, p.proname, p.prorettype = 'trigger'::regtype AS is_trigger
        FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid
        WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext
          AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
        CONTINUE WHEN f.is_trigger;
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO flowfabric_admin', f.sig);
        IF f.proname = ANY (worker_functions) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO flowfabric_worker', f.sig);
        END IF;
    END LOOP;
    FOR t IN
        SELECT c.oid::regclass AS rel
        FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
        WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext
          AND d.classid = 'pg_class'::regclass AND d.deptype = 'e'
          AND c.relkind IN ('r', 'v') AND c.relname <> 'ff_waitpoint_hmac'
    LOOP
        EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', t.rel);
        EXECUTE format('GRANT SELECT ON %s TO flowfabric_admin', t.rel);
    END LOOP;
    REVOKE ALL ON ff_waitpoint_hmac FROM PUBLIC;
END $$;

-- flowfabric 0.1.0 -> 0.2.0: roles and SECURITY DEFINER functions, engine
-- state marked for pg_dump, and restores that replace the seeded key.

DO $$
DECLARE
    ext oid := (SELECT oid FROM pg_extension WHERE extname = 'flowfabric');
    f record;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure AS sig
        FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid
        WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext
          AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
          AND p.proname LIKE 'ff\_%' AND p.prorettype <> 'trigger'::regtype
          AND p.proname <> 'ff_lane_channel'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', f.sig);
    END LOOP;
END $$;

ALTER TABLE ff_waitpoint_hmac ADD COLUMN seeded boolean NOT NULL DEFAULT false;
ALTER TABLE ff_attempt DROP CONSTRAINT ff_attempt_execution_id_fkey;

CREATE OR REPLACE FUNCTION ff_partition_config_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = @extschema@, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'ff_partition_config holds exactly one row; update it instead'
            USING ERRCODE = '55000';
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF EXISTS (SELECT 1 FROM ff_partition_config) THEN
            UPDATE ff_partition_config SET num_flow_partitions = NEW.num_flow_partitions,
                num_budget_partitions = NEW.num_budget_partitions,
                num_quota_partitions = NEW.num_quota_partitions;
            RETURN NULL;
        END IF;
        RETURN NEW;
    END IF;
    IF pg_trigger_depth() = 1
       AND (NEW.num_flow_partitions, NEW.num_budget_partitions, NEW.num_quota_partitions)
           IS DISTINCT FROM (OLD.num_flow_partitions, OLD.num_budget_partitions, OLD.num_quota_partitions)
       AND (EXISTS (SELECT 1 FROM ff_exec_core) OR EXISTS (SELECT 1 FROM ff_flow_core)
            OR EXISTS (SELECT 1 FROM ff_budget_policy) OR EXISTS (SELECT 1 FROM ff_quota_policy))
    THEN
        RAISE EXCEPTION 'partition counts are fixed once engine data exists'
            USING ERRCODE = '55000';
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION ff_waitpoint_hmac_replace_seed() RETURNS trigger
LANGUAGE plpgsql SET search_path = @extschema@, pg_temp AS $$
BEGIN
    IF NEW.active THEN
        DELETE FROM ff_waitpoint_hmac k
        WHERE k.active AND k.seeded AND k.kid <> NEW.kid
          AND NOT EXISTS (SELECT 1 FROM ff_claim_grant g WHERE g.kid = k.kid);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER ff_waitpoint_hmac_replace_seed
    BEFORE INSERT ON ff_waitpoint_hmac
    FOR EACH ROW EXECUTE FUNCTION ff_waitpoint_hmac_replace_seed();

-- One call per statement: each rewrites the extension's catalog row.
SELECT pg_catalog.pg_extension_config_dump('ff_partition_config', '');
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
SELECT pg_catalog.pg_extension_config_dump('ff_exec_core_queue_seq_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ff_completion_event_event_id_seq', '');

-- The claim's pick is parameterised on the lane, the time and the worker's
-- capabilities; left alone, the plan cache re-plans it on every call. Its one
-- good plan is the ordered scan of ff_exec_core_claim_idx, so plan it once,
-- and never let a sort-based plan replace the index order.
ALTER FUNCTION ff_claim_for_worker(text, text, text, text[], bigint)
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
ALTER TABLE ff_budget_usage SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_budget_policy SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_quota_policy SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE ff_edge_group SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.05);

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
        'ff_claim_for_worker', 'ff_renew_lease', 'ff_complete_execution', 'ff_fail_execution',
        'ff_report_usage', 'ff_record_spend', 'ff_verify_grant', 'ff_get_execution', 'ff_lane_channel'];
    f record;
    t record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'flowfabric_worker') THEN
        CREATE ROLE flowfabric_worker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'flowfabric_admin') THEN
        CREATE ROLE flowfabric_admin NOLOGIN;
    END IF;
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

UPDATE ff_partition_config SET ff_version = '0.2.0';

-- flowfabric code: re-created by every upgrade script (scripts/upgrade-sql.py).
-- flowfabric schema: trigger functions and triggers on engine tables.

-- Partition slots are baked into stored ids, so the counts may change only
-- while the engine holds no data. The table keeps exactly one row: inserting
-- another (as pg_restore does after CREATE EXTENSION seeded one) overwrites it.
CREATE FUNCTION ff_partition_config_guard() RETURNS trigger
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

CREATE TRIGGER ff_partition_config_guard
    BEFORE INSERT OR UPDATE OR DELETE ON ff_partition_config
    FOR EACH ROW EXECUTE FUNCTION ff_partition_config_guard();

-- pg_restore re-runs CREATE EXTENSION (which seeds a fresh key) and then
-- copies the dumped keys back: an incoming active key replaces a seeded one
-- that never signed a live grant, so the one-active-key rule holds.
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

-- flowfabric router: the flowfabric SQL API on a PL/Proxy router database,
-- each call forwarded to the one shard that owns its key. See
-- docs/scaling.md for the design; in short:
--
--   * Every object lives in one of the 256 flow partitions ("slots"), the
--     N of `{fp:N}`: an execution in the slot of its id, a flow (and all its
--     members) in crc16(flow uuid) % 256, solo executions of a lane in
--     crc16(lane) % 256, budgets and quota policies in the slot of their
--     hash tag (see slot_of_key), schedules with their lane.
--   * Each shard owns a set of slots (flowfabric_router.slot_owner); the
--     PL/Proxy cluster `flowfabric_shards` has 256 partitions p0..p255,
--     partition N pointing at the owner of slot N, so `RUN ON slot` reaches
--     it (PL/Proxy shares one connection per distinct connect string).
--   * The API lives in schema `flowfabric` with the extension's names,
--     argument names, defaults and result types. Remote errors come back
--     with the shard's SQLSTATE, message, detail and hint.
--
-- Install as a superuser on the router database (PL/Proxy must be
-- installed on the server: Debian package postgresql-15-plproxy):
--   psql -v ON_ERROR_STOP=1 -1 -f router/flowfabric_router.sql
-- then register the shards and give them slots:
--   SELECT flowfabric_router.add_shard('s1', 'host=... port=... dbname=...');
--   SELECT flowfabric_router.add_shard('s2', 'host=... port=... dbname=...');
--   SELECT flowfabric_router.assign_slots(0, 127, 's1');
--   SELECT flowfabric_router.assign_slots(128, 255, 's2');
--   SELECT flowfabric_router.apply_shard_map();
--
-- Every function runs with search_path pinned to pg_catalog and names its
-- own objects with their schema, so nothing resolves through `public` or
-- any other schema a user can write. The API functions are SECURITY
-- INVOKER on purpose: PL/Proxy connects to the shards as the calling role
-- (user mapping), so the shards' own grants (flowfabric_worker,
-- flowfabric_admin) decide what a caller may do.

-- Nothing below may resolve through a schema another role can write.
SET search_path = pg_catalog, pg_temp;

CREATE SCHEMA IF NOT EXISTS plproxy;
CREATE EXTENSION IF NOT EXISTS plproxy SCHEMA plproxy;

CREATE SCHEMA IF NOT EXISTS flowfabric_router;
CREATE SCHEMA IF NOT EXISTS flowfabric;
REVOKE ALL ON SCHEMA flowfabric_router, flowfabric FROM PUBLIC;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'flowfabric_worker') THEN
        CREATE ROLE flowfabric_worker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'flowfabric_admin') THEN
        CREATE ROLE flowfabric_admin NOLOGIN;
    END IF;
END $$;

-- ---------------------------------------------------------------------------
-- Shard map
-- ---------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS flowfabric_router.shard (
    shard_name  text PRIMARY KEY,
    connstr     text NOT NULL,
    -- Lowest slot it owns (set by apply_shard_map): the partition number the
    -- router uses to reach this shard as a whole. NULL when it owns none.
    home_slot   int
);

-- Owner of each of the 256 flow partitions. Moving a range of slots to
-- another shard is an UPDATE here plus apply_shard_map() (after the rows of
-- those slots were copied: docs/scaling.md, "Adding a shard").
CREATE TABLE IF NOT EXISTS flowfabric_router.slot_owner (
    slot        int PRIMARY KEY CHECK (slot BETWEEN 0 AND 255),
    shard_name  text NOT NULL REFERENCES flowfabric_router.shard
);

CREATE OR REPLACE FUNCTION flowfabric_router.add_shard(shard_name text, connstr text) RETURNS text
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO flowfabric_router.shard (shard_name, connstr) VALUES ($1, $2)
    ON CONFLICT ON CONSTRAINT shard_pkey DO UPDATE SET connstr = EXCLUDED.connstr
    RETURNING shard_name
$$;

-- Gives slots lo..hi to a shard. Takes effect with apply_shard_map().
CREATE OR REPLACE FUNCTION flowfabric_router.assign_slots(lo int, hi int, shard_name text) RETURNS int
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH s AS (
        INSERT INTO flowfabric_router.slot_owner (slot, shard_name)
        SELECT g, $3 FROM pg_catalog.generate_series($1, $2) g
        ON CONFLICT (slot) DO UPDATE SET shard_name = EXCLUDED.shard_name
        RETURNING 1)
    SELECT pg_catalog.count(*)::int FROM s
$$;

-- The shards with their slot ranges.
CREATE OR REPLACE VIEW flowfabric_router.shards AS
SELECT s.shard_name, s.connstr,
       (SELECT count(*)::int FROM flowfabric_router.slot_owner o WHERE o.shard_name = s.shard_name) AS slots,
       (SELECT coalesce(string_agg(r.range, ',' ORDER BY r.lo), '')
          FROM (SELECT min(x.slot) AS lo,
                       CASE WHEN min(x.slot) = max(x.slot) THEN min(x.slot)::text
                            ELSE min(x.slot) || '-' || max(x.slot) END AS range
                  FROM (SELECT o.slot, o.slot - row_number() OVER (ORDER BY o.slot) AS grp
                          FROM flowfabric_router.slot_owner o WHERE o.shard_name = s.shard_name) x
                 GROUP BY x.grp) r) AS ranges
  FROM flowfabric_router.shard s;

-- Writes the slot map into the PL/Proxy cluster (foreign server
-- flowfabric_shards, options p0..p255), creating it and a PUBLIC user
-- mapping (connect as the calling role) the first time. Running router
-- sessions pick the change up at their next call.
CREATE OR REPLACE FUNCTION flowfabric_router.apply_shard_map() RETURNS SETOF flowfabric_router.shards
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    opts text;
BEGIN
    IF (SELECT count(*) FROM flowfabric_router.slot_owner) <> 256 THEN
        RAISE EXCEPTION 'every slot from 0 to 255 needs an owner; % have one',
            (SELECT count(*) FROM flowfabric_router.slot_owner)
            USING ERRCODE = '22023', HINT = 'SELECT flowfabric_router.assign_slots(lo, hi, shard)';
    END IF;
    UPDATE flowfabric_router.shard s
       SET home_slot = (SELECT min(o.slot) FROM flowfabric_router.slot_owner o WHERE o.shard_name = s.shard_name);
    IF EXISTS (SELECT FROM pg_catalog.pg_foreign_server WHERE srvname = 'flowfabric_shards') THEN
        SELECT string_agg(format('SET p%s %L', o.slot, s.connstr), ', ' ORDER BY o.slot) INTO opts
          FROM flowfabric_router.slot_owner o JOIN flowfabric_router.shard s USING (shard_name);
        EXECUTE format('ALTER SERVER flowfabric_shards OPTIONS (%s)', opts);
    ELSE
        SELECT string_agg(format('p%s %L', o.slot, s.connstr), ', ' ORDER BY o.slot) INTO opts
          FROM flowfabric_router.slot_owner o JOIN flowfabric_router.shard s USING (shard_name);
        EXECUTE format('CREATE SERVER flowfabric_shards FOREIGN DATA WRAPPER plproxy OPTIONS (%s)', opts);
        CREATE USER MAPPING FOR PUBLIC SERVER flowfabric_shards;
        GRANT USAGE ON FOREIGN SERVER flowfabric_shards TO flowfabric_worker, flowfabric_admin;
    END IF;
    RETURN QUERY SELECT * FROM flowfabric_router.shards;
END $$;

-- ---------------------------------------------------------------------------
-- Slots: where each key lives
--
-- PL/pgSQL rather than SQL functions: these run on every call, and a SQL
-- function that is not inlined (a pinned search_path prevents that) is
-- planned again in every transaction, while PL/pgSQL keeps its plans.
-- ---------------------------------------------------------------------------

-- CRC-16/XMODEM (poly 0x1021, init 0), the hash the engine slots ids with.
-- Table-driven: entry i is the CRC of the single byte i. Written as a
-- constant inside the expression so it is parsed once per session.
CREATE OR REPLACE FUNCTION flowfabric_router.crc16(data bytea) RETURNS int
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    crc int := 0;
BEGIN
    FOR i IN 0 .. length(data) - 1 LOOP
        crc := ((crc << 8) & 65535) # ('{
        0,4129,8258,12387,16516,20645,24774,28903,33032,37161,41290,45419,49548,53677,57806,61935,
        4657,528,12915,8786,21173,17044,29431,25302,37689,33560,45947,41818,54205,50076,62463,58334,
        9314,13379,1056,5121,25830,29895,17572,21637,42346,46411,34088,38153,58862,62927,50604,54669,
        13907,9842,5649,1584,30423,26358,22165,18100,46939,42874,38681,34616,63455,59390,55197,51132,
        18628,22757,26758,30887,2112,6241,10242,14371,51660,55789,59790,63919,35144,39273,43274,47403,
        23285,19156,31415,27286,6769,2640,14899,10770,56317,52188,64447,60318,39801,35672,47931,43802,
        27814,31879,19684,23749,11298,15363,3168,7233,60846,64911,52716,56781,44330,48395,36200,40265,
        32407,28342,24277,20212,15891,11826,7761,3696,65439,61374,57309,53244,48923,44858,40793,36728,
        37256,33193,45514,41451,53516,49453,61774,57711,4224,161,12482,8419,20484,16421,28742,24679,
        33721,37784,41979,46042,49981,54044,58239,62302,689,4752,8947,13010,16949,21012,25207,29270,
        46570,42443,38312,34185,62830,58703,54572,50445,13538,9411,5280,1153,29798,25671,21540,17413,
        42971,47098,34713,38840,59231,63358,50973,55100,9939,14066,1681,5808,26199,30326,17941,22068,
        55628,51565,63758,59695,39368,35305,47498,43435,22596,18533,30726,26663,6336,2273,14466,10403,
        52093,56156,60223,64286,35833,39896,43963,48026,19061,23124,27191,31254,2801,6864,10931,14994,
        64814,60687,56684,52557,48554,44427,40424,36297,31782,27655,23652,19525,15522,11395,7392,3265,
        61215,65342,53085,57212,44955,49082,36825,40952,28183,32310,20053,24180,11923,16050,3793,7920
        }'::int[])[(((crc >> 8) # get_byte(data, i)) & 255) + 1];
    END LOOP;
    RETURN crc;
END $$;

DO $$
BEGIN
    -- The standard check value of CRC-16/XMODEM, and a vector of the engine's own tests.
    IF flowfabric_router.crc16('123456789'::bytea) <> 12739
       OR flowfabric_router.crc16(convert_to('workers-a', 'UTF8')) % 256 <> 193 THEN
        RAISE EXCEPTION 'flowfabric_router.crc16 is broken';
    END IF;
END $$;

-- Slot of a text id (lane): crc16 of its UTF-8 bytes, as the engine slots a
-- solo execution. NULL (an error the shard will report) goes to slot 0.
CREATE OR REPLACE FUNCTION flowfabric_router.slot_of_text(t text) RETURNS int
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN coalesce(flowfabric_router.crc16(convert_to(t, 'UTF8')) % 256, 0);
END $$;

-- Slot of a flow: crc16 of the uuid's 16 raw bytes.
CREATE OR REPLACE FUNCTION flowfabric_router.slot_of_uuid(u uuid) RETURNS int
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN coalesce(flowfabric_router.crc16(uuid_send(u)) % 256, 0);
END $$;

-- Slot of an execution id `{fp:N}:<uuid>`: N. A malformed id goes to slot 0,
-- whose shard answers with the engine's own error.
CREATE OR REPLACE FUNCTION flowfabric_router.slot_of_execution(execution_id text) RETURNS int
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN coalesce(substring(execution_id FROM '^\{fp:(\d{1,5})\}:')::int % 256, 0);
END $$;

-- Slot of a grant key `pg:{fp:N}:<uuid>:...`: N (malformed: slot 0).
CREATE OR REPLACE FUNCTION flowfabric_router.slot_of_grant(grant_key text) RETURNS int
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN coalesce(substring(grant_key FROM '^pg:\{fp:(\d{1,5})\}:')::int % 256, 0);
END $$;

-- Slot of a budget or quota policy id, by its hash tag (the text between
-- the first `{` and the following `}`, as in Redis Cluster):
--   `{fp:17}:gpu-hours`   -> slot 17 (the slot of a flow, or any slot);
--   `{enrich}:tokens`     -> crc16('enrich') % 256, the slot of lane
--                            `enrich`'s solo executions;
--   `team-a` (no tag)     -> crc16('team-a') % 256.
-- A budget must live with every execution that names it, so a budget for
-- a lane's work carries the lane as its tag.
CREATE OR REPLACE FUNCTION flowfabric_router.slot_of_key(id text) RETURNS int
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tag text := substring(id FROM '\{([^}]+)\}');
BEGIN
    IF id IS NULL THEN
        RETURN 0;
    ELSIF tag ~ '^fp:\d{1,5}$' THEN
        RETURN substr(tag, 4)::int % 256;
    END IF;
    RETURN flowfabric_router.crc16(convert_to(coalesce(tag, id), 'UTF8')) % 256;
END $$;

CREATE OR REPLACE FUNCTION flowfabric_router.shard_of_slot(slot int) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT o.shard_name FROM flowfabric_router.slot_owner o WHERE o.slot = shard_of_slot.slot);
END $$;

-- The shard an execution id lives on (for callers that want to connect to
-- it directly, e.g. to claim, spend and complete in one transaction).
CREATE OR REPLACE FUNCTION flowfabric_router.shard_of_execution(execution_id text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN flowfabric_router.shard_of_slot(flowfabric_router.slot_of_execution(execution_id));
END $$;

-- Home slots of the shards that own any, in slot order: one partition
-- number per shard, for calls that visit shards one by one.
CREATE OR REPLACE FUNCTION flowfabric_router.shard_slots() RETURNS int[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT coalesce(array_agg(s.home_slot ORDER BY s.home_slot), '{}')
              FROM flowfabric_router.shard s WHERE s.home_slot IS NOT NULL);
END $$;

-- Home slots of every shard but the owner of `slot` (a set, for RUN ON).
CREATE OR REPLACE FUNCTION flowfabric_router.other_shard_slots(slot int) RETURNS SETOF int
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY SELECT s.home_slot FROM flowfabric_router.shard s
                  WHERE s.home_slot IS NOT NULL AND s.shard_name <> flowfabric_router.shard_of_slot(other_shard_slots.slot);
END $$;

-- A uuid whose slot is owned by `shard_name`. As a flow id it places a new
-- flow on that shard; as the `flow_id` of ff_create_execution(s) without
-- ff_add_execution_to_flow it only places solo executions there (the
-- engine takes the partition from it and records no membership), which is
-- how one lane's work is spread over several shards.
CREATE OR REPLACE FUNCTION flowfabric_router.placement_flow_id(shard_name text) RETURNS uuid
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    u uuid;
BEGIN
    IF NOT EXISTS (SELECT FROM flowfabric_router.slot_owner o WHERE o.shard_name = $1) THEN
        RAISE EXCEPTION 'shard "%" owns no slots', $1 USING ERRCODE = 'P0002';
    END IF;
    LOOP
        u := gen_random_uuid();
        EXIT WHEN flowfabric_router.shard_of_slot(flowfabric_router.slot_of_uuid(u)) = $1;
    END LOOP;
    RETURN u;
END $$;

-- Refuses a call that would make an execution (or schedule) on the shard
-- of `slot` name a budget or quota policy that lives on another shard: the
-- engine admits and books spend in one local transaction, so a budget
-- cannot span shards. 0A000, before any shard is touched.
CREATE OR REPLACE FUNCTION flowfabric_router.check_colocated(slot int, budget_ids text[], quota_policy_id text)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    home text;
    there text;
    id text;
BEGIN
    IF coalesce(cardinality(budget_ids), 0) = 0 AND quota_policy_id IS NULL THEN
        RETURN;
    END IF;
    home := flowfabric_router.shard_of_slot(slot);
    FOR id IN SELECT b FROM unnest(budget_ids) b WHERE b IS NOT NULL UNION ALL SELECT quota_policy_id WHERE quota_policy_id IS NOT NULL LOOP
        there := flowfabric_router.shard_of_slot(flowfabric_router.slot_of_key(id));
        IF there IS DISTINCT FROM home THEN
            RAISE EXCEPTION '"%" lives on shard % (slot %) but this work goes to shard % (slot %): a budget or quota cannot span shards',
                id, there, flowfabric_router.slot_of_key(id), home, slot
                USING ERRCODE = '0A000',
                      HINT = 'Give the budget the hash tag of the lane or flow it governs, e.g. "{lane}:name" or "{fp:N}:name" (docs/scaling.md).';
        END IF;
    END LOOP;
END $$;

-- The one shard holding every budget and quota policy that the nodes of a
-- flow spec name (NULL when they name none).
CREATE OR REPLACE FUNCTION flowfabric_router.spec_shard(spec jsonb) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    shards text[];
BEGIN
    IF jsonb_typeof(spec -> 'nodes') <> 'array' THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(DISTINCT flowfabric_router.shard_of_slot(flowfabric_router.slot_of_key(k))) INTO shards
      FROM jsonb_array_elements(spec -> 'nodes') n,
           LATERAL (SELECT jsonb_array_elements_text(n -> 'budget_ids') WHERE jsonb_typeof(n -> 'budget_ids') = 'array'
                    UNION ALL
                    SELECT n ->> 'quota_policy_id' WHERE jsonb_typeof(n -> 'quota_policy_id') = 'string') AS x(k)
     WHERE jsonb_typeof(n) = 'object';
    IF cardinality(shards) > 1 THEN
        RAISE EXCEPTION 'the nodes of this flow name budgets or quotas on shards %: a flow lives on one shard',
            array_to_string(shards, ', ')
            USING ERRCODE = '0A000', HINT = 'Give them hash tags that place them on one shard (docs/scaling.md).';
    END IF;
    RETURN shards[1];
END $$;

-- Re-raises an error caught around a PL/Proxy call as the shard raised it:
-- same SQLSTATE, and message, detail and hint without PL/Proxy's
-- "fn(n): [db] REMOTE ERROR: " / "Remote detail: " / "Remote hint: "
-- prefixes. Errors of the router itself pass unchanged.
CREATE OR REPLACE FUNCTION flowfabric_router.reraise(state text, msg text, detail text, hint text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    msg := regexp_replace(msg, '^flowfabric_router\.\w+\(\d+\): \[[^]]*\] REMOTE ERROR: ', '');
    detail := nullif(regexp_replace(coalesce(detail, ''), '^Remote detail: ', ''), '');
    hint := nullif(regexp_replace(coalesce(hint, ''), '^Remote hint: ', ''), '');
    IF detail IS NOT NULL AND hint IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = state, MESSAGE = msg, DETAIL = detail, HINT = hint;
    ELSIF detail IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = state, MESSAGE = msg, DETAIL = detail;
    ELSIF hint IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = state, MESSAGE = msg, HINT = hint;
    END IF;
    RAISE EXCEPTION USING ERRCODE = state, MESSAGE = msg;
END $$;

-- Sums two jsonb documents of counters key by key (nested objects too):
-- the result of a reconciler pass over every shard.
CREATE OR REPLACE FUNCTION flowfabric_router.jsonb_sum(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN a IS NULL THEN b
        WHEN b IS NULL THEN a
        WHEN jsonb_typeof(a) = 'number' AND jsonb_typeof(b) = 'number' THEN to_jsonb(a::numeric + b::numeric)
        WHEN jsonb_typeof(a) = 'object' AND jsonb_typeof(b) = 'object' THEN
            (SELECT coalesce(jsonb_object_agg(k, flowfabric_router.jsonb_sum(a -> k, b -> k)), '{}')
               FROM (SELECT jsonb_object_keys(a) UNION SELECT jsonb_object_keys(b)) AS keys(k))
        ELSE a
    END
$$;

-- ---------------------------------------------------------------------------
-- Calls on the shards (PL/Proxy)
--
-- flowfabric_router.X(slot, args...) runs flowfabric.X(args...) on the shard
-- owning `slot`, in its own transaction there; the *_all variants run it on
-- every shard at once (one call per shard: partitions sharing a connect
-- string share the connection). Arguments are passed by name, cast to the
-- extension's types, so the remote call binds exactly like a local one.
-- client_min_messages hides PL/Proxy's "dropping stale conn" NOTICE: after
-- a remote error it reconnects on the next call, which is not news to the
-- caller of that next call.
-- ---------------------------------------------------------------------------

-- Executions, claims, leases

CREATE OR REPLACE FUNCTION flowfabric_router.ff_create_execution(slot int, lane_id text, payload jsonb, priority int,
    required_capabilities text[], budget_ids text[], quota_policy_id text, flow_id uuid, execution_id uuid,
    delay_until_ms bigint, max_attempts int, budget_reserve jsonb, unique_key text, retry_policy jsonb) RETURNS text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_create_execution("lane_id" => lane_id::text, "payload" => payload::jsonb,
        "priority" => priority::int, "required_capabilities" => required_capabilities::text[],
        "budget_ids" => budget_ids::text[], "quota_policy_id" => quota_policy_id::text, "flow_id" => flow_id::uuid,
        "execution_id" => execution_id::uuid, "delay_until_ms" => delay_until_ms::bigint,
        "max_attempts" => max_attempts::int, "budget_reserve" => budget_reserve::jsonb,
        "unique_key" => unique_key::text, "retry_policy" => retry_policy::jsonb);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_create_executions(slot int, lane_id text, payloads jsonb[], priority int,
    required_capabilities text[], budget_ids text[], quota_policy_id text, flow_id uuid, delay_until_ms bigint,
    max_attempts int, budget_reserve jsonb, unique_key text, retry_policy jsonb) RETURNS text[]
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_create_executions("lane_id" => lane_id::text, "payloads" => payloads::jsonb[],
        "priority" => priority::int, "required_capabilities" => required_capabilities::text[],
        "budget_ids" => budget_ids::text[], "quota_policy_id" => quota_policy_id::text, "flow_id" => flow_id::uuid,
        "delay_until_ms" => delay_until_ms::bigint, "max_attempts" => max_attempts::int,
        "budget_reserve" => budget_reserve::jsonb, "unique_key" => unique_key::text,
        "retry_policy" => retry_policy::jsonb);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_claim_for_worker(slot int, lane_id text, worker_id text,
    worker_instance_id text, capabilities text[], grant_ttl_ms bigint)
RETURNS TABLE (execution_id text, partition_key text, grant_key text, expires_at_ms bigint)
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT * FROM flowfabric.ff_claim_for_worker("lane_id" => lane_id::text, "worker_id" => worker_id::text,
        "worker_instance_id" => worker_instance_id::text, "capabilities" => capabilities::text[],
        "grant_ttl_ms" => grant_ttl_ms::bigint);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_claim_batch(slot int, lane_ids text[], worker_id text,
    worker_instance_id text, capabilities text[], grant_ttl_ms bigint, max_count int)
RETURNS TABLE (execution_id text, partition_key text, grant_key text, expires_at_ms bigint, lane_id text,
               payload jsonb, attempt int)
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT * FROM flowfabric.ff_claim_batch("lane_ids" => lane_ids::text[], "worker_id" => worker_id::text,
        "worker_instance_id" => worker_instance_id::text, "capabilities" => capabilities::text[],
        "grant_ttl_ms" => grant_ttl_ms::bigint, "max_count" => max_count::int);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_verify_grant(slot int, grant_key text) RETURNS text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_verify_grant("grant_key" => grant_key::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_renew_lease(slot int, execution_id text, grant_key text, ttl_ms bigint)
RETURNS bigint
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_renew_lease("execution_id" => execution_id::text, "grant_key" => grant_key::text,
        "ttl_ms" => ttl_ms::bigint);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_complete_execution(slot int, execution_id text, grant_key text,
    result jsonb) RETURNS void
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_complete_execution("execution_id" => execution_id::text, "grant_key" => grant_key::text,
        "result" => result::jsonb);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_fail_execution(slot int, execution_id text, grant_key text,
    error text, retryable boolean) RETURNS text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_fail_execution("execution_id" => execution_id::text, "grant_key" => grant_key::text,
        "error" => error::text, "retryable" => retryable::boolean);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_get_execution(slot int, execution_id text) RETURNS jsonb
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_get_execution("execution_id" => execution_id::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_get_inputs(slot int, execution_id text) RETURNS jsonb
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_get_inputs("execution_id" => execution_id::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_retry_execution(slot int, execution_id text, reset_attempts boolean)
RETURNS text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_retry_execution("execution_id" => execution_id::text,
        "reset_attempts" => reset_attempts::boolean);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_cancel_execution(slot int, execution_id text, reason text)
RETURNS text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_cancel_execution("execution_id" => execution_id::text, "reason" => reason::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_lane_channel(slot int, lane_id text) RETURNS text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_lane_channel("lane_id" => lane_id::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_list_executions(slot int, lane_id text, public_state text,
    flow_id uuid, after_execution_id text, max_count int) RETURNS SETOF jsonb
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT * FROM flowfabric.ff_list_executions("lane_id" => lane_id::text, "public_state" => public_state::text,
        "flow_id" => flow_id::uuid, "after_execution_id" => after_execution_id::text,
        "max_count" => max_count::int);
$$;

-- Budgets and quotas

CREATE OR REPLACE FUNCTION flowfabric_router.ff_create_budget(slot int, budget_id text, dimensions text[],
    hard_limits bigint[], soft_limits bigint[], reset_interval_ms bigint, scope_type text, scope_id text,
    enforcement_mode text, on_hard_limit text, on_soft_limit text) RETURNS text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_create_budget("budget_id" => budget_id::text, "dimensions" => dimensions::text[],
        "hard_limits" => hard_limits::bigint[], "soft_limits" => soft_limits::bigint[],
        "reset_interval_ms" => reset_interval_ms::bigint, "scope_type" => scope_type::text,
        "scope_id" => scope_id::text, "enforcement_mode" => enforcement_mode::text,
        "on_hard_limit" => on_hard_limit::text, "on_soft_limit" => on_soft_limit::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_report_usage(slot int, budget_id text, dimensions jsonb, dedup_key text)
RETURNS TABLE (outcome text, dimension text, current_usage bigint, limit_value bigint)
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT * FROM flowfabric.ff_report_usage("budget_id" => budget_id::text, "dimensions" => dimensions::jsonb,
        "dedup_key" => dedup_key::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_report_usage_admin(slot int, budget_id text, dimensions text[],
    deltas bigint[], dedup_key text)
RETURNS TABLE (outcome text, dimension text, current_usage bigint, limit_value bigint)
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT * FROM flowfabric.ff_report_usage_admin("budget_id" => budget_id::text,
        "dimensions" => dimensions::text[], "deltas" => deltas::bigint[], "dedup_key" => dedup_key::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_record_spend(slot int, budget_id text, execution_id text,
    deltas jsonb, idempotency_key text)
RETURNS TABLE (outcome text, dimension text, current_usage bigint, limit_value bigint)
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT * FROM flowfabric.ff_record_spend("budget_id" => budget_id::text, "execution_id" => execution_id::text,
        "deltas" => deltas::jsonb, "idempotency_key" => idempotency_key::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_release_budget(slot int, budget_id text, execution_id text)
RETURNS void
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_release_budget("budget_id" => budget_id::text, "execution_id" => execution_id::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_reset_budget(slot int, budget_id text) RETURNS bigint
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_reset_budget("budget_id" => budget_id::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_get_budget_status(slot int, budget_id text) RETURNS jsonb
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_get_budget_status("budget_id" => budget_id::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_create_quota_policy(slot int, quota_policy_id text,
    window_seconds bigint, max_requests_per_window bigint, max_concurrent bigint) RETURNS text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_create_quota_policy("quota_policy_id" => quota_policy_id::text,
        "window_seconds" => window_seconds::bigint, "max_requests_per_window" => max_requests_per_window::bigint,
        "max_concurrent" => max_concurrent::bigint);
$$;

-- Flows

CREATE OR REPLACE FUNCTION flowfabric_router.ff_create_flow(slot int, flow_id uuid, flow_kind text, namespace text)
RETURNS text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_create_flow("flow_id" => flow_id::uuid, "flow_kind" => flow_kind::text,
        "namespace" => namespace::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_add_execution_to_flow(slot int, flow_id uuid, execution_id text)
RETURNS TABLE (result text, node_count int)
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT * FROM flowfabric.ff_add_execution_to_flow("flow_id" => flow_id::uuid,
        "execution_id" => execution_id::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_stage_dependency_edge(slot int, flow_id uuid, edge_id uuid,
    upstream_execution_id text, downstream_execution_id text, expected_graph_revision bigint,
    dependency_kind text, data_passing_ref text) RETURNS bigint
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_stage_dependency_edge("flow_id" => flow_id::uuid, "edge_id" => edge_id::uuid,
        "upstream_execution_id" => upstream_execution_id::text,
        "downstream_execution_id" => downstream_execution_id::text,
        "expected_graph_revision" => expected_graph_revision::bigint, "dependency_kind" => dependency_kind::text,
        "data_passing_ref" => data_passing_ref::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_apply_dependency_to_child(slot int, flow_id uuid, edge_id uuid,
    downstream_execution_id text)
RETURNS TABLE (result text, unsatisfied_count int)
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT * FROM flowfabric.ff_apply_dependency_to_child("flow_id" => flow_id::uuid, "edge_id" => edge_id::uuid,
        "downstream_execution_id" => downstream_execution_id::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_set_edge_group_policy(slot int, flow_id uuid,
    downstream_execution_id text, policy jsonb) RETURNS text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_set_edge_group_policy("flow_id" => flow_id::uuid,
        "downstream_execution_id" => downstream_execution_id::text, "policy" => policy::jsonb);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_cancel_flow(slot int, flow_id uuid, reason text) RETURNS int
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_cancel_flow("flow_id" => flow_id::uuid, "reason" => reason::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_submit_flow(slot int, spec jsonb) RETURNS jsonb
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_submit_flow("spec" => spec::jsonb);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_get_flow(slot int, flow_id uuid) RETURNS jsonb
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_get_flow("flow_id" => flow_id::uuid);
$$;

-- Schedules

CREATE OR REPLACE FUNCTION flowfabric_router.ff_create_schedule(slot int, schedule_id text, cron text, lane_id text,
    payload jsonb, priority int, required_capabilities text[], budget_ids text[], quota_policy_id text,
    max_attempts int, budget_reserve jsonb, retry_policy jsonb) RETURNS text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON slot;
    SELECT flowfabric.ff_create_schedule("schedule_id" => schedule_id::text, "cron" => cron::text,
        "lane_id" => lane_id::text, "payload" => payload::jsonb, "priority" => priority::int,
        "required_capabilities" => required_capabilities::text[], "budget_ids" => budget_ids::text[],
        "quota_policy_id" => quota_policy_id::text, "max_attempts" => max_attempts::int,
        "budget_reserve" => budget_reserve::jsonb, "retry_policy" => retry_policy::jsonb);
$$;

-- Drops a schedule from every shard except the owner of `slot`.
CREATE OR REPLACE FUNCTION flowfabric_router.ff_drop_schedule_elsewhere(slot int, schedule_id text) RETURNS SETOF text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON flowfabric_router.other_shard_slots(slot);
    SELECT flowfabric.ff_drop_schedule("schedule_id" => schedule_id::text);
$$;

-- Every shard at once: lane-wide and cluster-wide admin calls

CREATE OR REPLACE FUNCTION flowfabric_router.ff_drop_schedule_all(schedule_id text) RETURNS SETOF text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON ALL;
    SELECT flowfabric.ff_drop_schedule("schedule_id" => schedule_id::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_pause_lane_all(lane_id text) RETURNS SETOF text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON ALL;
    SELECT flowfabric.ff_pause_lane("lane_id" => lane_id::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_resume_lane_all(lane_id text) RETURNS SETOF text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON ALL;
    SELECT flowfabric.ff_resume_lane("lane_id" => lane_id::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_rotate_hmac_secret_all(kid text, secret bytea) RETURNS SETOF text
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON ALL;
    SELECT flowfabric.ff_rotate_hmac_secret("kid" => kid::text, "secret" => secret::bytea);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_reconcile_tick_all(stale_threshold_ms bigint, namespace text,
    instance_tag text)
RETURNS TABLE (scanned bigint, reconciled bigint, noop bigint, filtered bigint, errors bigint)
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON ALL;
    SELECT * FROM flowfabric.ff_reconcile_tick("stale_threshold_ms" => stale_threshold_ms::bigint,
        "namespace" => namespace::text, "instance_tag" => instance_tag::text);
$$;

CREATE OR REPLACE FUNCTION flowfabric_router.ff_run_reconcilers_all() RETURNS SETOF jsonb
LANGUAGE plproxy SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
    CLUSTER 'flowfabric_shards';
    RUN ON ALL;
    SELECT flowfabric.ff_run_reconcilers();
$$;

-- ---------------------------------------------------------------------------
-- The API: schema flowfabric, as on a single server
--
-- Each function computes the slot of its key, calls the shard and, on an
-- error, re-raises it as the shard raised it (flowfabric_router.reraise).
-- Every call is its own transaction on its shard: a ROLLBACK on the router
-- undoes nothing there (docs/scaling.md, "Transactions").
-- ---------------------------------------------------------------------------

-- Executions, claims, leases

-- A solo execution goes to the slot of its lane, one created with flow_id
-- to the slot of that flow (the engine's own rule); the budgets and quota
-- it names must live on the same shard.
CREATE OR REPLACE FUNCTION flowfabric.ff_create_execution(lane_id text, payload jsonb DEFAULT NULL,
    priority int DEFAULT 0, required_capabilities text[] DEFAULT '{}', budget_ids text[] DEFAULT '{}',
    quota_policy_id text DEFAULT NULL, flow_id uuid DEFAULT NULL, execution_id uuid DEFAULT NULL,
    delay_until_ms bigint DEFAULT NULL, max_attempts int DEFAULT 1, budget_reserve jsonb DEFAULT NULL,
    unique_key text DEFAULT NULL, retry_policy jsonb DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    slot int := CASE WHEN flow_id IS NULL THEN flowfabric_router.slot_of_text(lane_id)
                     ELSE flowfabric_router.slot_of_uuid(flow_id) END;
    st text; msg text; det text; hnt text;
BEGIN
    PERFORM flowfabric_router.check_colocated(slot, budget_ids, quota_policy_id);
    RETURN flowfabric_router.ff_create_execution(slot, lane_id, payload, priority, required_capabilities, budget_ids,
        quota_policy_id, flow_id, execution_id, delay_until_ms, max_attempts, budget_reserve, unique_key, retry_policy);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_create_executions(lane_id text, payloads jsonb[], priority int DEFAULT 0,
    required_capabilities text[] DEFAULT '{}', budget_ids text[] DEFAULT '{}', quota_policy_id text DEFAULT NULL,
    flow_id uuid DEFAULT NULL, delay_until_ms bigint DEFAULT NULL, max_attempts int DEFAULT 1,
    budget_reserve jsonb DEFAULT NULL, unique_key text DEFAULT NULL, retry_policy jsonb DEFAULT NULL) RETURNS text[]
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    slot int := CASE WHEN flow_id IS NULL THEN flowfabric_router.slot_of_text(lane_id)
                     ELSE flowfabric_router.slot_of_uuid(flow_id) END;
    st text; msg text; det text; hnt text;
BEGIN
    PERFORM flowfabric_router.check_colocated(slot, budget_ids, quota_policy_id);
    RETURN flowfabric_router.ff_create_executions(slot, lane_id, payloads, priority, required_capabilities, budget_ids,
        quota_policy_id, flow_id, delay_until_ms, max_attempts, budget_reserve, unique_key, retry_policy);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

-- A lane's work can sit on every shard (flow members, placed executions),
-- so the claim visits the shards one after another, starting at a random
-- one so that no shard's work waits behind another's, and returns the
-- first execution it gets. A shard that fails is passed over (WARNING)
-- when another one answers; when none yields work, the first error is
-- raised (a bad argument fails identically everywhere).
CREATE OR REPLACE FUNCTION flowfabric.ff_claim_for_worker(lane_id text, worker_id text, worker_instance_id text,
    capabilities text[] DEFAULT '{}', grant_ttl_ms bigint DEFAULT 30000)
RETURNS TABLE (execution_id text, partition_key text, grant_key text, expires_at_ms bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    slots int[] := flowfabric_router.shard_slots();
    n int := cardinality(slots);
    first int := floor(random() * n)::int;
    got bigint;
    st text; msg text; det text; hnt text;
BEGIN
    FOR i IN 0 .. n - 1 LOOP
        BEGIN
            RETURN QUERY SELECT * FROM flowfabric_router.ff_claim_for_worker(slots[(first + i) % n + 1], lane_id,
                worker_id, worker_instance_id, capabilities, grant_ttl_ms);
            GET DIAGNOSTICS got = ROW_COUNT;
        EXCEPTION WHEN OTHERS THEN
            got := 0;
            IF st IS NULL THEN
                GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL,
                                        hnt = PG_EXCEPTION_HINT;
            END IF;
        END;
        IF got > 0 THEN
            IF st IS NOT NULL THEN
                RAISE WARNING 'flowfabric router: a shard failed during this claim: %', msg;
            END IF;
            RETURN;
        END IF;
    END LOOP;
    IF st IS NOT NULL THEN
        PERFORM flowfabric_router.reraise(st, msg, det, hnt);
    END IF;
END $$;

-- Up to max_count executions from the shards in turn (random start), each
-- asked for what is still missing. Lanes keep their order within a shard.
CREATE OR REPLACE FUNCTION flowfabric.ff_claim_batch(lane_ids text[], worker_id text, worker_instance_id text,
    capabilities text[] DEFAULT '{}', grant_ttl_ms bigint DEFAULT 30000, max_count int DEFAULT 10)
RETURNS TABLE (execution_id text, partition_key text, grant_key text, expires_at_ms bigint, lane_id text,
               payload jsonb, attempt int)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    slots int[] := flowfabric_router.shard_slots();
    n int := cardinality(slots);
    first int := floor(random() * n)::int;
    wanted int := max_count;
    got bigint;
    st text; msg text; det text; hnt text;
BEGIN
    FOR i IN 0 .. n - 1 LOOP
        BEGIN
            RETURN QUERY SELECT * FROM flowfabric_router.ff_claim_batch(slots[(first + i) % n + 1], lane_ids,
                worker_id, worker_instance_id, capabilities, grant_ttl_ms, wanted);
            GET DIAGNOSTICS got = ROW_COUNT;
        EXCEPTION WHEN OTHERS THEN
            got := 0;
            IF st IS NULL THEN
                GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL,
                                        hnt = PG_EXCEPTION_HINT;
            END IF;
        END;
        wanted := wanted - got;
        EXIT WHEN wanted <= 0;
    END LOOP;
    IF st IS NOT NULL THEN
        IF wanted = max_count THEN
            PERFORM flowfabric_router.reraise(st, msg, det, hnt);
        END IF;
        -- Never drop what was claimed: the leases are held already.
        RAISE WARNING 'flowfabric router: a shard failed during this claim: %', msg;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_verify_grant(grant_key text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_verify_grant(flowfabric_router.slot_of_grant(grant_key), grant_key);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_renew_lease(execution_id text, grant_key text, ttl_ms bigint) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_renew_lease(flowfabric_router.slot_of_execution(execution_id), execution_id,
        grant_key, ttl_ms);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_complete_execution(execution_id text, grant_key text,
    result jsonb DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    PERFORM flowfabric_router.ff_complete_execution(flowfabric_router.slot_of_execution(execution_id), execution_id,
        grant_key, result);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_fail_execution(execution_id text, grant_key text, error text,
    retryable boolean DEFAULT true) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_fail_execution(flowfabric_router.slot_of_execution(execution_id), execution_id,
        grant_key, error, retryable);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_get_execution(execution_id text) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_get_execution(flowfabric_router.slot_of_execution(execution_id), execution_id);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_get_inputs(execution_id text) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_get_inputs(flowfabric_router.slot_of_execution(execution_id), execution_id);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_retry_execution(execution_id text, reset_attempts boolean DEFAULT true)
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_retry_execution(flowfabric_router.slot_of_execution(execution_id), execution_id,
        reset_attempts);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_cancel_execution(execution_id text, reason text DEFAULT 'cancelled')
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_cancel_execution(flowfabric_router.slot_of_execution(execution_id), execution_id,
        reason);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

-- The channel name only; notifications are sent on the shards, so a worker
-- that wants to be woken LISTENs on them (docs/scaling.md).
CREATE OR REPLACE FUNCTION flowfabric.ff_lane_channel(lane_id text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_lane_channel(flowfabric_router.slot_of_text(lane_id), lane_id);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

-- One flow: its shard. Otherwise the shards one after another, each in its
-- creation order (not one global order): a page after an execution goes on
-- from that execution on its shard, then on to the next shards, so paging
-- never repeats or skips a row.
CREATE OR REPLACE FUNCTION flowfabric.ff_list_executions(lane_id text DEFAULT NULL, public_state text DEFAULT NULL,
    flow_id uuid DEFAULT NULL, after_execution_id text DEFAULT NULL, max_count int DEFAULT 100) RETURNS SETOF jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    slots int[] := flowfabric_router.shard_slots();
    start int := 1;
    cursor_id text := after_execution_id;
    wanted int := max_count;
    got bigint;
    st text; msg text; det text; hnt text;
BEGIN
    IF flow_id IS NOT NULL THEN
        RETURN QUERY SELECT * FROM flowfabric_router.ff_list_executions(flowfabric_router.slot_of_uuid(flow_id),
            lane_id, public_state, flow_id, after_execution_id, max_count);
        RETURN;
    END IF;
    IF cursor_id IS NOT NULL THEN
        start := coalesce(array_position(slots, (SELECT s.home_slot FROM flowfabric_router.shard s
            WHERE s.shard_name = flowfabric_router.shard_of_execution(cursor_id))), 1);
    END IF;
    FOR i IN start .. cardinality(slots) LOOP
        RETURN QUERY SELECT * FROM flowfabric_router.ff_list_executions(slots[i], lane_id, public_state, NULL, cursor_id,
            wanted);
        GET DIAGNOSTICS got = ROW_COUNT;
        wanted := wanted - got;
        cursor_id := NULL;
        EXIT WHEN wanted <= 0;
    END LOOP;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

-- Budgets and quotas: the slot of their hash tag (flowfabric_router.slot_of_key)

CREATE OR REPLACE FUNCTION flowfabric.ff_create_budget(budget_id text, dimensions text[], hard_limits bigint[],
    soft_limits bigint[], reset_interval_ms bigint DEFAULT 0, scope_type text DEFAULT '', scope_id text DEFAULT '',
    enforcement_mode text DEFAULT 'strict', on_hard_limit text DEFAULT 'reject', on_soft_limit text DEFAULT 'warn')
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_create_budget(flowfabric_router.slot_of_key(budget_id), budget_id, dimensions,
        hard_limits, soft_limits, reset_interval_ms, scope_type, scope_id, enforcement_mode, on_hard_limit,
        on_soft_limit);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_report_usage(budget_id text, dimensions jsonb, dedup_key text DEFAULT NULL)
RETURNS TABLE (outcome text, dimension text, current_usage bigint, limit_value bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN QUERY SELECT * FROM flowfabric_router.ff_report_usage(flowfabric_router.slot_of_key(budget_id), budget_id,
        dimensions, dedup_key);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_report_usage_admin(budget_id text, dimensions text[], deltas bigint[],
    dedup_key text DEFAULT NULL)
RETURNS TABLE (outcome text, dimension text, current_usage bigint, limit_value bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN QUERY SELECT * FROM flowfabric_router.ff_report_usage_admin(flowfabric_router.slot_of_key(budget_id),
        budget_id, dimensions, deltas, dedup_key);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

-- Spend goes with the execution; its budget must live on the same shard.
CREATE OR REPLACE FUNCTION flowfabric.ff_record_spend(budget_id text, execution_id text, deltas jsonb,
    idempotency_key text)
RETURNS TABLE (outcome text, dimension text, current_usage bigint, limit_value bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    slot int := flowfabric_router.slot_of_execution(execution_id);
    st text; msg text; det text; hnt text;
BEGIN
    PERFORM flowfabric_router.check_colocated(slot, ARRAY[budget_id], NULL);
    RETURN QUERY SELECT * FROM flowfabric_router.ff_record_spend(slot, budget_id, execution_id, deltas,
        idempotency_key);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_release_budget(budget_id text, execution_id text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    slot int := flowfabric_router.slot_of_execution(execution_id);
    st text; msg text; det text; hnt text;
BEGIN
    PERFORM flowfabric_router.check_colocated(slot, ARRAY[budget_id], NULL);
    PERFORM flowfabric_router.ff_release_budget(slot, budget_id, execution_id);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_reset_budget(budget_id text) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_reset_budget(flowfabric_router.slot_of_key(budget_id), budget_id);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_get_budget_status(budget_id text) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_get_budget_status(flowfabric_router.slot_of_key(budget_id), budget_id);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_create_quota_policy(quota_policy_id text, window_seconds bigint,
    max_requests_per_window bigint, max_concurrent bigint) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_create_quota_policy(flowfabric_router.slot_of_key(quota_policy_id), quota_policy_id,
        window_seconds, max_requests_per_window, max_concurrent);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

-- Flows: the slot of the flow id, shared by all its members

CREATE OR REPLACE FUNCTION flowfabric.ff_create_flow(flow_id uuid, flow_kind text DEFAULT 'dag',
    namespace text DEFAULT 'default') RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_create_flow(flowfabric_router.slot_of_uuid(flow_id), flow_id, flow_kind, namespace);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_add_execution_to_flow(flow_id uuid, execution_id text)
RETURNS TABLE (result text, node_count int)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN QUERY SELECT * FROM flowfabric_router.ff_add_execution_to_flow(flowfabric_router.slot_of_uuid(flow_id),
        flow_id, execution_id);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_stage_dependency_edge(flow_id uuid, edge_id uuid, upstream_execution_id text,
    downstream_execution_id text, expected_graph_revision bigint, dependency_kind text DEFAULT 'success_only',
    data_passing_ref text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_stage_dependency_edge(flowfabric_router.slot_of_uuid(flow_id), flow_id, edge_id,
        upstream_execution_id, downstream_execution_id, expected_graph_revision, dependency_kind, data_passing_ref);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_apply_dependency_to_child(flow_id uuid, edge_id uuid,
    downstream_execution_id text)
RETURNS TABLE (result text, unsatisfied_count int)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN QUERY SELECT * FROM flowfabric_router.ff_apply_dependency_to_child(
        flowfabric_router.slot_of_uuid(flow_id), flow_id, edge_id, downstream_execution_id);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_set_edge_group_policy(flow_id uuid, downstream_execution_id text,
    policy jsonb) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_set_edge_group_policy(flowfabric_router.slot_of_uuid(flow_id), flow_id,
        downstream_execution_id, policy);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_cancel_flow(flow_id uuid, reason text DEFAULT 'cancelled') RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_cancel_flow(flowfabric_router.slot_of_uuid(flow_id), flow_id, reason);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_get_flow(flow_id uuid) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN flowfabric_router.ff_get_flow(flowfabric_router.slot_of_uuid(flow_id), flow_id);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

-- A spec without a flow_id gets one here (as the engine would generate
-- one), chosen on the shard of the budgets and quotas its nodes name, so
-- the whole flow lands where its budgets are. A spec that is not an object
-- or has a malformed flow_id goes to slot 0 unchanged: the shard reports it.
CREATE OR REPLACE FUNCTION flowfabric.ff_submit_flow(spec jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    slot int := 0;
    home text;
    flow uuid;
    st text; msg text; det text; hnt text;
BEGIN
    IF jsonb_typeof(spec) = 'object' THEN
        home := flowfabric_router.spec_shard(spec);
        IF coalesce(jsonb_typeof(spec -> 'flow_id'), 'null') = 'null' THEN
            flow := CASE WHEN home IS NULL THEN gen_random_uuid() ELSE flowfabric_router.placement_flow_id(home) END;
            spec := jsonb_set(spec, '{flow_id}', to_jsonb(flow::text));
        ELSIF spec ->> 'flow_id' ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' THEN
            flow := (spec ->> 'flow_id')::uuid;
            IF home IS DISTINCT FROM flowfabric_router.shard_of_slot(flowfabric_router.slot_of_uuid(flow)) AND home IS NOT NULL THEN
                RAISE EXCEPTION 'flow % lives on shard % but its nodes name budgets or quotas on shard %: a flow lives on one shard',
                    flow, flowfabric_router.shard_of_slot(flowfabric_router.slot_of_uuid(flow)), home
                    USING ERRCODE = '0A000',
                          HINT = 'Leave flow_id out and the router picks one on the budgets'' shard (docs/scaling.md).';
            END IF;
        END IF;
        IF flow IS NOT NULL THEN
            slot := flowfabric_router.slot_of_uuid(flow);
        END IF;
    END IF;
    RETURN flowfabric_router.ff_submit_flow(slot, spec);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

-- Schedules live with their lane (they create its solo executions). A
-- schedule redefined onto a lane of another shard moves there: it is
-- created on the new shard and dropped from the others ('updated').
CREATE OR REPLACE FUNCTION flowfabric.ff_create_schedule(schedule_id text, cron text, lane_id text,
    payload jsonb DEFAULT NULL, priority int DEFAULT 0, required_capabilities text[] DEFAULT '{}',
    budget_ids text[] DEFAULT '{}', quota_policy_id text DEFAULT NULL, max_attempts int DEFAULT 1,
    budget_reserve jsonb DEFAULT NULL, retry_policy jsonb DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    slot int := flowfabric_router.slot_of_text(lane_id);
    answer text;
    st text; msg text; det text; hnt text;
BEGIN
    PERFORM flowfabric_router.check_colocated(slot, budget_ids, quota_policy_id);
    answer := flowfabric_router.ff_create_schedule(slot, schedule_id, cron, lane_id, payload, priority,
        required_capabilities, budget_ids, quota_policy_id, max_attempts, budget_reserve, retry_policy);
    IF answer = 'created' AND 'dropped' IN (SELECT flowfabric_router.ff_drop_schedule_elsewhere(slot, schedule_id)) THEN
        answer := 'updated';
    END IF;
    RETURN answer;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

-- Lane-wide and cluster-wide admin calls: every shard (not atomic across
-- shards; each is idempotent, so a failed call is simply repeated).

CREATE OR REPLACE FUNCTION flowfabric.ff_drop_schedule(schedule_id text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN CASE WHEN 'dropped' IN (SELECT flowfabric_router.ff_drop_schedule_all(schedule_id))
                THEN 'dropped' ELSE 'not_found' END;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_pause_lane(lane_id text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN CASE WHEN 'paused' IN (SELECT flowfabric_router.ff_pause_lane_all(lane_id))
                THEN 'paused' ELSE 'already_paused' END;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_resume_lane(lane_id text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN CASE WHEN 'resumed' IN (SELECT flowfabric_router.ff_resume_lane_all(lane_id))
                THEN 'resumed' ELSE 'not_paused' END;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

-- Each shard keeps its own keys (a grant is verified where it was issued);
-- rotating through the router rotates every shard to the same kid.
CREATE OR REPLACE FUNCTION flowfabric.ff_rotate_hmac_secret(kid text, secret bytea DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN (SELECT min(k) FROM flowfabric_router.ff_rotate_hmac_secret_all(kid, secret) k);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

-- Reconcilers run on every shard (each shard's background worker does this
-- on its own); through the router, one pass everywhere with summed counts.
CREATE OR REPLACE FUNCTION flowfabric.ff_reconcile_tick(stale_threshold_ms bigint DEFAULT 1000,
    namespace text DEFAULT NULL, instance_tag text DEFAULT NULL)
RETURNS TABLE (scanned bigint, reconciled bigint, noop bigint, filtered bigint, errors bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text; msg text; det text; hnt text;
BEGIN
    RETURN QUERY SELECT sum(t.scanned)::bigint, sum(t.reconciled)::bigint, sum(t.noop)::bigint,
                        sum(t.filtered)::bigint, sum(t.errors)::bigint
                   FROM flowfabric_router.ff_reconcile_tick_all(stale_threshold_ms, namespace, instance_tag) t;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

CREATE OR REPLACE FUNCTION flowfabric.ff_run_reconcilers() RETURNS jsonb
LANGUAGE plpgsql STRICT SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    total jsonb;
    one jsonb;
    st text; msg text; det text; hnt text;
BEGIN
    FOR one IN SELECT * FROM flowfabric_router.ff_run_reconcilers_all() LOOP
        total := flowfabric_router.jsonb_sum(total, one);
    END LOOP;
    RETURN total;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM flowfabric_router.reraise(st, msg, det, hnt);
END $$;

-- ff_dispatch_completion(event_id) has no router form: event ids are
-- numbered per shard and only readable there (ff_completion_event), so an
-- id alone does not say which shard it means. Call it on the shard.

-- ---------------------------------------------------------------------------
-- Privileges: the extension's split. The shards check again, as the caller.
-- ---------------------------------------------------------------------------

DO $$
DECLARE
    worker_functions text[] := ARRAY[
        'ff_claim_for_worker', 'ff_claim_batch', 'ff_renew_lease', 'ff_complete_execution', 'ff_fail_execution',
        'ff_report_usage', 'ff_record_spend', 'ff_verify_grant', 'ff_get_execution', 'ff_get_inputs',
        'ff_lane_channel'];
    f record;
BEGIN
    GRANT USAGE ON SCHEMA flowfabric, flowfabric_router TO flowfabric_worker, flowfabric_admin;
    FOR f IN
        SELECT p.oid::regprocedure AS sig, p.proname, n.nspname
          FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname IN ('flowfabric', 'flowfabric_router')
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
        -- The shard map is the superuser's; everything else follows the API split.
        CONTINUE WHEN f.proname IN ('add_shard', 'assign_slots', 'apply_shard_map');
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO flowfabric_admin', f.sig);
        IF f.nspname = 'flowfabric_router' OR f.proname = ANY (worker_functions) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO flowfabric_worker', f.sig);
        END IF;
    END LOOP;
    REVOKE ALL ON ALL TABLES IN SCHEMA flowfabric_router FROM PUBLIC;
    GRANT SELECT ON ALL TABLES IN SCHEMA flowfabric_router TO flowfabric_worker, flowfabric_admin;
END $$;

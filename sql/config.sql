-- flowfabric schema, part 1: the schema guard, configuration and the HMAC keystore.
-- All engine state lives in plain tables of the schema `flowfabric`; every
-- function runs with search_path pinned to `flowfabric, pg_temp` (pg_catalog
-- implicitly first), so nothing resolves through a schema another role can
-- write.

-- CREATE EXTENSION creates the schema owned by the installing superuser. A
-- schema of that name made beforehand by someone else could hold planted
-- operators and functions that would shadow the catalog's, or let its owner
-- drop our objects: refuse it. Operators are qualified because this check
-- runs before we know the schema is clean.
DO $guard$
DECLARE
    ns oid := (SELECT n.oid FROM pg_catalog.pg_namespace n
               WHERE n.nspname OPERATOR(pg_catalog.=) 'flowfabric');
    owner name := (SELECT r.rolname FROM pg_catalog.pg_namespace n
                   JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) n.nspowner
                   WHERE n.oid OPERATOR(pg_catalog.=) ns);
    grantee name;
BEGIN
    IF owner OPERATOR(pg_catalog.<>) CURRENT_USER THEN
        RAISE EXCEPTION 'schema flowfabric already exists and is owned by %, not by %', owner, CURRENT_USER
            USING ERRCODE = '42501',
                  HINT = 'Drop that schema (after checking what it holds) and run CREATE EXTENSION again; the extension creates it.';
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace OPERATOR(pg_catalog.=) ns)
       OR EXISTS (SELECT FROM pg_catalog.pg_proc WHERE pronamespace OPERATOR(pg_catalog.=) ns)
       OR EXISTS (SELECT FROM pg_catalog.pg_type WHERE typnamespace OPERATOR(pg_catalog.=) ns)
       OR EXISTS (SELECT FROM pg_catalog.pg_operator WHERE oprnamespace OPERATOR(pg_catalog.=) ns)
       OR EXISTS (SELECT FROM pg_catalog.pg_collation WHERE collnamespace OPERATOR(pg_catalog.=) ns)
       OR EXISTS (SELECT FROM pg_catalog.pg_conversion WHERE connamespace OPERATOR(pg_catalog.=) ns)
    THEN
        RAISE EXCEPTION 'schema flowfabric already holds objects; flowfabric needs a schema of its own'
            USING ERRCODE = '42P06';
    END IF;
    -- Only the owner may create in the schema; callers get USAGE through the
    -- flowfabric roles (see finalize).
    REVOKE ALL ON SCHEMA flowfabric FROM PUBLIC;
    FOR grantee IN
        SELECT DISTINCT r.rolname
        FROM pg_catalog.pg_namespace n,
             LATERAL pg_catalog.aclexplode(n.nspacl) a
             JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) a.grantee
        WHERE n.oid OPERATOR(pg_catalog.=) ns AND a.grantee OPERATOR(pg_catalog.<>) n.nspowner
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON SCHEMA flowfabric FROM %I', grantee);
    END LOOP;
END
$guard$;

CREATE TABLE ff_partition_config (
    singleton_lock        boolean PRIMARY KEY DEFAULT true CHECK (singleton_lock),
    num_flow_partitions   int NOT NULL DEFAULT 256 CHECK (num_flow_partitions BETWEEN 1 AND 32767),
    num_budget_partitions int NOT NULL DEFAULT 32 CHECK (num_budget_partitions BETWEEN 1 AND 32767),
    num_quota_partitions  int NOT NULL DEFAULT 32 CHECK (num_quota_partitions BETWEEN 1 AND 32767),
    ff_version            text NOT NULL
);
COMMENT ON TABLE ff_partition_config IS
    'Partition counts used to slot ids (CRC-16/XMODEM % N); fixed once any engine data exists.';

INSERT INTO ff_partition_config (ff_version) VALUES ('0.3.0');

-- Signing keys for claim grants. Exactly one key is active; retired keys keep
-- verifying for flowfabric.key_grace_ms after retired_at_ms.
CREATE TABLE ff_waitpoint_hmac (
    kid            text PRIMARY KEY
                   CHECK (kid ~ '^[!-9;-~]{1,64}$'),
    secret         bytea NOT NULL CHECK (length(secret) >= 16),
    rotated_at_ms  bigint NOT NULL,
    active         boolean NOT NULL DEFAULT true,
    retired_at_ms  bigint,
    -- The random key CREATE EXTENSION installs; a restore replaces it.
    seeded         boolean NOT NULL DEFAULT false,
    CHECK (active = (retired_at_ms IS NULL))
);
CREATE UNIQUE INDEX ff_waitpoint_hmac_one_active ON ff_waitpoint_hmac (active) WHERE active;
COMMENT ON TABLE ff_waitpoint_hmac IS
    'HMAC-SHA256 keystore for claim grants; never readable by worker roles.';

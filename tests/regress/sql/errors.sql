-- Every SQLSTATE flowfabric raises, each produced by a real call.
-- VERBOSITY verbose prints the SQLSTATE in front of each message
-- (tests/regress/filter.sh drops the LOCATION lines, which name source lines).
\set VERBOSITY verbose
-- Start without the extension (the README test may have run in this
-- database; DROP EXTENSION leaves the schema CREATE EXTENSION made).
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS flowfabric CASCADE;
DROP SCHEMA IF EXISTS flowfabric CASCADE;
DROP EXTENSION IF EXISTS dblink;
RESET client_min_messages;

-- 42P06: CREATE EXTENSION refuses a schema flowfabric that already holds objects.
CREATE SCHEMA flowfabric;
CREATE TABLE flowfabric.planted (x int);
CREATE EXTENSION flowfabric;
DROP SCHEMA flowfabric CASCADE;

-- 42501: ... and one that another role owns.
CREATE ROLE ff_regress_owner NOLOGIN;
CREATE SCHEMA flowfabric AUTHORIZATION ff_regress_owner;
CREATE EXTENSION flowfabric;
DROP SCHEMA flowfabric;

CREATE EXTENSION flowfabric;
SET search_path = flowfabric, public;

-- 42501: only a superuser may install an HMAC secret of its choosing.
CREATE ROLE ff_regress_admin NOLOGIN IN ROLE flowfabric_admin;
SET ROLE ff_regress_admin;
SELECT ff_rotate_hmac_secret('chosen-kid', decode(repeat('07', 32), 'hex'));
RESET ROLE;

-- 22023: an argument the function cannot accept (a malformed execution id).
SELECT ff_get_execution('not-an-execution-id');

-- 22004: a required argument is NULL.
SELECT ff_create_execution(NULL);

-- 22003: a counter would overflow bigint.
SELECT ff_create_budget('huge', '{tokens}', '{0}', '{0}');
SELECT * FROM ff_report_usage('huge', '{"tokens": 9223372036854775807}');
SELECT * FROM ff_report_usage('huge', '{"tokens": 1}');

-- P0002: the named object does not exist.
SELECT ff_reset_budget('no-such-budget');

-- 23505: a kid that was already used.
SELECT ff_rotate_hmac_secret('kid-a');
SELECT ff_rotate_hmac_secret('kid-b');
SELECT ff_rotate_hmac_secret('kid-a');

-- A flow of two executions, a -> b.
\set flow f0000000-0000-4000-8000-000000000001
\set edge e0000000-0000-4000-8000-00000000000e
SELECT ff_create_flow(:'flow');
SELECT ff_create_execution('errors', flow_id => :'flow', execution_id => 'a0000000-0000-4000-8000-00000000000a') AS a \gset
SELECT ff_create_execution('errors', flow_id => :'flow', execution_id => 'b0000000-0000-4000-8000-00000000000b') AS b \gset
SELECT * FROM ff_add_execution_to_flow(:'flow', :'a');
SELECT * FROM ff_add_execution_to_flow(:'flow', :'b');

-- 40001: staging against a stale graph revision (it is 2 now).
SELECT ff_stage_dependency_edge(:'flow', :'edge', :'a', :'b', 1);
SELECT ff_stage_dependency_edge(:'flow', :'edge', :'a', :'b', 2);

-- 55P03: applying the edge while another transaction holds the downstream
-- (a second session, through dblink, locks b's row).
CREATE EXTENSION dblink;
SELECT format('host=%s port=%s dbname=%s user=postgres',
              split_part(current_setting('unix_socket_directories'), ',', 1),
              current_setting('port'), current_database()) AS conninfo \gset
SELECT dblink_connect('holder', :'conninfo');
SELECT dblink_exec('holder', 'BEGIN');
SELECT * FROM dblink('holder', $$SELECT 1 FROM flowfabric.ff_exec_core
                                 WHERE execution_id = 'b0000000-0000-4000-8000-00000000000b'
                                 FOR UPDATE$$) AS held(x int);
SET lock_timeout = '10s';
SELECT * FROM ff_apply_dependency_to_child(:'flow', :'edge', :'b');
RESET lock_timeout;
SELECT dblink_exec('holder', 'ROLLBACK');
SELECT dblink_disconnect('holder');
SELECT * FROM ff_apply_dependency_to_child(:'flow', :'edge', :'b');

-- A worker claims a.
SELECT execution_id = :'a' AS claimed_a, grant_key FROM ff_claim_for_worker('errors', 'w1', 'w1-1') \gset
\echo :claimed_a

-- 28000: a grant whose signature was tampered with.
SELECT ff_complete_execution(:'a', left(:'grant_key', -1) || CASE WHEN right(:'grant_key', 1) = '0' THEN '1' ELSE '0' END);

-- XX001: a stored edge group policy written around the API is reported as
-- corrupt when the completion cascade reads it; the completion rolls back.
UPDATE ff_edge_group SET policy = '{"kind": "nope"}' WHERE downstream_eid = 'b0000000-0000-4000-8000-00000000000b';
SELECT ff_complete_execution(:'a', :'grant_key');
UPDATE ff_edge_group SET policy = '{"kind": "all_of"}' WHERE downstream_eid = 'b0000000-0000-4000-8000-00000000000b';
SELECT ff_complete_execution(:'a', :'grant_key');
SELECT ff_get_execution(:'b') ->> 'public_state' AS b_state;

-- 55000: a grant that is no longer current (a already completed).
SELECT ff_complete_execution(:'a', :'grant_key');

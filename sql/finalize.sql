-- flowfabric schema, last part: runs after every table and function exists.

-- One random active signing key, so claims work right after CREATE EXTENSION.
SELECT ff_rotate_hmac_secret('ff-' || (extract(epoch FROM clock_timestamp()) * 1000)::bigint);

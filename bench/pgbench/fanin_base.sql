WITH c AS (UPDATE bench_fanin_queue SET state = 'leased', worker = 'w' || :client_id, lease_until = bench_now_ms() + 30000, started_at = bench_now_ms() WHERE id = (SELECT id FROM bench_fanin_queue WHERE lane = 'fanin' AND state = 'ready' ORDER BY priority DESC, created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id) SELECT count(*) AS got, coalesce(max(id), 0) AS qid FROM c \gset
\if :got
WITH d AS (UPDATE bench_fanin_queue SET state = 'done', lease_until = NULL, finished_at = bench_now_ms() WHERE id = :qid AND worker = 'w' || :client_id AND state = 'leased' RETURNING 1) UPDATE bench_fanin_sink s SET remaining = s.remaining - 1, fired_at = coalesce(s.fired_at, CASE WHEN s.remaining = 1 THEN bench_now_ms() END) FROM d WHERE s.id = 1;
\else
\sleep 1 ms
\endif

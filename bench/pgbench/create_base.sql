INSERT INTO bench_queue (lane, created_at, payload) VALUES (:lane, bench_now_ms(), '{"n": 1}') RETURNING id;

SELECT * FROM pgmq.send('bench', '{"n": 1}');
SELECT msg_id AS mid FROM pgmq.read('bench', 30, 1) \gset
SELECT pgmq.delete('bench', :mid::bigint);

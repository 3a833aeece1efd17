SELECT * FROM pgmq.send('bench', '{"n": 1}');

SELECT msg_id FROM pgmq.read('bench', 30, 1);

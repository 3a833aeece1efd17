\set b random(1, :budgets)
UPDATE bench_counter SET v = v + 1 WHERE id = :b AND v + 1 <= lim RETURNING v;

\set b random(1, :budgets)
SELECT * FROM flowfabric.ff_report_usage('b' || :b, '{"tokens": 1}');

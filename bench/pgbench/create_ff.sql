SELECT flowfabric.ff_create_execution(:lane, '{"n": 1}');

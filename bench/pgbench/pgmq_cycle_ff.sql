SELECT flowfabric.ff_create_execution('bench', '{"n": 1}');
SELECT execution_id AS eid, grant_key AS gk FROM flowfabric.ff_claim_for_worker('bench', 'w' || :client_id, 'w' || :client_id || '-1') \gset
SELECT flowfabric.ff_complete_execution(:eid, :gk);

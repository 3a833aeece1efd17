SELECT execution_id AS eid, grant_key AS gk FROM flowfabric.ff_claim_for_worker(:lane, 'w' || :client_id, 'w' || :client_id || '-1') \gset
SELECT flowfabric.ff_complete_execution(:eid, :gk);

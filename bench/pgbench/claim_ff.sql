SELECT * FROM flowfabric.ff_claim_for_worker(:lane, 'w' || :client_id, 'w' || :client_id || '-1');

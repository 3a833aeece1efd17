SELECT count(*) AS got, coalesce(max(execution_id), '') AS eid, coalesce(max(grant_key), '') AS gk FROM flowfabric.ff_claim_for_worker('fanin', 'w' || :client_id, 'w' || :client_id || '-1') \gset
\if :got
SELECT flowfabric.ff_complete_execution(:eid, :gk);
\else
\sleep 1 ms
\endif

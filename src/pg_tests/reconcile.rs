use super::*;

#[pg_schema]
mod tests {
    use super::*;

    const FLOW: &str = "aaaaaaaa-2222-3333-4444-555555555555";

    fn now_ms() -> i64 {
        one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint").unwrap()
    }

    /// A two-node flow whose root is terminal with an undispatched, old event.
    fn stale_event(ns: &str) -> (String, String) {
        let flow = format!("{}{}", &FLOW[..30], &format!("{:06}", ns.len()));
        Spi::run(&format!("SELECT ff_create_flow('{flow}', namespace => '{ns}')")).unwrap();
        let a: String = one(&format!("SELECT ff_create_execution('l', flow_id => '{flow}')")).unwrap();
        let b: String = one(&format!("SELECT ff_create_execution('l', flow_id => '{flow}')")).unwrap();
        Spi::run(&format!("SELECT ff_add_execution_to_flow('{flow}', '{a}')")).unwrap();
        Spi::run(&format!("SELECT ff_add_execution_to_flow('{flow}', '{b}')")).unwrap();
        Spi::run(&format!("SELECT ff_stage_dependency_edge('{flow}', '{flow}', '{a}', '{b}', 2)")).unwrap();
        Spi::run(&format!("SELECT ff_apply_dependency_to_child('{flow}', '{flow}', '{b}')")).unwrap();
        Spi::run(&format!(
            "UPDATE ff_exec_core SET lifecycle_phase = 'terminal', eligibility_state = 'not_applicable',
                 public_state = 'completed', terminal_outcome = 'success'
             WHERE execution_id = split_part('{a}', '}}:', 2)::uuid;
             INSERT INTO ff_completion_event (partition_key, execution_id, flow_id, outcome, namespace,
                 occurred_at_ms, committed_at_ms)
             VALUES (0, split_part('{a}', '}}:', 2)::uuid, '{flow}', 'success', '{ns}', 0, {})",
            now_ms() - 60_000
        ))
        .unwrap();
        (a, b)
    }

    fn public_state(id: &str) -> String {
        one(&format!("SELECT ff_get_execution('{id}') ->> 'public_state'")).unwrap()
    }

    #[pg_test]
    fn tick_dispatches_stale_events_with_filters() {
        let (_, b1) = stale_event("tenant-a");
        let (_, b2) = stale_event("tenant-bb");
        let r: Option<String> = one(
            "SELECT format('%s/%s/%s/%s/%s', scanned, reconciled, noop, filtered, errors)
             FROM ff_reconcile_tick(0, namespace => 'tenant-a')",
        );
        assert_eq!(r.as_deref(), Some("1/1/0/1/0"));
        assert_eq!(public_state(&b1), "waiting");
        assert_eq!(public_state(&b2), "waiting_children");
        // Too fresh for a one-hour threshold.
        let r: Option<String> = one("SELECT format('%s/%s', scanned, reconciled) FROM ff_reconcile_tick(3600000)");
        assert_eq!(r.as_deref(), Some("0/0"));
        let r: Option<String> = one("SELECT format('%s/%s', scanned, reconciled) FROM ff_reconcile_tick()");
        assert_eq!(r.as_deref(), Some("1/1"));
        assert_eq!(public_state(&b2), "waiting");
        let r: Option<String> = one("SELECT format('%s/%s', scanned, reconciled) FROM ff_reconcile_tick(0)");
        assert_eq!(r.as_deref(), Some("0/0"));
        assert_fails("SELECT * FROM ff_reconcile_tick(-1)", "ERRCODE_INVALID_PARAMETER_VALUE");
    }

    #[pg_test]
    fn a_failing_event_is_counted_and_the_others_go_on() {
        let (_, b) = stale_event("t");
        // An event whose edge group carries a policy that makes dispatch fail.
        Spi::run(
            "CREATE FUNCTION pg_temp.boom() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN IF NEW.group_state <> OLD.group_state AND NEW.success_count > 1 THEN
                      RAISE EXCEPTION 'broken group'; END IF; RETURN NEW; END $$;",
        )
        .unwrap();
        Spi::run("CREATE TRIGGER boom BEFORE UPDATE ON ff_edge_group FOR EACH ROW EXECUTE FUNCTION pg_temp.boom()").unwrap();
        Spi::run("UPDATE ff_edge_group SET success_count = 1").unwrap();
        let (_, b2) = stale_event("tt");
        let r: Option<String> =
            one("SELECT format('%s/%s/%s/%s', scanned, reconciled, noop, errors) FROM ff_reconcile_tick(0)");
        assert_eq!(r.as_deref(), Some("2/1/0/1"));
        assert_eq!(public_state(&b), "waiting_children");
        assert_eq!(public_state(&b2), "waiting");
        let left: i64 = one("SELECT count(*) FROM ff_stale_completion_events").unwrap();
        assert_eq!(left, 1);
    }

    #[pg_test]
    fn run_reconcilers_expires_leases_and_promotes() {
        let retry: String =
            one("SELECT ff_create_execution('lease', max_attempts => 2, retry_policy => '{\"base_ms\": 300, \"jitter\": false}')").unwrap();
        Spi::run("SELECT ff_claim_for_worker('lease', 'w', 'i', grant_ttl_ms => 1)").unwrap();
        let last: String = one("SELECT ff_create_execution('lease2')").unwrap();
        Spi::run("SELECT ff_claim_for_worker('lease2', 'w', 'i', grant_ttl_ms => 1)").unwrap();
        let delayed: String = one("SELECT ff_create_execution('later', delay_until_ms => 1)").unwrap();
        Spi::run("UPDATE ff_exec_core SET eligibility_state = 'not_eligible_until_time', public_state = 'delayed' WHERE lane_id = 'later'").unwrap();
        Spi::run("SELECT pg_sleep(0.01)").unwrap();
        let report: pgrx::JsonB = one("SELECT ff_run_reconcilers()").unwrap();
        let r = report.0;
        assert_eq!(r["lease_expiry"]["reclaimed"], 1, "{r}");
        assert_eq!(r["lease_expiry"]["expired"], 1, "{r}");
        assert_eq!(r["delayed_promotion"]["promoted"], 1, "{r}");
        // An expired lease counts as a failed attempt: the retry waits out its backoff.
        assert_eq!(public_state(&retry), "delayed");
        assert_eq!(public_state(&last), "expired");
        Spi::run("SELECT pg_sleep(0.35)").unwrap();
        Spi::run("SELECT ff_run_reconcilers()").unwrap();
        assert_eq!(public_state(&retry), "waiting");
        assert_eq!(public_state(&delayed), "waiting");
        let attempts: Option<String> = one(&format!("SELECT ff_get_execution('{retry}') ->> 'attempt_index'"));
        assert_eq!(attempts.as_deref(), Some("1"));
        let outcome: Option<String> = one("SELECT outcome FROM ff_completion_event");
        assert_eq!(outcome.as_deref(), Some("expired"));
        let (again, _): (Option<String>, Option<String>) =
            Spi::get_two("SELECT execution_id, grant_key FROM ff_claim_for_worker('lease', 'w2', 'i')").unwrap();
        assert_eq!(again.as_deref(), Some(retry.as_str()));
    }

    #[pg_test]
    fn run_reconcilers_resets_budgets_and_purges() {
        Spi::run("SELECT ff_create_budget('b', '{t}', '{10}', '{0}', reset_interval_ms => 1000)").unwrap();
        Spi::run("SELECT ff_report_usage('b', '{\"t\": 7}', 'old-key')").unwrap();
        Spi::run("UPDATE ff_budget_policy SET next_reset_at_ms = 1").unwrap();
        Spi::run("UPDATE ff_budget_usage_dedup SET expires_at_ms = 1").unwrap();
        Spi::run("SELECT ff_create_quota_policy('q', 1, 5, 0)").unwrap();
        Spi::run("INSERT INTO ff_quota_window VALUES ('q', 1, gen_random_uuid(), 0), ('q', 9223372036854775000, gen_random_uuid(), 0)").unwrap();
        let report: pgrx::JsonB = one("SELECT ff_run_reconcilers()").unwrap();
        let r = report.0;
        assert_eq!(r["budget_reset"]["processed"], 1, "{r}");
        assert_eq!(r["dedup_purge"]["purged"], 1, "{r}");
        assert_eq!(r["quota_window_trim"]["trimmed"], 1, "{r}");
        let usage: i64 = one("SELECT current_value FROM ff_budget_usage").unwrap();
        assert_eq!(usage, 0);
        let next: i64 = one("SELECT next_reset_at_ms FROM ff_budget_policy").unwrap();
        assert!(next > now_ms());
        let health: Option<String> = one("SELECT status FROM ff_budget_health WHERE budget_id = 'b'");
        assert_eq!(health.as_deref(), Some("ok"));
        Spi::run("SELECT ff_report_usage('b', '{\"t\": 10}')").unwrap();
        let health: Option<String> = one("SELECT status FROM ff_budget_health WHERE budget_id = 'b'");
        assert_eq!(health.as_deref(), Some("at_or_over_hard_limit"));
    }

    #[pg_test]
    fn queue_depth_view() {
        Spi::run("SELECT ff_create_execution('v') FROM generate_series(1, 3)").unwrap();
        Spi::run("SELECT ff_claim_for_worker('v', 'w', 'i')").unwrap();
        let rows: Option<String> = one(
            "SELECT string_agg(public_state || '=' || executions, ',' ORDER BY public_state) FROM ff_queue_depth WHERE lane_id = 'v'",
        );
        assert_eq!(rows.as_deref(), Some("active=1,waiting=2"));
    }

    #[pg_test]
    fn retention_purges_old_finished_work_only() {
        let old: String = one("SELECT ff_create_execution('r')").unwrap();
        let (_, g): (Option<String>, Option<String>) =
            Spi::get_two("SELECT execution_id, grant_key FROM ff_claim_for_worker('r', 'w', 'i')").unwrap();
        Spi::run(&format!("SELECT ff_complete_execution('{old}', '{}')", g.unwrap())).unwrap();
        let live: String = one("SELECT ff_create_execution('r')").unwrap();
        Spi::run("UPDATE ff_exec_core SET terminal_at_ms = 1 WHERE terminal_at_ms IS NOT NULL").unwrap();
        Spi::run("UPDATE ff_completion_event SET occurred_at_ms = 1").unwrap();
        Spi::run("UPDATE ff_claim_grant SET expires_at_ms = 1").unwrap();
        let report: pgrx::JsonB = one("SELECT ff_run_reconcilers()").unwrap();
        assert_eq!(report.0["retention_purge"]["executions"], 1, "{}", report.0);
        assert_eq!(report.0["grant_purge"]["purged"], 1, "{}", report.0);
        assert_fails(&format!("SELECT ff_get_execution('{old}')"), "ERRCODE_NO_DATA_FOUND");
        assert_eq!(public_state(&live), "waiting");
        let left: i64 = one("SELECT (SELECT count(*) FROM ff_attempt) + (SELECT count(*) FROM ff_completion_event)").unwrap();
        assert_eq!(left, 0);
        Spi::run("SET LOCAL flowfabric.retention_s = 0").unwrap();
        Spi::run("UPDATE ff_exec_core SET lifecycle_phase = 'terminal', eligibility_state = 'not_applicable', terminal_at_ms = 1").unwrap();
        let report: pgrx::JsonB = one("SELECT ff_run_reconcilers()").unwrap();
        assert_eq!(report.0["retention_purge"]["executions"], 0, "{}", report.0);
    }
}

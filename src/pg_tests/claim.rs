use super::*;

#[pg_schema]
mod tests {
    use super::*;

    /// (execution_id, grant_key) of a claim, or None when nothing was claimable.
    fn claim(lane: &str, caps: &str) -> Option<(String, String)> {
        let row: Option<String> = one(&format!(
            "SELECT execution_id || ' ' || grant_key FROM ff_claim_for_worker('{lane}', 'w1', 'w1-i1', '{caps}')"
        ));
        row.map(|r| {
            let (a, b) = r.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
    }

    fn create(args: &str) -> String {
        one::<String>(&format!("SELECT ff_create_execution({args})")).unwrap()
    }

    fn state(id: &str) -> String {
        one::<String>(&format!(
            "SELECT lifecycle_phase || '/' || eligibility_state || '/' || public_state FROM ff_exec_core
             WHERE execution_id = split_part('{id}', '}}:', 2)::uuid"
        ))
        .unwrap()
    }

    #[pg_test]
    fn create_returns_a_solo_id_in_the_lane_partition() {
        let id = create("'workers-a'");
        assert!(id.starts_with("{fp:193}:"), "{id}");
        assert_eq!(state(&id), "runnable/eligible_now/waiting");
        let fixed = create("'default', execution_id => '550e8400-e29b-41d4-a716-446655440000'");
        assert_eq!(fixed, "{fp:86}:550e8400-e29b-41d4-a716-446655440000");
        // Idempotent on the same id.
        assert_eq!(create("'default', execution_id => '550e8400-e29b-41d4-a716-446655440000'"), fixed);
        let in_flow = create("'default', flow_id => '550e8400-e29b-41d4-a716-446655440000'");
        assert!(in_flow.starts_with("{fp:24}:"), "{in_flow}");
    }

    #[pg_test]
    fn claim_takes_priority_then_age_and_signs_a_grant() {
        let low = create("'l', priority => 1");
        let high_old = create("'l', priority => 10");
        let high_new = create("'l', priority => 10");
        let (first, grant) = claim("l", "{}").unwrap();
        assert_eq!(first, high_old);
        assert!(grant.starts_with(&format!("pg:{first}:")));
        assert_eq!(one::<String>(&format!("SELECT ff_verify_grant('{grant}')")).as_deref(), Some("ok"));
        assert_eq!(state(&first), "active/not_applicable/active");
        assert_eq!(claim("l", "{}").unwrap().0, high_new);
        assert_eq!(claim("l", "{}").unwrap().0, low);
        assert!(claim("l", "{}").is_none());
        assert!(claim("unknown-lane", "{}").is_none());
    }

    #[pg_test]
    fn capabilities_must_be_a_subset() {
        let gpu = create("'l', priority => 5, required_capabilities => '{gpu,cuda}'");
        let plain = create("'l'");
        assert_eq!(claim("l", "{gpu}").unwrap().0, plain);
        assert!(claim("l", "{gpu}").is_none());
        assert!(claim("l", "{GPU,CUDA}").is_none());
        assert_eq!(claim("l", "{cuda,gpu,x}").unwrap().0, gpu);
    }

    #[pg_test]
    fn budget_at_hard_limit_refuses_and_the_pick_moves_on() {
        Spi::run("SELECT ff_create_budget('full', '{tokens}', '{10}', '{0}')").unwrap();
        Spi::run("SELECT ff_report_usage('full', '{\"tokens\": 10}')").unwrap();
        Spi::run("SELECT ff_create_budget('ok', '{tokens}', '{10}', '{0}')").unwrap();
        let blocked = create("'l', priority => 9, budget_ids => '{full}'");
        let fine = create("'l', budget_ids => '{ok}'");
        assert_eq!(claim("l", "{}").unwrap().0, fine);
        assert!(claim("l", "{}").is_none());
        assert_eq!(state(&blocked), "runnable/eligible_now/waiting");
        Spi::run("SELECT ff_reset_budget('full')").unwrap();
        assert_eq!(claim("l", "{}").unwrap().0, blocked);
    }

    #[pg_test]
    fn quota_window_and_concurrency_are_enforced() {
        Spi::run("SELECT ff_create_quota_policy('conc', 60, 0, 1)").unwrap();
        let a = create("'l', quota_policy_id => 'conc'");
        let b = create("'l', quota_policy_id => 'conc'");
        let (got, grant) = claim("l", "{}").unwrap();
        assert_eq!(got, a);
        assert!(claim("l", "{}").is_none(), "second claim must wait for a concurrency slot");
        Spi::run(&format!("SELECT ff_complete_execution('{a}', '{grant}')")).unwrap();
        assert_eq!(claim("l", "{}").unwrap().0, b);

        Spi::run("SELECT ff_create_quota_policy('rate', 3600, 2, 0)").unwrap();
        for _ in 0..3 {
            create("'r', quota_policy_id => 'rate'");
        }
        assert!(claim("r", "{}").is_some());
        assert!(claim("r", "{}").is_some());
        assert!(claim("r", "{}").is_none(), "third admission in the window is refused");
        let admitted: i64 = one("SELECT count(*) FROM ff_quota_window WHERE quota_policy_id = 'rate'").unwrap();
        assert_eq!(admitted, 2);
    }

    #[pg_test]
    fn delayed_executions_wait_for_their_time() {
        let later = create("'l', delay_until_ms => (extract(epoch FROM clock_timestamp()) * 1000)::bigint + 60000");
        assert_eq!(state(&later), "runnable/not_eligible_until_time/delayed");
        assert!(claim("l", "{}").is_none());
        let past = create("'l', delay_until_ms => 1");
        assert_eq!(claim("l", "{}").unwrap().0, past);
    }

    #[pg_test]
    fn empty_keystore_fails_closed() {
        create("'l'");
        Spi::run("DELETE FROM ff_waitpoint_hmac").unwrap();
        assert_fails("SELECT * FROM ff_claim_for_worker('l', 'w', 'i')", "ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE");
    }

    #[pg_test]
    fn verify_grant_answers_exactly_as_fencing_decides() {
        let id = create("'l', max_attempts => 2");
        let (_, grant) = claim("l", "{}").unwrap();
        let verify = |g: &str| one::<String>(&format!("SELECT ff_verify_grant($${g}$$)")).unwrap();
        assert_eq!(verify(&grant), "ok");
        assert_eq!(verify("garbage"), "malformed");
        let last = grant.chars().last().unwrap();
        let flipped = format!("{}{}", &grant[..grant.len() - 1], if last == '0' { '1' } else { '0' });
        // Any alteration of the key is a grant we never issued, as for fencing.
        assert_eq!(verify(&flipped), "unknown_grant");
        let upper_hex = format!("{}{}", &grant[..grant.len() - 64], grant[grant.len() - 64..].to_uppercase());
        assert_eq!(verify(&upper_hex), "unknown_grant");
        let id_for_fence = grant[3..grant.find("}:").unwrap() + 2 + 36].to_string();
        assert_fails(&format!("SELECT ff_renew_lease('{id_for_fence}', '{upper_hex}', 1000)"), "ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION");
        let parts: Vec<&str> = grant.rsplitn(4, ':').collect();
        assert_eq!(verify(&grant.replace(&format!(":{}:", parts[2]), ":1000:")), "unknown_grant");
        let unknown_kid = grant.replace(&format!(":{}:", parts[1]), ":nokid:");
        assert_eq!(verify(&unknown_kid), "unknown_kid");
        let other = grant.replace(&grant[3..grant.find("}:").unwrap() + 2 + 36], "{fp:1}:00000000-0000-0000-0000-000000000000");
        assert_eq!(verify(&other), "unknown_grant");
        // A signature that does not match the stored grant's identity.
        Spi::run("UPDATE ff_claim_grant SET worker_id = 'someone-else'").unwrap();
        assert_eq!(verify(&grant), "signature_mismatch");
        Spi::run("UPDATE ff_claim_grant SET worker_id = 'w1'").unwrap();
        // Rotation: the old kid keeps verifying within the grace window, not after it.
        Spi::run("SELECT ff_rotate_hmac_secret('next')").unwrap();
        assert_eq!(verify(&grant), "ok");
        Spi::run("SET LOCAL flowfabric.key_grace_ms = 0").unwrap();
        assert_eq!(verify(&grant), "unknown_kid");
        Spi::run("RESET flowfabric.key_grace_ms").unwrap();
        // A lease that ran out, then a reclaim, then a completion: never ok again.
        Spi::run("UPDATE ff_exec_core SET lease_expires_at_ms = 1").unwrap();
        assert_eq!(verify(&grant), "expired");
        Spi::run("SELECT ff_run_reconcilers()").unwrap();
        Spi::run("UPDATE ff_exec_core SET eligible_at_ms = 0, eligibility_state = 'eligible_now', public_state = 'waiting'").unwrap();
        let (again, new_grant) = claim("l", "{}").unwrap();
        assert_eq!(again, id);
        assert_eq!(verify(&grant), "expired", "the same worker's earlier grant is stale after the reclaim");
        assert_eq!(verify(&new_grant), "ok");
        Spi::run(&format!("SELECT ff_complete_execution('{id}', '{new_grant}')")).unwrap();
        assert_eq!(verify(&new_grant), "expired");
    }

    #[pg_test]
    fn complete_requires_the_current_grant_and_writes_an_event() {
        let id = create("'l', max_attempts => 2");
        let (_, grant) = claim("l", "{}").unwrap();
        let other = create("'l'");
        let (_, other_grant) = claim("l", "{}").unwrap();
        assert_fails(&format!("SELECT ff_complete_execution('{id}', '{other_grant}')"), "ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION");
        assert_fails(&format!("SELECT ff_complete_execution('{id}', 'pg:nonsense')"), "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_fails(&format!("SELECT ff_complete_execution('{id}', 'x', NULL)"), "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_fails("SELECT ff_complete_execution('bad-id', 'x')", "ERRCODE_INVALID_PARAMETER_VALUE");
        let new_expiry: i64 = one(&format!("SELECT ff_renew_lease('{id}', '{grant}', 60000)")).unwrap();
        let now: i64 = one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint").unwrap();
        assert!(new_expiry > now + 50_000);
        assert_fails(&format!("SELECT ff_renew_lease('{id}', '{grant}', -1)"), "ERRCODE_INVALID_PARAMETER_VALUE");
        Spi::run(&format!("SELECT ff_complete_execution('{id}', '{grant}', '{{\"answer\": 42}}')")).unwrap();
        assert_eq!(state(&id), "terminal/not_applicable/completed");
        let event: Option<String> = one(&format!(
            "SELECT outcome FROM ff_completion_event WHERE execution_id = split_part('{id}', '}}:', 2)::uuid"
        ));
        assert_eq!(event.as_deref(), Some("success"));
        // A second completion with the consumed grant is stale.
        assert_fails(&format!("SELECT ff_complete_execution('{id}', '{grant}')"), "ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE");
        assert_eq!(state(&other), "active/not_applicable/active");
    }

    #[pg_test]
    fn expired_lease_refuses_completion() {
        let id = create("'l'");
        let (_, grant) = claim("l", "{}").unwrap();
        Spi::run("UPDATE ff_exec_core SET lease_expires_at_ms = 1").unwrap();
        assert_fails(&format!("SELECT ff_complete_execution('{id}', '{grant}')"), "ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE");
        assert_fails(&format!("SELECT ff_fail_execution('{id}', '{grant}', 'x')"), "ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE");
        assert_eq!(state(&id), "active/not_applicable/active");
    }

    #[pg_test]
    fn retryable_failure_backs_off_then_fails_for_good() {
        let id = create("'l', max_attempts => 2");
        let (_, grant) = claim("l", "{}").unwrap();
        let r: Option<String> = one(&format!("SELECT ff_fail_execution('{id}', '{grant}', 'boom')"));
        assert_eq!(r.as_deref(), Some("retry_scheduled"));
        assert_eq!(state(&id), "runnable/not_eligible_until_time/delayed");
        assert!(claim("l", "{}").is_none(), "backoff not over yet");
        Spi::run("UPDATE ff_exec_core SET eligible_at_ms = 0").unwrap();
        let (again, grant2) = claim("l", "{}").unwrap();
        assert_eq!(again, id);
        let attempts: i32 = one("SELECT attempt_index FROM ff_exec_core").unwrap();
        assert_eq!(attempts, 2);
        let r: Option<String> = one(&format!("SELECT ff_fail_execution('{id}', '{grant2}', 'boom again')"));
        assert_eq!(r.as_deref(), Some("failed"));
        assert_eq!(state(&id), "terminal/not_applicable/failed");
        let outcome: Option<String> = one("SELECT string_agg(outcome, ',' ORDER BY attempt_index) FROM ff_attempt");
        assert_eq!(outcome.as_deref(), Some("failed,failed"));
        let event: Option<String> = one("SELECT outcome FROM ff_completion_event");
        assert_eq!(event.as_deref(), Some("failed"));
    }

    #[pg_test]
    fn non_retryable_failure_is_terminal() {
        let id = create("'l', max_attempts => 5");
        let (_, grant) = claim("l", "{}").unwrap();
        let r: Option<String> = one(&format!("SELECT ff_fail_execution('{id}', '{grant}', 'fatal', retryable => false)"));
        assert_eq!(r.as_deref(), Some("failed"));
    }

    #[pg_test]
    fn bad_claim_input() {
        for (sql, code) in [
            ("SELECT * FROM ff_claim_for_worker('l', NULL, 'i')", "ERRCODE_NULL_VALUE_NOT_ALLOWED"),
            ("SELECT * FROM ff_claim_for_worker('l', 'w', NULL)", "ERRCODE_NULL_VALUE_NOT_ALLOWED"),
            ("SELECT * FROM ff_claim_for_worker(NULL, 'w', 'i')", "ERRCODE_NULL_VALUE_NOT_ALLOWED"),
            ("SELECT * FROM ff_claim_for_worker('l', 'w', 'i', grant_ttl_ms => -5)", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT * FROM ff_claim_for_worker('l', 'w', 'i', grant_ttl_ms => 0)", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT * FROM ff_claim_for_worker('l', 'w|x', 'i')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT * FROM ff_claim_for_worker('l', 'w', 'i', array_fill('c'::text, ARRAY[300]))", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT * FROM ff_claim_for_worker('l', 'w', 'i', ARRAY[repeat('c', 5000)])", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT ff_create_execution('')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT ff_create_execution('l', max_attempts => 0)", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT ff_create_execution('l', required_capabilities => '{\"\"}')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT ff_create_execution('l', budget_ids => ARRAY[NULL]::text[])", "ERRCODE_NULL_VALUE_NOT_ALLOWED"),
            ("SELECT ff_create_execution('l', delay_until_ms => -1)", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT ff_verify_grant(NULL)", "ERRCODE_NULL_VALUE_NOT_ALLOWED"),
        ] {
            assert_fails(sql, code);
        }
        let rows: i64 = one("SELECT count(*) FROM ff_exec_core").unwrap();
        assert_eq!(rows, 0);
    }
}


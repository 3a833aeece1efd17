use super::*;

#[pg_schema]
mod tests {
    use super::*;

    fn report(sql_args: &str) -> String {
        one::<String>(&format!(
            "SELECT format('%s|%s|%s|%s', outcome, dimension, current_usage, limit_value) FROM ff_report_usage({sql_args})"
        ))
        .unwrap()
    }

    fn usage(budget: &str, dim: &str) -> i64 {
        one(&format!(
            "SELECT coalesce((ff_get_budget_status('{budget}') -> 'usage' ->> '{dim}')::bigint, 0)"
        ))
        .unwrap()
    }

    fn status(budget: &str, field: &str) -> Option<String> {
        one(&format!("SELECT ff_get_budget_status('{budget}') ->> '{field}'"))
    }

    #[pg_test]
    fn create_budget_is_idempotent() {
        assert_eq!(one::<String>("SELECT ff_create_budget('b1', '{tokens}', '{100}', '{80}')").as_deref(), Some("created"));
        assert_eq!(
            one::<String>("SELECT ff_create_budget('b1', '{tokens}', '{5}', '{1}')").as_deref(),
            Some("already_satisfied")
        );
        assert_eq!(status("b1", "hard_limits").as_deref(), Some(r#"{"tokens": 100}"#));
        assert_eq!(status("b1", "enforcement_mode").as_deref(), Some("strict"));
        assert_eq!(status("b1", "next_reset_at"), None);
    }

    #[pg_test]
    fn create_budget_with_named_arguments_and_reset() {
        Spi::run(
            "SELECT ff_create_budget('b2', ARRAY['tokens','requests'], ARRAY[100,10]::bigint[], ARRAY[0,0]::bigint[],
                 reset_interval_ms => 60000, scope_type => 'flow', scope_id => 'f-1')",
        )
        .unwrap();
        assert_eq!(status("b2", "scope_type").as_deref(), Some("flow"));
        let scheduled: bool = one(
            "SELECT (ff_get_budget_status('b2') ->> 'next_reset_at')::bigint
                    BETWEEN (extract(epoch FROM now()) * 1000)::bigint + 50000
                        AND (extract(epoch FROM clock_timestamp()) * 1000)::bigint + 61000",
        )
        .unwrap();
        assert!(scheduled);
        let policy: Option<String> = one("SELECT policy_json::text FROM ff_budget_policy WHERE budget_id = 'b2'");
        assert_eq!(
            policy.as_deref(),
            Some(r#"{"hard_limits": {"tokens": 100, "requests": 10}, "soft_limits": {"tokens": 0, "requests": 0}, "on_hard_limit": "reject", "on_soft_limit": "warn", "reset_interval_ms": 60000}"#)
        );
    }

    #[pg_test]
    fn soft_then_hard_breach() {
        Spi::run("SELECT ff_create_budget('b', '{tokens}', '{100}', '{50}')").unwrap();
        assert_eq!(report("'b', '{\"tokens\": 60}'"), "soft_breach|tokens|60|50");
        assert_eq!(status("b", "soft_breach_count").as_deref(), Some("1"));
        assert_eq!(report("'b', '{\"tokens\": 60}'"), "hard_breach|tokens|60|100");
        assert_eq!(usage("b", "tokens"), 60);
        assert_eq!(status("b", "breach_count").as_deref(), Some("1"));
        assert_eq!(status("b", "last_breach_dim").as_deref(), Some("tokens"));
        assert!(status("b", "last_breach_at").is_some());
    }

    #[pg_test]
    fn hard_breach_on_any_dimension_applies_nothing() {
        Spi::run("SELECT ff_create_budget('b', '{a,z}', '{0,10}', '{0,0}')").unwrap();
        assert_eq!(report("'b', '{\"a\": 5, \"z\": 11}'"), "hard_breach|z|0|10");
        assert_eq!(usage("b", "a"), 0);
        assert_eq!(report("'b', '{\"a\": 5, \"z\": 10}'"), "ok|||");
        assert_eq!(usage("b", "a"), 5);
        assert_eq!(usage("b", "z"), 10);
    }

    #[pg_test]
    fn reports_to_an_unknown_budget_are_refused_and_write_nothing() {
        assert_fails("SELECT * FROM ff_report_usage('nopolicy', '{\"t\": 7}')", "ERRCODE_NO_DATA_FOUND");
        assert_fails("SELECT * FROM ff_report_usage('nopolicy', '{\"t\": 7}', 'k')", "ERRCODE_NO_DATA_FOUND");
        assert_fails("SELECT * FROM ff_report_usage_admin('nopolicy', '{t,u}', '{1,2}')", "ERRCODE_NO_DATA_FOUND");
        let rows: i64 = one(
            "SELECT (SELECT count(*) FROM ff_budget_usage) + (SELECT count(*) FROM ff_budget_usage_dedup)",
        )
        .unwrap();
        assert_eq!(rows, 0);
    }

    #[pg_test]
    fn dimensions_without_limits_are_counted() {
        Spi::run("SELECT ff_create_budget('b', '{tokens}', '{100}', '{0}')").unwrap();
        assert_eq!(report("'b', '{\"requests\": 1, \"tokens\": 5}'"), "ok|||");
        assert_eq!(report("'b', '{\"requests\": 2}'"), "ok|||");
        assert_eq!(usage("b", "requests"), 3);
        assert_eq!(usage("b", "tokens"), 5);
    }

    #[pg_test]
    fn dedup_replays_the_cached_outcome() {
        Spi::run("SELECT ff_create_budget('b', '{tokens}', '{100}', '{50}')").unwrap();
        assert_eq!(report("'b', '{\"tokens\": 60}', 'k1'"), "soft_breach|tokens|60|50");
        assert_eq!(report("'b', '{\"tokens\": 60}', 'k1'"), "soft_breach|tokens|60|50");
        assert_eq!(usage("b", "tokens"), 60);
        assert_eq!(report("'b', '{\"tokens\": 50}', dedup_key => 'k2'"), "hard_breach|tokens|60|100");
        assert_eq!(report("'b', '{\"tokens\": 1}', 'k2'"), "hard_breach|tokens|60|100");
        assert_eq!(status("b", "breach_count").as_deref(), Some("1"));
        // An in-flight or crashed placeholder replays as already_applied.
        Spi::run("INSERT INTO ff_budget_usage_dedup VALUES ('b', 'k3', 0, '{}', 0, 9223372036854775807)").unwrap();
        assert_eq!(report("'b', '{\"tokens\": 1}', 'k3'"), "already_applied|||");
        assert_eq!(usage("b", "tokens"), 60);
    }

    #[pg_test]
    fn expired_dedup_key_counts_again() {
        Spi::run("SELECT ff_create_budget('b', '{t}', '{0}', '{0}')").unwrap();
        Spi::run("INSERT INTO ff_budget_usage_dedup VALUES ('b', 'old', 0, '{\"kind\":\"Ok\"}', 0, 1)").unwrap();
        assert_eq!(report("'b', '{\"t\": 4}', 'old'"), "ok|||");
        assert_eq!(usage("b", "t"), 4);
    }

    #[pg_test]
    fn report_usage_admin_matches_report_usage() {
        Spi::run("SELECT ff_create_budget('b', '{tokens}', '{100}', '{50}')").unwrap();
        let row: Option<String> = one(
            "SELECT format('%s|%s|%s|%s', outcome, dimension, current_usage, limit_value)
             FROM ff_report_usage_admin('b', '{tokens}', '{60}')",
        );
        assert_eq!(row.as_deref(), Some("soft_breach|tokens|60|50"));
        assert_fails("SELECT * FROM ff_report_usage_admin('b', '{a,b}', '{1}')", "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_fails("SELECT * FROM ff_report_usage_admin('b', '{a}', '{-1}')", "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_fails("SELECT * FROM ff_report_usage_admin('b', '{a}', '{NULL}')", "ERRCODE_NULL_VALUE_NOT_ALLOWED");
    }

    #[pg_test]
    fn two_reports_in_one_transaction_both_apply() {
        Spi::run("SELECT ff_create_budget('b', '{t}', '{0}', '{0}')").unwrap();
        Spi::run("SELECT ff_report_usage('b', '{\"t\": 1}'); SELECT ff_report_usage('b', '{\"t\": 2}')").unwrap();
        assert_eq!(usage("b", "t"), 3);
    }

    #[pg_test]
    fn reset_zeroes_usage_and_clears_the_last_breach() {
        Spi::run("SELECT ff_create_budget('b', '{t}', '{10}', '{0}', reset_interval_ms => 1000)").unwrap();
        Spi::run("SELECT ff_report_usage('b', '{\"t\": 10}')").unwrap();
        assert_eq!(report("'b', '{\"t\": 1}'"), "hard_breach|t|10|10");
        let next: i64 = one("SELECT ff_reset_budget('b')").unwrap();
        let now: i64 = one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint").unwrap();
        assert!(next > now && next <= now + 1000, "next reset {next} vs now {now}");
        assert_eq!(usage("b", "t"), 0);
        assert_eq!(status("b", "last_breach_dim"), None);
        assert_eq!(status("b", "breach_count").as_deref(), Some("1"));
        Spi::run("SELECT ff_create_budget('noreset', '{t}', '{10}', '{0}')").unwrap();
        assert_eq!(one::<i64>("SELECT ff_reset_budget('noreset')"), Some(0));
        assert_fails("SELECT ff_reset_budget('missing')", "ERRCODE_NO_DATA_FOUND");
        assert_fails("SELECT ff_get_budget_status('missing')", "ERRCODE_NO_DATA_FOUND");
    }

    /// Creates an execution naming `budgets` and claims it; returns its id.
    fn leased(budgets: &str) -> String {
        let id: String = one(&format!("SELECT ff_create_execution('spend', budget_ids => '{budgets}')")).unwrap();
        let got: String = one("SELECT execution_id FROM ff_claim_for_worker('spend', 'w', 'i')").unwrap();
        assert_eq!(got, id);
        id
    }

    fn spend(exec: &str, deltas: &str, key: &str) -> String {
        one::<String>(&format!(
            "SELECT format('%s|%s|%s|%s', outcome, dimension, current_usage, limit_value)
             FROM ff_record_spend('b', '{exec}', '{deltas}', '{key}')"
        ))
        .unwrap()
    }

    #[pg_test]
    fn record_spend_and_release() {
        Spi::run("SELECT ff_create_budget('b', '{tokens,cost}', '{100,0}', '{50,0}')").unwrap();
        let e1 = leased("{b}");
        let e2 = leased("{b}");
        assert_eq!(spend(&e1, r#"{"tokens": 10, "cost": 20}"#, "i1"), "ok|||");
        assert_eq!(spend(&e1, r#"{"tokens": 10, "cost": 20}"#, "i1"), "already_applied|||");
        assert_eq!(spend(&e1, r#"{"tokens": 50}"#, "i2"), "soft_breach|tokens|60|50");
        assert_eq!(spend(&e2, r#"{"tokens": 30}"#, "i3"), "soft_breach|tokens|90|50");
        assert_eq!(spend(&e2, r#"{"tokens": 30}"#, "i4"), "hard_breach|tokens|90|100");
        let ledger: i64 = one(&format!(
            "SELECT delta_total FROM ff_budget_usage_by_exec WHERE execution_id = split_part('{e2}', '}}:', 2)::uuid"
        ))
        .unwrap();
        assert_eq!(ledger, 30);
        Spi::run(&format!("SELECT ff_release_budget('b', '{e1}')")).unwrap();
        assert_eq!(usage("b", "tokens"), 30);
        assert_eq!(usage("b", "cost"), 0);
        Spi::run(&format!("SELECT ff_release_budget('b', '{e1}')")).unwrap();
        assert_eq!(usage("b", "tokens"), 30);
        // Release after a reset clamps at zero.
        Spi::run("SELECT ff_reset_budget('b')").unwrap();
        Spi::run(&format!("SELECT ff_release_budget('b', '{e2}')")).unwrap();
        assert_eq!(usage("b", "tokens"), 0);
        assert_fails("SELECT ff_release_budget('b', 'not-an-id')", "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_fails("SELECT * FROM ff_record_spend('b', '{fp:1}:zz', '{}', 'k')", "ERRCODE_INVALID_PARAMETER_VALUE");
    }

    #[pg_test]
    fn spend_needs_a_leased_execution_that_names_the_budget() {
        Spi::run("SELECT ff_create_budget('b', '{tokens}', '{1000}', '{0}')").unwrap();
        Spi::run("SELECT ff_create_budget('other', '{tokens}', '{1000}', '{0}')").unwrap();
        let made_up = "{fp:1}:650e8400-e29b-41d4-a716-446655440000";
        assert_fails(&format!("SELECT * FROM ff_record_spend('b', '{made_up}', '{{\"tokens\": 5}}', 'k1')"), "ERRCODE_NO_DATA_FOUND");
        let waiting: String = one("SELECT ff_create_execution('queued', budget_ids => '{b}')").unwrap();
        assert_fails(&format!("SELECT * FROM ff_record_spend('b', '{waiting}', '{{\"tokens\": 5}}', 'k2')"), "ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE");
        let other = leased("{other}");
        assert_fails(&format!("SELECT * FROM ff_record_spend('b', '{other}', '{{\"tokens\": 5}}', 'k3')"), "ERRCODE_INVALID_PARAMETER_VALUE");
        let mine = leased("{b}");
        assert_fails(&format!("SELECT * FROM ff_record_spend('missing', '{mine}', '{{\"tokens\": 5}}', 'k4')"), "ERRCODE_NO_DATA_FOUND");
        assert_fails(&format!("SELECT * FROM ff_record_spend('b', '{mine}', '{{\"tokens\": 5}}', NULL)"), "ERRCODE_NULL_VALUE_NOT_ALLOWED");
        assert_eq!(usage("b", "tokens"), 0);
        let ledgers: i64 = one("SELECT count(*) FROM ff_budget_usage_by_exec").unwrap();
        assert_eq!(ledgers, 0);
    }

    #[pg_test]
    fn record_mode_books_the_crossing_report_and_admission_then_refuses() {
        Spi::run("SELECT ff_create_budget('b', '{tokens}', '{100}', '{0}', on_hard_limit => 'record')").unwrap();
        let e = leased("{b}");
        assert_eq!(spend(&e, r#"{"tokens": 90}"#, "s1"), "ok|||");
        assert_eq!(spend(&e, r#"{"tokens": 25}"#, "s2"), "hard_breach|tokens|115|100");
        assert_eq!(usage("b", "tokens"), 115);
        assert_eq!(status("b", "breach_count").as_deref(), Some("1"));
        assert_eq!(status("b", "on_hard_limit").as_deref(), Some("record"));
        Spi::run("SELECT ff_create_execution('spend', budget_ids => '{b}')").unwrap();
        let claimed: Option<String> = one("SELECT execution_id FROM ff_claim_for_worker('spend', 'w', 'i')");
        assert_eq!(claimed, None, "admission refuses once usage reached the limit");
    }

    #[pg_test]
    fn advisory_never_refuses_but_counts() {
        Spi::run("SELECT ff_create_budget('b', '{tokens}', '{100}', '{50}', enforcement_mode => 'advisory')").unwrap();
        assert_eq!(report("'b', '{\"tokens\": 120}'"), "hard_breach|tokens|120|100");
        assert_eq!(report("'b', '{\"tokens\": 1}'"), "hard_breach|tokens|121|100");
        assert_eq!(usage("b", "tokens"), 121);
        assert_eq!(status("b", "breach_count").as_deref(), Some("2"));
        assert_eq!(status("b", "enforcement_mode").as_deref(), Some("advisory"));
        Spi::run("SELECT ff_create_execution('adv', budget_ids => '{b}')").unwrap();
        assert!(one::<String>("SELECT execution_id FROM ff_claim_for_worker('adv', 'w', 'i')").is_some());
    }

    #[pg_test]
    fn unknown_modes_are_refused() {
        for sql in [
            "SELECT ff_create_budget('b', '{t}', '{1}', '{0}', enforcement_mode => 'lenient')",
            "SELECT ff_create_budget('b', '{t}', '{1}', '{0}', on_hard_limit => 'explode')",
            "SELECT ff_create_budget('b', '{t}', '{1}', '{0}', on_soft_limit => 'page')",
        ] {
            assert_fails(sql, "ERRCODE_INVALID_PARAMETER_VALUE");
        }
        let n: i64 = one("SELECT count(*) FROM ff_budget_policy").unwrap();
        assert_eq!(n, 0);
    }

    #[pg_test]
    fn reservations_hold_headroom_and_shrink_with_spend() {
        Spi::run("SELECT ff_create_budget('b', '{tokens}', '{1000}', '{0}')").unwrap();
        for _ in 0..3 {
            Spi::run("SELECT ff_create_execution('r', budget_ids => '{b}', budget_reserve => '{\"tokens\": 400}')").unwrap();
        }
        let first: String = one("SELECT execution_id FROM ff_claim_for_worker('r', 'w', 'i')").unwrap();
        let second: String = one("SELECT execution_id FROM ff_claim_for_worker('r', 'w', 'i')").unwrap();
        assert!(one::<String>("SELECT execution_id FROM ff_claim_for_worker('r', 'w', 'i')").is_none(), "800 reserved + 400 > 1000");
        assert_eq!(status("b", "reserved").as_deref(), Some(r#"{"tokens": 800}"#));
        Spi::run(&format!("SELECT ff_record_spend('b', '{first}', '{{\"tokens\": 150}}', 'x')")).unwrap();
        assert_eq!(status("b", "reserved").as_deref(), Some(r#"{"tokens": 650}"#));
        assert_eq!(usage("b", "tokens"), 150);
        // 150 used + 650 reserved + 400 > 1000: still refused.
        assert!(one::<String>("SELECT execution_id FROM ff_claim_for_worker('r', 'w', 'i')").is_none());
        // Cancelling the second lease hands its reservation back.
        Spi::run(&format!("SELECT ff_cancel_execution('{second}')")).unwrap();
        assert_eq!(status("b", "reserved").as_deref(), Some(r#"{"tokens": 250}"#));
        assert!(one::<String>("SELECT execution_id FROM ff_claim_for_worker('r', 'w', 'i')").is_some());
        let health: String = one("SELECT format('%s/%s/%s', current_usage, reserved, hard_limit) FROM ff_budget_health WHERE budget_id = 'b'").unwrap();
        assert_eq!(health, "150/650/1000");
    }

    #[pg_test]
    fn bad_input_is_refused_and_writes_nothing() {
        for (sql, code) in [
            ("SELECT * FROM ff_report_usage('b', '[1,2]')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT * FROM ff_report_usage('b', '{\"t\": -1}')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT * FROM ff_report_usage('b', '{\"t\": 1.5}')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT * FROM ff_report_usage('b', '{\"t\": \"5\"}')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT * FROM ff_report_usage('b', '{\"t\": 1e30}')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT * FROM ff_report_usage('b', NULL)", "ERRCODE_NULL_VALUE_NOT_ALLOWED"),
            ("SELECT * FROM ff_report_usage(NULL, '{}')", "ERRCODE_NULL_VALUE_NOT_ALLOWED"),
            ("SELECT * FROM ff_report_usage(repeat('x', 300), '{\"t\": 1}')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT ff_create_budget('b', '{t,u}', '{1}', '{1,1}')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT ff_create_budget('b', '{t}', '{-1}', '{0}')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT ff_create_budget('', '{t}', '{1}', '{0}')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT ff_create_budget(repeat('y', 256), '{t}', '{1}', '{0}')", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT ff_create_budget('b', '{t}', '{1}', '{0}', reset_interval_ms => -1)", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT ff_create_budget('b', '{t}', '{1}', NULL)", "ERRCODE_NULL_VALUE_NOT_ALLOWED"),
            ("SELECT ff_create_quota_policy('q', 0, 1, 1)", "ERRCODE_INVALID_PARAMETER_VALUE"),
            ("SELECT ff_create_quota_policy('q', 60, -1, 1)", "ERRCODE_INVALID_PARAMETER_VALUE"),
        ] {
            assert_fails(sql, code);
        }
        let rows: i64 = one(
            "SELECT (SELECT count(*) FROM ff_budget_policy) + (SELECT count(*) FROM ff_budget_usage)
                  + (SELECT count(*) FROM ff_quota_policy) + (SELECT count(*) FROM ff_budget_usage_dedup)",
        )
        .unwrap();
        assert_eq!(rows, 0);
    }

    #[pg_test]
    fn overflow_is_refused() {
        Spi::run("SELECT ff_create_budget('b', '{t}', '{0}', '{0}')").unwrap();
        Spi::run("SELECT ff_report_usage('b', '{\"t\": 9223372036854775807}')").unwrap();
        assert_fails("SELECT * FROM ff_report_usage('b', '{\"t\": 1}')", "ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE");
    }

    #[pg_test]
    fn quota_policy_is_idempotent() {
        assert_eq!(one::<String>("SELECT ff_create_quota_policy('q', 60, 10, 2)").as_deref(), Some("created"));
        assert_eq!(
            one::<String>("SELECT ff_create_quota_policy('q', 30, 1, 1)").as_deref(),
            Some("already_satisfied")
        );
        let cap: i64 = one("SELECT active_concurrency_cap FROM ff_quota_policy WHERE quota_policy_id = 'q'").unwrap();
        assert_eq!(cap, 2);
    }

    #[pg_test]
    fn a_reserve_that_does_not_fit_does_not_hold_back_one_that_does() {
        Spi::run("SELECT ff_create_budget('b', '{tokens}', '{1000}', '{0}')").unwrap();
        Spi::run("SELECT ff_create_execution('rv', budget_ids => '{b}', budget_reserve => '{\"tokens\": 900}', priority => 10)").unwrap();
        Spi::run("SELECT ff_create_execution('rv', budget_ids => '{b}', budget_reserve => '{\"tokens\": 900}', priority => 5)").unwrap();
        let small: String = one("SELECT ff_create_execution('rv', budget_ids => '{b}', budget_reserve => '{\"tokens\": 50}')").unwrap();
        assert!(one::<String>("SELECT execution_id FROM ff_claim_for_worker('rv', 'w', 'i')").is_some());
        let next: Option<String> = one("SELECT execution_id FROM ff_claim_for_worker('rv', 'w', 'i')");
        assert_eq!(next.as_deref(), Some(small.as_str()), "the 900 does not fit, the 50 does");
    }

    #[pg_test]
    fn record_mode_books_every_report_and_says_so() {
        Spi::run("SELECT ff_create_budget('b', '{tokens}', '{1000}', '{0}', on_hard_limit => 'record')").unwrap();
        let a = leased("{b}");
        let b = leased("{b}");
        assert_eq!(spend(&a, r#"{"tokens": 900}"#, "a1"), "ok|||");
        assert_eq!(spend(&b, r#"{"tokens": 300}"#, "b1"), "hard_breach|tokens|1200|1000");
        // Already past: still booked (the spend happened); admission has stopped.
        assert_eq!(spend(&a, r#"{"tokens": 300}"#, "a2"), "hard_breach|tokens|1500|1000");
        assert_eq!(usage("b", "tokens"), 1500);
        let ledger: i64 = one("SELECT sum(delta_total)::bigint FROM ff_budget_usage_by_exec").unwrap();
        assert_eq!(ledger, 1500);
    }

    #[pg_test]
    fn spend_against_a_missing_budget_is_not_found() {
        Spi::run("SELECT ff_create_budget('b', '{tokens}', '{1000}', '{0}')").unwrap();
        let e = leased("{b}");
        assert_fails(&format!("SELECT * FROM ff_record_spend('nope', '{e}', '{{\"tokens\": 5}}', 'k')"), "ERRCODE_NO_DATA_FOUND");
    }
}

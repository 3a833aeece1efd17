use super::*;

#[pg_schema]
mod tests {
    use super::*;

    const FLOW: &str = "11111111-2222-3333-4444-555555555555";

    /// Creates the flow and `n` member executions on lane `lane`; returns their ids.
    fn flow_with(n: usize, lane: &str) -> Vec<String> {
        Spi::run(&format!("SELECT ff_create_flow('{FLOW}')")).unwrap();
        (0..n)
            .map(|_| {
                let id: String = one(&format!("SELECT ff_create_execution('{lane}', flow_id => '{FLOW}')")).unwrap();
                Spi::run(&format!("SELECT ff_add_execution_to_flow('{FLOW}', '{id}')")).unwrap();
                id
            })
            .collect()
    }

    fn revision() -> i64 {
        one(&format!("SELECT graph_revision FROM ff_flow_core WHERE flow_id = '{FLOW}'")).unwrap()
    }

    fn edge(n: u32) -> String {
        format!("00000000-0000-0000-0000-{n:012}")
    }

    /// Stages and applies edge number `n` from `up` to `down`.
    fn link(n: u32, up: &str, down: &str) {
        let rev = revision();
        Spi::run(&format!("SELECT ff_stage_dependency_edge('{FLOW}', '{}', '{up}', '{down}', {rev})", edge(n))).unwrap();
        Spi::run(&format!("SELECT ff_apply_dependency_to_child('{FLOW}', '{}', '{down}')", edge(n))).unwrap();
    }

    fn public_state(id: &str) -> String {
        one(&format!("SELECT public_state FROM ff_exec_core WHERE execution_id = split_part('{id}', '}}:', 2)::uuid")).unwrap()
    }

    /// Claims `id` (it must be the next claimable on lane `lane`) and finishes it.
    fn run(lane: &str, id: &str, success: bool) {
        let (got, grant): (Option<String>, Option<String>) =
            Spi::get_two(&format!("SELECT execution_id, grant_key FROM ff_claim_for_worker('{lane}', 'w', 'i')")).unwrap();
        assert_eq!(got.as_deref(), Some(id));
        let grant = grant.unwrap();
        if success {
            Spi::run(&format!("SELECT ff_complete_execution('{id}', '{grant}')")).unwrap();
        } else {
            Spi::run(&format!("SELECT ff_fail_execution('{id}', '{grant}', 'boom', false)")).unwrap();
        }
    }

    fn claimable(lane: &str) -> i64 {
        one(&format!(
            "SELECT count(*) FROM ff_exec_core WHERE lane_id = '{lane}' AND lifecycle_phase = 'runnable'
               AND eligibility_state = 'eligible_now'"
        ))
        .unwrap()
    }

    #[pg_test]
    fn create_and_add_bump_the_revision() {
        assert_eq!(one::<String>(&format!("SELECT ff_create_flow('{FLOW}')")).as_deref(), Some("created"));
        assert_eq!(one::<String>(&format!("SELECT ff_create_flow('{FLOW}')")).as_deref(), Some("already_satisfied"));
        let id: String = one(&format!("SELECT ff_create_execution('l', flow_id => '{FLOW}')")).unwrap();
        let added: Option<String> = one(&format!("SELECT result || '/' || node_count FROM ff_add_execution_to_flow('{FLOW}', '{id}')"));
        assert_eq!(added.as_deref(), Some("added/1"));
        let again: Option<String> = one(&format!("SELECT result || '/' || node_count FROM ff_add_execution_to_flow('{FLOW}', '{id}')"));
        assert_eq!(again.as_deref(), Some("already_member/1"));
        assert_eq!(revision(), 1);
        let solo: String = one("SELECT ff_create_execution('zzz-other-lane')").unwrap();
        assert_fails(&format!("SELECT ff_add_execution_to_flow('{FLOW}', '{solo}')"), "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_fails(&format!("SELECT ff_add_execution_to_flow('{}', '{id}')", edge(9)), "ERRCODE_NO_DATA_FOUND");
        assert_fails(
            &format!("SELECT ff_add_execution_to_flow('{FLOW}', '{{fp:1}}:{}')", edge(1)),
            "ERRCODE_NO_DATA_FOUND",
        );
    }

    #[pg_test]
    fn staging_rules() {
        let ids = flow_with(3, "l");
        let rev = revision();
        assert_eq!(rev, 3);
        let stage = |n: u32, up: &str, down: &str, rev: i64| {
            format!("SELECT ff_stage_dependency_edge('{FLOW}', '{}', '{up}', '{down}', {rev})", edge(n))
        };
        assert_fails(&stage(1, &ids[0], &ids[1], 2), "ERRCODE_T_R_SERIALIZATION_FAILURE");
        assert_fails(&stage(1, &ids[0], &ids[0], 3), "ERRCODE_INVALID_PARAMETER_VALUE");
        let outsider: String = one(&format!("SELECT ff_create_execution('l', flow_id => '{FLOW}')")).unwrap();
        assert_fails(&stage(1, &ids[0], &outsider, 3), "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_eq!(one::<i64>(&stage(1, &ids[0], &ids[1], 3)), Some(4));
        assert_fails(&stage(1, &ids[1], &ids[2], 4), "ERRCODE_UNIQUE_VIOLATION");
        assert_eq!(one::<i64>(&stage(2, &ids[1], &ids[2], 4)), Some(5));
        // 2 -> 0 would close 0 -> 1 -> 2 -> 0.
        assert_fails(&stage(3, &ids[2], &ids[0], 5), "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_eq!(one::<i64>(&stage(3, &ids[0], &ids[2], 5)), Some(6));
        let msg_rev = sqlstate_of(&stage(4, &ids[0], &ids[2], 1));
        assert_eq!(msg_rev.as_deref(), Some("ERRCODE_T_R_SERIALIZATION_FAILURE"));
        Spi::run(&format!("SELECT ff_cancel_flow('{FLOW}', 'stop')")).unwrap();
        assert_fails(&stage(5, &ids[0], &ids[2], 6), "ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE");
    }

    #[pg_test]
    fn applied_edge_blocks_the_child_until_satisfied() {
        let ids = flow_with(2, "l");
        link(1, &ids[0], &ids[1]);
        assert_eq!(public_state(&ids[1]), "waiting_children");
        let applied: Option<String> = one(&format!(
            "SELECT result || '/' || unsatisfied_count FROM ff_apply_dependency_to_child('{FLOW}', '{}', '{}')",
            edge(1), ids[1]
        ));
        assert_eq!(applied.as_deref(), Some("already_applied/1"));
        assert_eq!(claimable("l"), 1);
        run("l", &ids[0], true);
        assert_eq!(public_state(&ids[1]), "waiting");
        run("l", &ids[1], true);
    }

    #[pg_test]
    fn diamond_runs_in_order() {
        let v = flow_with(4, "d");
        let (a, b, cc, d) = (&v[0], &v[1], &v[2], &v[3]);
        link(1, a, b);
        link(2, a, cc);
        link(3, b, d);
        link(4, cc, d);
        assert_eq!(claimable("d"), 1);
        run("d", a, true);
        assert_eq!(claimable("d"), 2);
        let (first, grant): (Option<String>, Option<String>) =
            Spi::get_two("SELECT execution_id, grant_key FROM ff_claim_for_worker('d', 'w', 'i')").unwrap();
        Spi::run(&format!("SELECT ff_complete_execution('{}', '{}')", first.unwrap(), grant.unwrap())).unwrap();
        assert_eq!(public_state(d), "waiting_children");
        let (second, grant): (Option<String>, Option<String>) =
            Spi::get_two("SELECT execution_id, grant_key FROM ff_claim_for_worker('d', 'w', 'i')").unwrap();
        Spi::run(&format!("SELECT ff_complete_execution('{}', '{}')", second.unwrap(), grant.unwrap())).unwrap();
        run("d", d, true);
        let undispatched: i64 = one("SELECT count(*) FROM ff_completion_event WHERE dispatched_at_ms IS NULL").unwrap();
        assert_eq!(undispatched, 0);
    }

    #[pg_test]
    fn failed_root_skips_its_whole_all_of_subtree() {
        let v = flow_with(4, "s");
        link(1, &v[0], &v[1]);
        link(2, &v[1], &v[2]);
        link(3, &v[2], &v[3]);
        run("s", &v[0], false);
        for id in &v[1..] {
            assert_eq!(public_state(id), "skipped");
        }
        let events: Option<String> = one("SELECT string_agg(outcome, ',' ORDER BY event_id) FROM ff_completion_event");
        assert_eq!(events.as_deref(), Some("failed,skipped,skipped,skipped"));
    }

    #[pg_test]
    fn any_of_with_cancel_remaining() {
        let v = flow_with(4, "a");
        Spi::run(&format!(
            "SELECT ff_set_edge_group_policy('{FLOW}', '{}', '{{\"kind\":\"any_of\",\"on_satisfied\":\"cancel_remaining\"}}')",
            v[3]
        ))
        .unwrap();
        for (n, up) in v[..3].iter().enumerate() {
            link(n as u32 + 1, up, &v[3]);
        }
        assert_fails(
            &format!("SELECT ff_set_edge_group_policy('{FLOW}', '{}', '{{\"kind\":\"all_of\"}}')", v[3]),
            "ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE",
        );
        run("a", &v[0], true);
        assert_eq!(public_state(&v[3]), "waiting");
        assert_eq!(public_state(&v[1]), "cancelled");
        assert_eq!(public_state(&v[2]), "cancelled");
        run("a", &v[3], true);
    }

    #[pg_test]
    fn quorum_two_of_three_lets_the_third_run() {
        let v = flow_with(4, "q");
        Spi::run(&format!(
            "SELECT ff_set_edge_group_policy('{FLOW}', '{}', '{{\"kind\":\"quorum\",\"k\":2,\"on_satisfied\":\"let_run\"}}')",
            v[3]
        ))
        .unwrap();
        for (n, up) in v[..3].iter().enumerate() {
            link(n as u32 + 1, up, &v[3]);
        }
        run("q", &v[0], false);
        assert_eq!(public_state(&v[3]), "waiting_children");
        run("q", &v[1], true);
        assert_eq!(public_state(&v[3]), "waiting_children");
        run("q", &v[2], true);
        assert_eq!(public_state(&v[3]), "waiting");
        let counts: Option<String> = one("SELECT format('%s/%s/%s/%s', success_count, fail_count, running_count, group_state) FROM ff_edge_group");
        assert_eq!(counts.as_deref(), Some("2/1/0/satisfied"));
    }

    #[pg_test]
    fn quorum_becomes_impossible() {
        let v = flow_with(4, "qi");
        Spi::run(&format!("SELECT ff_set_edge_group_policy('{FLOW}', '{}', '{{\"kind\":\"quorum\",\"k\":2}}')", v[3])).unwrap();
        for (n, up) in v[..3].iter().enumerate() {
            link(n as u32 + 1, up, &v[3]);
        }
        run("qi", &v[0], false);
        run("qi", &v[1], false);
        assert_eq!(public_state(&v[3]), "skipped");
    }

    #[pg_test]
    fn dispatch_is_idempotent() {
        let v = flow_with(2, "i");
        link(1, &v[0], &v[1]);
        // An event inserted by hand (e.g. restored from elsewhere) is dispatched explicitly.
        Spi::run(&format!(
            "UPDATE ff_exec_core SET lifecycle_phase = 'terminal', eligibility_state = 'not_applicable',
                 public_state = 'completed', terminal_outcome = 'success'
             WHERE execution_id = split_part('{}', '}}:', 2)::uuid", v[0]
        ))
        .unwrap();
        let event: i64 = one(&format!(
            "INSERT INTO ff_completion_event (partition_key, execution_id, flow_id, outcome, occurred_at_ms)
             VALUES (0, split_part('{}', '}}:', 2)::uuid, '{FLOW}', 'success', 0) RETURNING event_id", v[0]
        ))
        .unwrap();
        let first: Option<String> = one(&format!("SELECT outcome || '/' || advanced FROM ff_dispatch_completion({event})"));
        assert_eq!(first.as_deref(), Some("advanced/1"));
        let second: Option<String> = one(&format!("SELECT outcome || '/' || advanced FROM ff_dispatch_completion({event})"));
        assert_eq!(second.as_deref(), Some("noop/0"));
        assert_eq!(public_state(&v[1]), "waiting");
        // A duplicate event for the same upstream does not count twice.
        let dup: i64 = one(&format!(
            "INSERT INTO ff_completion_event (partition_key, execution_id, flow_id, outcome, occurred_at_ms)
             VALUES (0, split_part('{}', '}}:', 2)::uuid, '{FLOW}', 'success', 0) RETURNING event_id", v[0]
        ))
        .unwrap();
        let third: Option<String> = one(&format!("SELECT outcome || '/' || advanced FROM ff_dispatch_completion({dup})"));
        assert_eq!(third.as_deref(), Some("advanced/0"));
        let success: i32 = one("SELECT success_count FROM ff_edge_group").unwrap();
        assert_eq!(success, 1);
    }

    #[pg_test]
    fn apply_after_the_upstream_finished_counts_at_once() {
        let v = flow_with(2, "late");
        let rev = revision();
        Spi::run(&format!("SELECT ff_stage_dependency_edge('{FLOW}', '{}', '{}', '{}', {rev})", edge(1), v[0], v[1])).unwrap();
        run("late", &v[0], true);
        Spi::run(&format!("SELECT ff_apply_dependency_to_child('{FLOW}', '{}', '{}')", edge(1), v[1])).unwrap();
        assert_eq!(public_state(&v[1]), "waiting");
    }

    #[pg_test]
    fn cancel_flow_cancels_every_live_member() {
        let v = flow_with(3, "c");
        link(1, &v[0], &v[1]);
        run("c", &v[0], true);
        let n: i32 = one(&format!("SELECT ff_cancel_flow('{FLOW}', 'user request')")).unwrap();
        assert_eq!(n, 2);
        assert_eq!(public_state(&v[0]), "completed");
        assert_eq!(public_state(&v[1]), "cancelled");
        assert_eq!(public_state(&v[2]), "cancelled");
        assert_eq!(one::<i32>(&format!("SELECT ff_cancel_flow('{FLOW}', 'again')")), Some(0));
        assert_fails(&format!("SELECT ff_cancel_flow('{}', 'x')", edge(7)), "ERRCODE_NO_DATA_FOUND");
        let undispatched: i64 = one("SELECT count(*) FROM ff_completion_event WHERE dispatched_at_ms IS NULL").unwrap();
        assert_eq!(undispatched, 0);
    }

    #[pg_test]
    fn bad_flow_input() {
        let v = flow_with(2, "b");
        for (sql, code) in [
            (format!("SELECT ff_set_edge_group_policy('{FLOW}', '{}', '{{\"kind\":\"quorum\",\"k\":0}}')", v[1]), "ERRCODE_INVALID_PARAMETER_VALUE"),
            (format!("SELECT ff_set_edge_group_policy('{FLOW}', '{}', '\"all_of\"')", v[1]), "ERRCODE_INVALID_PARAMETER_VALUE"),
            (format!("SELECT ff_stage_dependency_edge('{FLOW}', NULL, '{}', '{}', 2)", v[0], v[1]), "ERRCODE_NULL_VALUE_NOT_ALLOWED"),
            (format!("SELECT ff_stage_dependency_edge('{FLOW}', '{}', 'nope', '{}', 2)", edge(1), v[1]), "ERRCODE_INVALID_PARAMETER_VALUE"),
            (format!("SELECT ff_apply_dependency_to_child('{FLOW}', '{}', '{}')", edge(1), v[1]), "ERRCODE_NO_DATA_FOUND"),
            ("SELECT ff_create_flow(NULL)".to_string(), "ERRCODE_NULL_VALUE_NOT_ALLOWED"),
            ("SELECT * FROM ff_dispatch_completion(NULL)".to_string(), "ERRCODE_NULL_VALUE_NOT_ALLOWED"),
        ] {
            assert_fails(&sql, code);
        }
        assert_eq!(one::<String>("SELECT outcome FROM ff_dispatch_completion(123456)").as_deref(), Some("noop"));
    }

    fn flow_state() -> String {
        one(&format!("SELECT public_flow_state FROM ff_flow_core WHERE flow_id = '{FLOW}'")).unwrap()
    }

    #[pg_test]
    fn flow_state_follows_its_members() {
        let v = flow_with(2, "fs");
        link(1, &v[0], &v[1]);
        assert_eq!(flow_state(), "open");
        run("fs", &v[0], true);
        assert_eq!(flow_state(), "open");
        run("fs", &v[1], true);
        assert_eq!(flow_state(), "completed");
        let live: i32 = one(&format!("SELECT live_count FROM ff_flow_core WHERE flow_id = '{FLOW}'")).unwrap();
        assert_eq!(live, 0);
    }

    #[pg_test]
    fn a_failed_member_fails_the_flow_once_everything_ended() {
        let v = flow_with(3, "ff");
        link(1, &v[0], &v[1]);
        run("ff", &v[0], false);
        assert_eq!(public_state(&v[1]), "skipped");
        assert_eq!(flow_state(), "open", "v2 still runs");
        run("ff", &v[2], true);
        assert_eq!(flow_state(), "failed");
        let at: Option<i64> = one(&format!("SELECT terminal_at_ms FROM ff_flow_core WHERE flow_id = '{FLOW}'"));
        assert!(at.is_some());
    }

    #[pg_test]
    fn cancelled_flow_state_and_stale_grants() {
        let v = flow_with(2, "cf");
        let (got, grant): (Option<String>, Option<String>) =
            Spi::get_two("SELECT execution_id, grant_key FROM ff_claim_for_worker('cf', 'w', 'i')").unwrap();
        let leased = got.unwrap();
        assert!(v.contains(&leased));
        assert_eq!(one::<i32>(&format!("SELECT ff_cancel_flow('{FLOW}', 'no longer needed')")), Some(2));
        assert_eq!(flow_state(), "cancelled");
        assert_fails(&format!("SELECT ff_complete_execution('{leased}', '{}')", grant.unwrap()), "ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE");
        let reason: Option<String> = one(&format!("SELECT ff_get_execution('{leased}') ->> 'cancellation_reason'"));
        assert_eq!(reason.as_deref(), Some("no longer needed"));
    }

    #[pg_test]
    fn cancel_execution_ends_it_with_its_cascade() {
        let v = flow_with(3, "ce");
        link(1, &v[0], &v[1]);
        link(2, &v[1], &v[2]);
        assert_eq!(one::<String>(&format!("SELECT ff_cancel_execution('{}', 'operator')", v[0])).as_deref(), Some("cancelled"));
        assert_eq!(public_state(&v[0]), "cancelled");
        assert_eq!(public_state(&v[1]), "skipped");
        assert_eq!(public_state(&v[2]), "skipped");
        assert_eq!(one::<String>(&format!("SELECT ff_cancel_execution('{}')", v[0])).as_deref(), Some("already_terminal"));
        // Cancelled and skipped members do not fail a flow; only ff_cancel_flow makes it cancelled.
        assert_eq!(flow_state(), "completed");
        let solo: String = one("SELECT ff_create_execution('ce-solo')").unwrap();
        let (_, grant): (Option<String>, Option<String>) =
            Spi::get_two("SELECT execution_id, grant_key FROM ff_claim_for_worker('ce-solo', 'w', 'i')").unwrap();
        assert_eq!(one::<String>(&format!("SELECT ff_cancel_execution('{solo}')")).as_deref(), Some("cancelled"));
        assert_fails(&format!("SELECT ff_renew_lease('{solo}', '{}', 1000)", grant.unwrap()), "ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE");
        assert_fails("SELECT ff_cancel_execution('{fp:1}:00000000-0000-0000-0000-000000000000')", "ERRCODE_NO_DATA_FOUND");
        assert_fails("SELECT ff_cancel_execution('nope')", "ERRCODE_INVALID_PARAMETER_VALUE");
    }

    #[pg_test]
    fn an_edge_cannot_be_applied_to_an_execution_already_claimed() {
        let v = flow_with(2, "ac");
        let rev = revision();
        Spi::run(&format!("SELECT ff_stage_dependency_edge('{FLOW}', '{}', '{}', '{}', {rev})", edge(1), v[0], v[1])).unwrap();
        Spi::run(&format!("UPDATE ff_exec_core SET priority = 100 WHERE execution_id = split_part('{}', '}}:', 2)::uuid", v[1])).unwrap();
        let (got, _): (Option<String>, Option<String>) =
            Spi::get_two("SELECT execution_id, grant_key FROM ff_claim_for_worker('ac', 'w', 'i')").unwrap();
        assert_eq!(got.as_deref(), Some(v[1].as_str()));
        assert_fails(
            &format!("SELECT ff_apply_dependency_to_child('{FLOW}', '{}', '{}')", edge(1), v[1]),
            "ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE",
        );
    }

    #[pg_test]
    fn staged_edges_keep_a_group_from_firing_early() {
        let v = flow_with(3, "se");
        let rev = revision();
        Spi::run(&format!("SELECT ff_stage_dependency_edge('{FLOW}', '{}', '{}', '{}', {rev})", edge(1), v[0], v[2])).unwrap();
        Spi::run(&format!("SELECT ff_stage_dependency_edge('{FLOW}', '{}', '{}', '{}', {})", edge(2), v[1], v[2], rev + 1)).unwrap();
        run("se", &v[0], true);
        // The first edge is applied after its upstream finished: it counts at
        // once, but the second edge is staged, so the group waits for it.
        Spi::run(&format!("SELECT ff_apply_dependency_to_child('{FLOW}', '{}', '{}')", edge(1), v[2])).unwrap();
        assert_eq!(public_state(&v[2]), "waiting_children");
        Spi::run(&format!("SELECT ff_apply_dependency_to_child('{FLOW}', '{}', '{}')", edge(2), v[2])).unwrap();
        assert_eq!(public_state(&v[2]), "waiting_children");
        run("se", &v[1], true);
        assert_eq!(public_state(&v[2]), "waiting");
    }
}

use super::*;

#[pg_schema]
mod tests {
    use super::*;

    fn submit(spec: &str) -> pgrx::JsonB {
        one(&format!("SELECT ff_submit_flow($${spec}$$)")).unwrap()
    }

    fn state_of(id: &str) -> String {
        one(&format!("SELECT ff_get_execution('{id}') ->> 'public_state'")).unwrap()
    }

    /// Claims the next execution of `lane`; returns (id, grant).
    fn claim(lane: &str) -> Option<(String, String)> {
        let row: Option<String> =
            one(&format!("SELECT execution_id || ' ' || grant_key FROM ff_claim_for_worker('{lane}', 'w', 'i')"));
        row.map(|r| {
            let (a, b) = r.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
    }

    const SPEC: &str = r#"{"flow_id": "0d5c3a52-9c1e-4b0e-8e4b-1e2a3b4c5d6e", "namespace": "docs",
        "nodes": [{"name": "fetch", "lane": "sf", "payload": {"url": "x", "n": 1180591620717411303424}},
                  {"name": "parse", "lane": "sf", "priority": 5},
                  {"name": "index", "lane": "sf"},
                  {"name": "join", "lane": "sf", "policy": {"kind": "quorum", "k": 2, "on_satisfied": "let_run"}}],
        "edges": [{"from": "fetch", "to": "parse"}, {"from": "fetch", "to": "index"},
                  {"from": "parse", "to": "join"}, {"from": "index", "to": "join"}]}"#;

    #[pg_test]
    fn submit_flow_builds_everything_in_one_call() {
        let answer = submit(SPEC).0;
        assert_eq!(answer["flow_id"], "0d5c3a52-9c1e-4b0e-8e4b-1e2a3b4c5d6e");
        assert_eq!(answer["graph_revision"], 8);
        let ids = answer["executions"].as_object().unwrap();
        assert_eq!(ids.len(), 4);
        let id = |n: &str| ids[n].as_str().unwrap().to_string();
        assert_eq!(state_of(&id("fetch")), "waiting");
        assert_eq!(state_of(&id("parse")), "waiting_children");
        let exact: bool = one(&format!(
            "SELECT ff_get_execution('{}') -> 'payload' = '{{\"url\": \"x\", \"n\": 1180591620717411303424}}'::jsonb",
            id("fetch")
        ))
        .unwrap();
        assert!(exact);
        let name: Option<String> = one(&format!("SELECT ff_get_execution('{}') ->> 'node_name'", id("join")));
        assert_eq!(name.as_deref(), Some("join"));
        // Same spec again: the same answer; another spec under that id: 23505.
        assert_eq!(submit(SPEC).0, answer);
        assert_fails(&format!("SELECT ff_submit_flow($${}$$)", SPEC.replace("\"docs\"", "\"other\"")), "ERRCODE_UNIQUE_VIOLATION");
        // Run it: fetch, then parse and index; results flow to the join.
        let (f, g) = claim("sf").unwrap();
        assert_eq!(f, id("fetch"));
        Spi::run(&format!("SELECT ff_complete_execution('{f}', '{g}', '{{\"pages\": 3}}')")).unwrap();
        for _ in 0..2 {
            let (e, g) = claim("sf").unwrap();
            Spi::run(&format!("SELECT ff_complete_execution('{e}', '{g}', jsonb_build_object('from', '{e}'))")).unwrap();
        }
        let inputs: pgrx::JsonB = one(&format!("SELECT ff_get_inputs('{}')", id("join"))).unwrap();
        assert_eq!(inputs.0.as_object().unwrap().len(), 2);
        assert_eq!(inputs.0["parse"]["from"], id("parse"));
        let parse_inputs: pgrx::JsonB = one(&format!("SELECT ff_get_inputs('{}')", id("parse"))).unwrap();
        assert_eq!(parse_inputs.0, serde_json::json!({"fetch": {"pages": 3}}));
        let (j, g) = claim("sf").unwrap();
        assert_eq!(j, id("join"));
        Spi::run(&format!("SELECT ff_complete_execution('{j}', '{g}')")).unwrap();
        let flow: pgrx::JsonB = one("SELECT ff_get_flow('0d5c3a52-9c1e-4b0e-8e4b-1e2a3b4c5d6e')").unwrap();
        assert_eq!(flow.0["state"], "completed");
        assert_eq!(flow.0["counts"]["completed"], 4);
        assert_eq!(flow.0["nodes"].as_array().unwrap().len(), 4);
    }

    #[pg_test]
    fn a_submitted_flow_grows_with_the_incremental_api() {
        let answer = submit(SPEC).0;
        let flow = "0d5c3a52-9c1e-4b0e-8e4b-1e2a3b4c5d6e";
        let fetch = answer["executions"]["fetch"].as_str().unwrap().to_string();
        let extra: String = one(&format!("SELECT ff_create_execution('sf', flow_id => '{flow}')")).unwrap();
        Spi::run(&format!("SELECT ff_add_execution_to_flow('{flow}', '{extra}')")).unwrap();
        let rev: i64 = one(&format!(
            "SELECT ff_stage_dependency_edge('{flow}', gen_random_uuid(), '{fetch}', '{extra}', {})",
            answer["graph_revision"].as_i64().unwrap() + 1
        ))
        .unwrap();
        assert_eq!(rev, 10);
        let edge: String = one(&format!("SELECT edge_id::text FROM ff_edge WHERE flow_id = '{flow}' AND downstream_eid = split_part('{extra}', '}}:', 2)::uuid")).unwrap();
        Spi::run(&format!("SELECT ff_apply_dependency_to_child('{flow}', '{edge}', '{extra}')")).unwrap();
        assert_eq!(state_of(&extra), "waiting_children");
        let (f, g) = claim("sf").unwrap();
        assert_eq!(f, fetch);
        Spi::run(&format!("SELECT ff_complete_execution('{f}', '{g}')")).unwrap();
        assert_eq!(state_of(&extra), "waiting");
    }

    #[pg_test]
    fn bad_specs_are_refused_and_write_nothing() {
        for bad in [
            r#"[]"#,
            r#"{"nodes": {}}"#,
            r#"{"nodes": [{"name": "a"}]}"#,
            r#"{"nodes": [{"name": "a", "lane": "l"}, {"name": "a", "lane": "l"}]}"#,
            r#"{"nodes": [{"name": "a", "lane": "l"}], "edges": [{"from": "a", "to": "b"}]}"#,
            r#"{"nodes": [{"name": "a", "lane": "l"}, {"name": "b", "lane": "l"}], "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "a"}]}"#,
            r#"{"nodes": [{"name": "a", "lane": "l"}], "edges": [{"from": "a", "to": "a"}]}"#,
            r#"{"nodes": [{"name": "a", "lane": "l", "policy": {"kind": "quorum", "k": 0}}]}"#,
            r#"{"nodes": [{"name": "a", "lane": "l", "colour": "red"}]}"#,
            r#"{"nodes": [{"name": "a", "lane": "l", "max_attempts": 0}]}"#,
            r#"{"flow_id": "not-a-uuid", "nodes": []}"#,
        ] {
            assert_fails(&format!("SELECT ff_submit_flow($${bad}$$)"), "ERRCODE_INVALID_PARAMETER_VALUE");
        }
        assert_fails(r#"SELECT ff_submit_flow('{"nodes": [{"name": "a", "lane": "l", "budget_ids": ["nope"]}]}')"#, "ERRCODE_NO_DATA_FOUND");
        let rows: i64 = one("SELECT (SELECT count(*) FROM ff_flow_core) + (SELECT count(*) FROM ff_exec_core)").unwrap();
        assert_eq!(rows, 0);
    }

    #[pg_test]
    fn unnamed_nodes_are_listed_by_id() {
        let answer = submit(r#"{"nodes": [{"lane": "u"}, {"name": "b", "lane": "u"}]}"#).0;
        assert_eq!(answer["executions"].as_object().unwrap().len(), 1);
        assert_eq!(answer["execution_ids"].as_array().unwrap().len(), 2);
    }

    #[pg_test]
    fn paused_lanes_are_not_claimed() {
        Spi::run("SELECT ff_create_execution('p')").unwrap();
        assert_eq!(one::<String>("SELECT ff_pause_lane('p')").as_deref(), Some("paused"));
        assert_eq!(one::<String>("SELECT ff_pause_lane('p')").as_deref(), Some("already_paused"));
        assert!(claim("p").is_none());
        let batch: i64 = one("SELECT count(*) FROM ff_claim_batch('{p}', 'w', 'i')").unwrap();
        assert_eq!(batch, 0);
        assert_eq!(one::<String>("SELECT ff_resume_lane('p')").as_deref(), Some("resumed"));
        assert_eq!(one::<String>("SELECT ff_resume_lane('p')").as_deref(), Some("not_paused"));
        assert!(claim("p").is_some());
    }

    #[pg_test]
    fn listing_pages_through_in_creation_order() {
        Spi::run("SELECT ff_create_execution('list', payload => jsonb_build_object('i', i)) FROM generate_series(1, 25) i").unwrap();
        Spi::run("SELECT ff_create_execution('other') FROM generate_series(1, 5)").unwrap();
        let mut seen = Vec::new();
        let mut after = "NULL".to_string();
        loop {
            let page: Vec<String> = Spi::connect(|c| {
                c.select(&format!("SELECT j ->> 'execution_id' FROM ff_list_executions('list', after_execution_id => {after}, max_count => 10) j"), None, &[])
                    .unwrap()
                    .map(|r| r.get::<String>(1).unwrap().unwrap())
                    .collect()
            });
            if page.is_empty() {
                break;
            }
            after = format!("'{}'", page.last().unwrap());
            seen.extend(page);
        }
        assert_eq!(seen.len(), 25);
        let first: i64 = one(&format!("SELECT (ff_get_execution('{}') -> 'payload' ->> 'i')::bigint", seen[0])).unwrap();
        assert_eq!(first, 1);
        assert_fails("SELECT * FROM ff_list_executions(public_state => 'sleeping')", "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_fails("SELECT * FROM ff_list_executions(max_count => 0)", "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_fails("SELECT * FROM ff_list_executions(after_execution_id => '{fp:1}:00000000-0000-0000-0000-000000000000')", "ERRCODE_NO_DATA_FOUND");
        let waiting: i64 = one("SELECT count(*) FROM ff_list_executions(public_state => 'waiting', max_count => 1000)").unwrap();
        assert_eq!(waiting, 30);
    }

    #[pg_test]
    fn dead_letters_and_retry() {
        let id: String = one("SELECT ff_create_execution('dl', max_attempts => 2)").unwrap();
        let (_, g) = claim("dl").unwrap();
        Spi::run(&format!("SELECT ff_fail_execution('{id}', '{g}', 'bad input', false)")).unwrap();
        let err: Option<String> = one(&format!("SELECT last_error FROM ff_dead_letters WHERE execution_id = '{id}'"));
        assert_eq!(err.as_deref(), Some("bad input"));
        assert_eq!(one::<String>(&format!("SELECT ff_retry_execution('{id}')")).as_deref(), Some("requeued"));
        assert_eq!(one::<String>(&format!("SELECT ff_retry_execution('{id}')")).as_deref(), Some("already_live"));
        let gone: i64 = one("SELECT count(*) FROM ff_dead_letters").unwrap();
        assert_eq!(gone, 0);
        // Two fresh attempts after the reset; the attempt numbers go on.
        let (_, g) = claim("dl").unwrap();
        assert_eq!(one::<String>(&format!("SELECT ff_fail_execution('{id}', '{g}', 'again')")).as_deref(), Some("retry_scheduled"));
        let attempt: Option<String> = one(&format!("SELECT ff_get_execution('{id}') ->> 'attempt_index'"));
        assert_eq!(attempt.as_deref(), Some("2"));
    }

    #[pg_test]
    fn unique_keys_return_the_live_execution() {
        let a: String = one("SELECT ff_create_execution('uk', unique_key => 'report-42')").unwrap();
        let b: String = one("SELECT ff_create_execution('uk', unique_key => 'report-42')").unwrap();
        assert_eq!(a, b);
        let other_lane: String = one("SELECT ff_create_execution('uk2', unique_key => 'report-42')").unwrap();
        assert_ne!(a, other_lane);
        let (_, g) = claim("uk").unwrap();
        Spi::run(&format!("SELECT ff_complete_execution('{a}', '{g}')")).unwrap();
        let c: String = one("SELECT ff_create_execution('uk', unique_key => 'report-42')").unwrap();
        assert_ne!(a, c, "a finished execution frees its key");
        let batch: Vec<String> = one::<Vec<String>>("SELECT ff_create_executions('ukb', ARRAY['{}'::jsonb, '{}'], unique_key => 'k')").unwrap();
        assert_eq!(batch[0], batch[1]);
    }

    #[pg_test]
    fn batch_create_and_claim() {
        let ids: Vec<String> =
            one("SELECT ff_create_executions('b', ARRAY['{\"n\": 1}', '{\"n\": 2}', NULL, '{\"n\": 4}']::jsonb[])").unwrap();
        assert_eq!(ids.len(), 4);
        Spi::run("SELECT ff_create_execution('b2', payload => '{\"first\": true}')").unwrap();
        let rows: Vec<(String, String, i32)> = Spi::connect(|c| {
            c.select("SELECT execution_id, lane_id, attempt FROM ff_claim_batch('{b2,b}', 'w', 'i', max_count => 3)", None, &[])
                .unwrap()
                .map(|r| (r.get(1).unwrap().unwrap(), r.get(2).unwrap().unwrap(), r.get(3).unwrap().unwrap()))
                .collect()
        });
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].1, "b2", "lanes are tried in the order given");
        assert_eq!(rows[1].0, ids[0]);
        assert!(rows.iter().all(|r| r.2 == 1));
        let payload: Option<String> = one("SELECT payload::text FROM ff_claim_batch('{b}', 'w', 'i', max_count => 1)");
        assert_eq!(payload, None, "the NULL payload");
        assert_fails("SELECT * FROM ff_claim_batch('{b}', 'w', 'i', max_count => 0)", "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_fails("SELECT ff_create_executions('b', ARRAY['{}'::jsonb], budget_ids => '{nope}')", "ERRCODE_NO_DATA_FOUND");
    }

    #[pg_test]
    fn metrics_count_per_lane() {
        Spi::run("SELECT ff_create_execution('m') FROM generate_series(1, 3)").unwrap();
        let (e, g) = claim("m").unwrap();
        Spi::run(&format!("SELECT ff_complete_execution('{e}', '{g}')")).unwrap();
        let (e, g) = claim("m").unwrap();
        Spi::run(&format!("SELECT ff_fail_execution('{e}', '{g}', 'x', false)")).unwrap();
        let m: String = one(
            "SELECT string_agg(metric || '=' || value, ',' ORDER BY metric) FROM ff_metrics
             WHERE scope = 'lane' AND name = 'm' AND value > 0",
        )
        .unwrap();
        assert_eq!(m, "claimed=2,completed=1,created=3,failed=1");
        Spi::run("SET LOCAL flowfabric.metrics = off").unwrap();
        Spi::run("SELECT ff_create_execution('m')").unwrap();
        let created: i64 = one("SELECT value FROM ff_metrics WHERE scope = 'lane' AND name = 'm' AND metric = 'created'").unwrap();
        assert_eq!(created, 3);
        Spi::run("RESET flowfabric.metrics").unwrap();
        Spi::run("SELECT ff_run_reconcilers()").unwrap();
        let promoted: Option<i64> = one("SELECT value FROM ff_metrics WHERE scope = 'reconciler' AND name = 'lease_expiry'");
        assert_eq!(promoted, None, "nothing to count yet");
    }

    #[pg_test]
    fn schedules_create_one_execution_per_due_time() {
        assert_eq!(one::<String>("SELECT ff_create_schedule('tick', '* * * * * *', 'sched', '{\"job\": 1}')").as_deref(), Some("created"));
        assert_eq!(one::<String>("SELECT ff_create_schedule('tick', '* * * * * *', 'sched', '{\"job\": 1}')").as_deref(), Some("already_satisfied"));
        assert_eq!(one::<String>("SELECT ff_create_schedule('tick', '*/2 * * * * *', 'sched', '{\"job\": 1}')").as_deref(), Some("updated"));
        // Pretend the reconcilers were away for a while: 5 due times missed.
        Spi::run("UPDATE ff_schedule SET cron = '* * * * * *', next_due_at_ms = (extract(epoch FROM clock_timestamp()) * 1000)::bigint / 1000 * 1000 - 4000").unwrap();
        let r: pgrx::JsonB = one("SELECT ff_run_reconcilers()").unwrap();
        assert!(r.0["schedules"]["created"].as_i64().unwrap() >= 5, "{}", r.0);
        let made: i64 = one("SELECT count(*) FROM ff_exec_core WHERE lane_id = 'sched'").unwrap();
        let distinct: i64 = one("SELECT count(DISTINCT unique_key) FROM ff_exec_core WHERE lane_id = 'sched'").unwrap();
        assert_eq!(made, distinct);
        // A second pass creates only what fell due since (a new second may
        // have begun on a slow machine), never a due time again.
        let again: pgrx::JsonB = one("SELECT ff_run_reconcilers()").unwrap();
        let more = again.0["schedules"]["created"].as_i64().unwrap();
        assert!(more <= 2, "{}", again.0);
        let made_now: i64 = one("SELECT count(*) FROM ff_exec_core WHERE lane_id = 'sched'").unwrap();
        let distinct_now: i64 = one("SELECT count(DISTINCT unique_key) FROM ff_exec_core WHERE lane_id = 'sched'").unwrap();
        assert_eq!((made_now, distinct_now), (made + more, made + more), "nothing is due twice");
        Spi::run("SET LOCAL flowfabric.schedule_catchup = 2").unwrap();
        Spi::run("UPDATE ff_schedule SET next_due_at_ms = next_due_at_ms - 60000").unwrap();
        let capped: pgrx::JsonB = one("SELECT ff_run_reconcilers()").unwrap();
        assert_eq!(capped.0["schedules"]["created"], 2, "{}", capped.0);
        assert!(capped.0["schedules"]["missed"].as_i64().unwrap() >= 58);
        for bad in ["* * *", "61 * * * *", "* * * * * * *"] {
            assert_fails(&format!("SELECT ff_create_schedule('bad', '{bad}', 'l')"), "ERRCODE_INVALID_PARAMETER_VALUE");
        }
        assert_fails("SELECT ff_create_schedule('b', '* * * * *', 'l', budget_ids => '{nope}')", "ERRCODE_NO_DATA_FOUND");
        assert_eq!(one::<String>("SELECT ff_drop_schedule('tick')").as_deref(), Some("dropped"));
        assert_eq!(one::<String>("SELECT ff_drop_schedule('tick')").as_deref(), Some("not_found"));
    }
}

use super::*;

#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn payloads_pass_through_whatever_their_depth_or_size() {
        let deep = format!("{}1{}", "[".repeat(2000), "]".repeat(2000));
        let id: String = one(&format!("SELECT ff_create_execution('j', payload => '{deep}')")).unwrap();
        let same: bool = one(&format!(
            "SELECT payload = '{deep}'::jsonb FROM ff_exec_core WHERE execution_id = split_part('{id}', '}}:', 2)::uuid"
        ))
        .unwrap();
        assert!(same);
        let big: String = one("SELECT ff_create_execution('j', payload => jsonb_build_object('blob', repeat('x', 5000000)))").unwrap();
        let len: i32 = one(&format!("SELECT length(ff_get_execution('{big}') -> 'payload' ->> 'blob')")).unwrap();
        assert_eq!(len, 5_000_000);
    }

    #[pg_test]
    fn deeply_nested_dimensions_are_a_clear_error() {
        let deep = format!("{{\"a\": {}1{}}}", "[".repeat(500), "]".repeat(500));
        assert_fails(&format!("SELECT * FROM ff_report_usage('b', '{deep}')"), "ERRCODE_INVALID_PARAMETER_VALUE");
        let policy = format!("{{\"kind\": {}1{}}}", "[".repeat(500), "]".repeat(500));
        assert_fails(
            &format!("SELECT ff_set_edge_group_policy(gen_random_uuid(), '{{fp:1}}:00000000-0000-0000-0000-000000000000', '{policy}')"),
            "ERRCODE_INVALID_PARAMETER_VALUE",
        );
    }

    #[pg_test]
    fn get_execution_returns_payload_and_result_exactly_as_stored() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let tricky = r#"{"huge": 1180591620717411303424, "tenth": 0.30000000000000000001, "tiny": 1e-400, "big": 1e400, "deep": DEEP}"#
            .replace("DEEP", &deep);
        let id: String = one(&format!("SELECT ff_create_execution('j', payload => '{tricky}')")).unwrap();
        let same: bool = one(&format!("SELECT ff_get_execution('{id}') -> 'payload' = '{tricky}'::jsonb")).unwrap();
        assert!(same, "payload changed on the way out");
        let text: String = one(&format!("SELECT (ff_get_execution('{id}') -> 'payload' ->> 'tenth')")).unwrap();
        assert_eq!(text, "0.30000000000000000001");
        let (got, grant): (Option<String>, Option<String>) =
            Spi::get_two("SELECT execution_id, grant_key FROM ff_claim_for_worker('j', 'w', 'i')").unwrap();
        assert_eq!(got.as_deref(), Some(id.as_str()));
        Spi::run(&format!("SELECT ff_complete_execution('{id}', '{}', '{tricky}')", grant.unwrap())).unwrap();
        let same: bool = one(&format!("SELECT ff_get_execution('{id}') -> 'result' = '{tricky}'::jsonb")).unwrap();
        assert!(same, "result changed on the way out");
    }
}

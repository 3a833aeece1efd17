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
}

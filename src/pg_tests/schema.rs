use super::*;

#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn create_extension_makes_every_engine_table() {
        for table in [
            "ff_partition_config", "ff_waitpoint_hmac", "ff_exec_core", "ff_attempt", "ff_claim_grant",
            "ff_flow_core", "ff_edge", "ff_edge_group", "ff_completion_event", "ff_budget_policy",
            "ff_budget_usage", "ff_budget_usage_dedup", "ff_budget_usage_by_exec", "ff_quota_policy",
            "ff_quota_window", "ff_quota_admitted",
        ] {
            let n: i64 = one(&format!(
                "SELECT count(*) FROM pg_class WHERE relname = '{table}' AND relkind IN ('r','p')"
            ))
            .unwrap();
            assert_eq!(n, 1, "table {table} missing");
        }
    }

    #[pg_test]
    fn partition_config_is_seeded_with_flowfabric_defaults() {
        let row: Option<String> = one(
            "SELECT format('%s/%s/%s', num_flow_partitions, num_budget_partitions, num_quota_partitions)
             FROM ff_partition_config",
        );
        assert_eq!(row.as_deref(), Some("256/32/32"));
    }

    #[pg_test]
    fn partition_config_is_fixed_once_data_exists() {
        assert_eq!(sqlstate_of("UPDATE ff_partition_config SET num_budget_partitions = 64"), None);
        Spi::run("UPDATE ff_partition_config SET num_budget_partitions = 32").unwrap();
        Spi::run("SELECT ff_create_budget('b', '{t}', '{10}', '{0}')").unwrap();
        assert_fails("UPDATE ff_partition_config SET num_budget_partitions = 64", "ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE");
        assert_fails("DELETE FROM ff_partition_config", "ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE");
    }

    #[pg_test]
    fn one_random_active_key_is_seeded() {
        let n: i64 = one("SELECT count(*) FROM ff_waitpoint_hmac WHERE active AND length(secret) = 32").unwrap();
        assert_eq!(n, 1);
    }

    #[pg_test]
    fn rotation_retires_the_previous_kid() {
        assert_eq!(one::<String>("SELECT ff_rotate_hmac_secret('k2')").as_deref(), Some("k2"));
        let active: Option<String> = one("SELECT kid FROM ff_waitpoint_hmac WHERE active");
        assert_eq!(active.as_deref(), Some("k2"));
        let retired: i64 = one("SELECT count(*) FROM ff_waitpoint_hmac WHERE NOT active AND retired_at_ms IS NOT NULL").unwrap();
        assert_eq!(retired, 1);
        assert_fails("SELECT ff_rotate_hmac_secret('k2', '\\x00112233445566778899aabbccddeeff')", "ERRCODE_UNIQUE_VIOLATION");
        assert_fails("SELECT ff_rotate_hmac_secret('bad:kid')", "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_fails("SELECT ff_rotate_hmac_secret('k3', '\\x0011')", "ERRCODE_INVALID_PARAMETER_VALUE");
        assert_fails("SELECT ff_rotate_hmac_secret(NULL)", "ERRCODE_NULL_VALUE_NOT_ALLOWED");
    }
}

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

    #[pg_test]
    fn everything_lives_in_the_flowfabric_schema() {
        let elsewhere: i64 = one(
            "SELECT count(*) FROM pg_depend d
             JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'flowfabric'
             LEFT JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
             LEFT JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
             WHERE d.deptype = 'e'
               AND coalesce(c.relnamespace, p.pronamespace) <> 'flowfabric'::regnamespace
               -- the #[pg_test] functions themselves, in this test build only
               AND coalesce(c.relnamespace, p.pronamespace) <> 'tests'::regnamespace",
        )
        .unwrap();
        assert_eq!(elsewhere, 0);
        let owner_only: bool = one(
            "SELECT NOT EXISTS (SELECT FROM pg_namespace n, aclexplode(n.nspacl) a
                                WHERE n.nspname = 'flowfabric' AND a.privilege_type = 'CREATE'
                                  AND a.grantee <> n.nspowner)",
        )
        .unwrap();
        assert!(owner_only);
    }

    #[pg_test]
    fn explicit_secrets_are_for_superusers_only() {
        Spi::run("CREATE ROLE ff_rotating_admin NOLOGIN IN ROLE flowfabric_admin").unwrap();
        Spi::run("SET LOCAL ROLE ff_rotating_admin").unwrap();
        assert_fails(
            "SELECT ff_rotate_hmac_secret('chosen', '\\x00112233445566778899aabbccddeeff')",
            "ERRCODE_INSUFFICIENT_PRIVILEGE",
        );
        assert_eq!(one::<String>("SELECT ff_rotate_hmac_secret('random-one')").as_deref(), Some("random-one"));
        Spi::run("RESET ROLE").unwrap();
        assert_eq!(
            one::<String>("SELECT ff_rotate_hmac_secret('chosen', '\\x00112233445566778899aabbccddeeff')").as_deref(),
            Some("chosen")
        );
    }
}

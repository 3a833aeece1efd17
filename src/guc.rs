//! Server settings (GUCs), all under the `flowfabric.` prefix.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

/// How long a retired HMAC kid keeps verifying grants.
pub static KEY_GRACE_MS: GucSetting<i32> = GucSetting::<i32>::new(86_400_000);

pub fn key_grace_ms() -> i64 {
    i64::from(KEY_GRACE_MS.get())
}

pub fn register() {
    GucRegistry::define_int_guc(
        c"flowfabric.key_grace_ms",
        c"How long a retired HMAC key id keeps verifying claim grants, in milliseconds.",
        c"After rotation the previous kid verifies until retired_at_ms + this; then grants signed with it answer unknown_kid.",
        &KEY_GRACE_MS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
}

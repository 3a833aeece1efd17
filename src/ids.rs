//! Identifiers and partitions, FlowFabric-compatible: CRC-16/XMODEM slotting,
//! `{fp:N}` / `{b:N}` / `{q:N}` hash tags and the `{fp:N}:<uuid>` execution id.

use crate::error::{FfError, FfResult};
use crc::{Crc, CRC_16_XMODEM};
use std::fmt;
use uuid::Uuid;

const CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_XMODEM);

/// Longest text id (budget, quota policy, lane, worker) accepted, in bytes.
pub const MAX_ID_BYTES: usize = 255;

/// CRC-16/XMODEM (poly 0x1021, init 0): the Redis Cluster slot hash.
pub fn crc16(bytes: &[u8]) -> u16 {
    CRC16.checksum(bytes)
}

/// Logical slot of an id among `count` partitions.
pub fn partition_of(bytes: &[u8], count: i32) -> i16 {
    // count is 1..=32767 (checked by the config table), so the slot fits i16.
    (crc16(bytes) as i32 % count.max(1)) as i16
}

// Slots are `crc16(id) % N`; the N's live in `ff_partition_config` and the
// modulo is taken inside the INSERT that stores the slot, so no call reads
// the config table separately.

/// `{fp:N}`: the hash tag of a flow partition (shared by its executions).
pub fn flow_tag(partition: i16) -> String {
    format!("{{fp:{partition}}}")
}

/// An execution id: its flow partition and uuid, written `{fp:N}:<uuid>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExecutionId {
    pub partition: i16,
    pub uuid: Uuid,
}

impl ExecutionId {
    /// Parses `{fp:N}:<uuid>` strictly: N is a decimal slot, the uuid is in
    /// hyphenated form. Anything else is a 22023 error naming the value.
    pub fn parse(text: &str) -> FfResult<Self> {
        let bad = |why: &str| {
            FfError::invalid(format!("malformed execution id \"{}\": {why}", clip(text)))
                .with_detail("expected the form {fp:N}:<uuid>")
        };
        let rest = text.strip_prefix("{fp:").ok_or_else(|| bad("missing {fp: prefix"))?;
        let (slot, uuid) = rest.split_once("}:").ok_or_else(|| bad("missing }: after the slot"))?;
        let partition = parse_slot(slot).ok_or_else(|| bad("slot is not a number from 0 to 32767"))?;
        let uuid = parse_uuid(uuid).ok_or_else(|| bad("not a hyphenated uuid"))?;
        Ok(ExecutionId { partition, uuid })
    }

    pub fn tag(&self) -> String {
        flow_tag(self.partition)
    }
}

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{fp:{}}}:{}", self.partition, self.uuid.as_hyphenated())
    }
}

fn parse_slot(s: &str) -> Option<i16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<i16>().ok()
}

/// Accepts only the 36-character hyphenated form, either case.
pub fn parse_uuid(s: &str) -> Option<Uuid> {
    if s.len() != 36 {
        return None;
    }
    Uuid::try_parse(s).ok()
}

/// Checks a caller-supplied text id: non-empty, at most `MAX_ID_BYTES`, no
/// control characters.
pub fn check_text_id<'a>(kind: &str, value: &'a str) -> FfResult<&'a str> {
    if value.is_empty() {
        return Err(FfError::invalid(format!("{kind} must not be empty")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(FfError::invalid(format!(
            "{kind} \"{}\" is {} bytes long; the limit is {MAX_ID_BYTES}",
            clip(value),
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(FfError::invalid(format!("{kind} \"{}\" contains a control character", clip(value))));
    }
    Ok(value)
}

/// Shortens a value quoted in an error message so hostile input cannot
/// flood the log.
pub fn clip(value: &str) -> String {
    const MAX: usize = 80;
    if value.len() <= MAX {
        return value.to_string();
    }
    let mut end = MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &value[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_xmodem_check_value() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn flowfabric_vectors() {
        let u = Uuid::parse_str("550e8400-e29b-41d4-a716-446655440000").unwrap();
        assert_eq!(crc16(u.as_bytes()), 36888);
        assert_eq!(partition_of(u.as_bytes(), 256), 24);
        assert_eq!(partition_of(u.as_bytes(), 32), 24);
        assert_eq!(partition_of(b"workers-a", 256), 193);
        assert_eq!(partition_of(b"default", 256), 86);
    }

    #[test]
    fn execution_id_round_trip() {
        let id = ExecutionId::parse("{fp:24}:550E8400-e29b-41d4-a716-446655440000").unwrap();
        assert_eq!(id.partition, 24);
        assert_eq!(id.to_string(), "{fp:24}:550e8400-e29b-41d4-a716-446655440000");
    }

    #[test]
    fn execution_id_rejects_malformed() {
        for bad in [
            "",
            "550e8400-e29b-41d4-a716-446655440000",
            "{fp:}:550e8400-e29b-41d4-a716-446655440000",
            "{fp:-1}:550e8400-e29b-41d4-a716-446655440000",
            "{fp:99999}:550e8400-e29b-41d4-a716-446655440000",
            "{b:1}:550e8400-e29b-41d4-a716-446655440000",
            "{fp:1}550e8400-e29b-41d4-a716-446655440000",
            "{fp:1}:550e8400e29b41d4a716446655440000",
            "{fp:1}:not-a-uuid",
        ] {
            let err = ExecutionId::parse(bad).unwrap_err();
            assert_eq!(err.code, pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "{bad}");
        }
    }

    #[test]
    fn text_id_limits() {
        assert!(check_text_id("budget_id", "b-1").is_ok());
        assert!(check_text_id("budget_id", "").is_err());
        assert!(check_text_id("budget_id", &"x".repeat(256)).is_err());
        assert!(check_text_id("budget_id", "a\nb").is_err());
        assert_eq!(clip(&"é".repeat(100)).len(), 80 + 3);
    }
}

//! The claim pipeline and leases: pick, admit, sign, lease; then renew,
//! complete or fail under the grant (fencing).

use crate::budget::{self, LockWait, Refusal};
use crate::crypto::{grant_id, parse_grant_key, signature_matches, Grant};
use crate::db::{attempt, col, col_req, exec, first_row, now_ms, with_spi};
use crate::dispatch;
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::exec::{self, from_pg_uuid, normalize_capabilities, pg_uuid, Ending, LeaseRow, Leased, Outcome, RetryPolicy};
use crate::ids::{check_text_id, clip, ExecutionId};
use crate::jsonb::RawJsonb;
use crate::keystore::{no_signing_key, verification_secret, KidRefusal};
use crate::quota;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::collections::BTreeMap;

pub const MAX_TTL_MS: i64 = 86_400_000;
/// Candidates refused by budget or quota that one claim looks past before
/// giving up (each refusal also excludes every row sharing that budget or quota).
pub const MAX_REFUSALS: usize = 64;
/// Most executions one `ff_claim_batch` call may lease, and most lanes.
pub const MAX_CLAIM_BATCH: i32 = 1000;
pub const MAX_LANES: usize = 64;

/// Validated worker identity and what it asks for.
pub struct ClaimRequest {
    pub lanes: Vec<String>,
    pub worker_id: String,
    pub worker_instance_id: String,
    pub capabilities: Vec<String>,
    pub grant_ttl_ms: i64,
    pub max_count: usize,
}

impl ClaimRequest {
    fn validate(
        lanes: Vec<String>,
        worker_id: Option<String>,
        worker_instance_id: Option<String>,
        capabilities: Option<Vec<Option<String>>>,
        grant_ttl_ms: Option<i64>,
        max_count: i32,
    ) -> FfResult<ClaimRequest> {
        for lane in &lanes {
            check_text_id("lane_id", lane)?;
        }
        if lanes.len() > MAX_LANES {
            return Err(FfError::invalid(format!("{} lanes given; the limit is {MAX_LANES}", lanes.len())));
        }
        if !(1..=MAX_CLAIM_BATCH).contains(&max_count) {
            return Err(FfError::invalid(format!("max_count must be between 1 and {MAX_CLAIM_BATCH}, got {max_count}")));
        }
        let r = ClaimRequest {
            lanes,
            worker_id: check_text_id("worker_id", &required(worker_id, "worker_id")?)?.to_string(),
            worker_instance_id: check_text_id("worker_instance_id", &required(worker_instance_id, "worker_instance_id")?)?
                .to_string(),
            capabilities: normalize_capabilities("capabilities", &required(capabilities, "capabilities")?)?,
            grant_ttl_ms: check_ttl("grant_ttl_ms", required(grant_ttl_ms, "grant_ttl_ms")?)?,
            max_count: max_count as usize,
        };
        if r.worker_id.contains('|') || r.worker_instance_id.contains('|') {
            return Err(FfError::invalid("worker_id and worker_instance_id must not contain '|'"));
        }
        Ok(r)
    }
}

fn check_ttl(name: &str, ttl: i64) -> FfResult<i64> {
    if ttl <= 0 || ttl > MAX_TTL_MS {
        return Err(FfError::invalid(format!("{name} must be between 1 and {MAX_TTL_MS} ms, got {ttl}")));
    }
    Ok(ttl)
}

/// A row the pick locked, with what admission needs to know.
struct Candidate {
    uuid: pgrx::Uuid,
    partition: i16,
    budget_ids: Vec<String>,
    reserve: BTreeMap<String, i64>,
    quota_policy_id: Option<String>,
}

impl Candidate {
    /// Whether admitting it locks shared rows (reservations, quota).
    fn takes_locks(&self) -> bool {
        !self.reserve.is_empty() || self.quota_policy_id.is_some()
    }
}

/// The signing key and the candidates of one pick statement.
struct Picked {
    kid: String,
    secret: Vec<u8>,
    newest_set: i32,
    rows: Vec<Candidate>,
}

/// Rows a claim has refused in this call: everything sharing a refused
/// budget or quota is passed over.
#[derive(Default)]
struct Refusals {
    budgets: Vec<String>,
    quotas: Vec<String>,
    /// Candidates refused on their own (a reserve that does not fit).
    executions: Vec<pgrx::Uuid>,
}

impl Refusals {
    fn len(&self) -> usize {
        self.budgets.len() + self.quotas.len() + self.executions.len()
    }
}

// The best claimable rows of one lane and capability set, skipping rows
// other claimers hold, refused budgets and quotas, and paused lanes; with the
// active signing key in the same statement. (The newest capability set id is
// read only when the pick comes back empty: reading it here would add three
// relations to every claim's locks.)
// The filters are spelled so the planner sees how many rows pass them (an
// `eligible_now` row is always due), which keeps it on the ordered index scan.
const PICK: &str = "SELECT k.kid, k.secret, x.execution_id, x.budget_ids, x.budget_reserve, x.quota_policy_id, x.partition_key
 FROM ff_waitpoint_hmac k LEFT JOIN LATERAL (
     SELECT execution_id, budget_ids, budget_reserve, quota_policy_id, partition_key FROM ff_exec_core
     WHERE lane_id = $1 AND cap_set_id = $2 AND lifecycle_phase = 'runnable'
       AND eligibility_state IN ('eligible_now', 'not_eligible_until_time')
       AND (eligibility_state = 'eligible_now' OR eligible_at_ms <= $3)
       AND NOT (budget_ids && $4)
       AND (quota_policy_id IS NULL OR quota_policy_id <> ALL ($5))
       AND execution_id <> ALL ($7)
       AND NOT EXISTS (SELECT FROM ff_lane l WHERE l.lane_id = $1 AND l.paused)
     ORDER BY priority DESC, created_at_ms, queue_seq
     LIMIT $6 FOR UPDATE SKIP LOCKED) x ON true
 WHERE k.active";

// When a worker satisfies several capability sets: the sets ordered by
// their best claimable row (one index probe per set, no locks), so the pick
// locks rows of the best set first.
const RANK_SETS: &str = "SELECT s.id FROM unnest($2::int[]) AS s(id) CROSS JOIN LATERAL (
     SELECT priority, created_at_ms, queue_seq FROM ff_exec_core
     WHERE lane_id = $1 AND cap_set_id = s.id AND lifecycle_phase = 'runnable'
       AND eligibility_state IN ('eligible_now', 'not_eligible_until_time')
       AND (eligibility_state = 'eligible_now' OR eligible_at_ms <= $3)
       AND NOT (budget_ids && $4)
       AND (quota_policy_id IS NULL OR quota_policy_id <> ALL ($5))
     ORDER BY priority DESC, created_at_ms, queue_seq LIMIT 1) h
 ORDER BY h.priority DESC, h.created_at_ms, h.queue_seq";

#[allow(clippy::too_many_arguments)]
fn pick(c: &mut SpiClient<'_>, lane: &str, set: i32, need: usize, refused: &Refusals, taken: &[pgrx::Uuid], now: i64) -> FfResult<Picked> {
    let t = exec(
        c,
        PICK,
        &[
            lane.into(),
            set.into(),
            now.into(),
            refused.budgets.clone().into(),
            refused.quotas.clone().into(),
            (need as i64).into(),
            taken.to_vec().into(),
        ],
    )?;
    let mut picked: Option<Picked> = None;
    for row in t {
        let p = picked.get_or_insert(Picked {
            kid: row.get(1)?.unwrap_or_default(),
            secret: row.get(2)?.unwrap_or_default(),
            newest_set: 0,
            rows: Vec::new(),
        });
        let Some(uuid) = row.get::<pgrx::Uuid>(3)? else { continue };
        let reserve = match row.get::<RawJsonb>(5)? {
            Some(r) => exec::parse_reserve(&r.to_value("budget_reserve")?)?,
            None => BTreeMap::new(),
        };
        p.rows.push(Candidate {
            uuid,
            partition: row.get(7)?.unwrap_or(0),
            budget_ids: row.get(4)?.unwrap_or_default(),
            reserve,
            quota_policy_id: row.get(6)?,
        });
    }
    let mut picked = picked.ok_or_else(no_signing_key)?;
    if picked.rows.is_empty() {
        picked.newest_set = exec::newest_set(c)?;
    }
    Ok(picked)
}

fn rank_sets(c: &mut SpiClient<'_>, lane: &str, sets: &[i32], refused: &Refusals, now: i64) -> FfResult<Vec<i32>> {
    let t = exec(
        c,
        RANK_SETS,
        &[lane.into(), sets.to_vec().into(), now.into(), refused.budgets.clone().into(), refused.quotas.clone().into()],
    )?;
    Ok(t.filter_map(|r| r.get::<i32>(1).ok().flatten()).collect())
}

/// Admits a candidate under its budgets and quota. Admission that takes
/// locks runs in a subtransaction that is rolled back on refusal, so a
/// refused candidate leaves no lock behind and the next one starts clean.
fn admit(c: &mut SpiClient<'_>, cand: &Candidate, wait: LockWait, refused: &mut Refusals, now: i64) -> FfResult<bool> {
    // Lock order: the quota row, then budget rows.
    let check = |c: &mut SpiClient<'_>| -> FfResult<Result<(), Refused>> {
        if let Some(q) = &cand.quota_policy_id {
            if !quota::admit(c, q, &cand.uuid, wait, now)? {
                return Ok(Err(Refused::Quota(q.clone())));
            }
        }
        if let Err(why) = budget::admit(c, &cand.budget_ids, &cand.reserve, &cand.uuid, wait, now)? {
            return Ok(Err(Refused::Budget(why)));
        }
        Ok(Ok(()))
    };
    let verdict = if cand.takes_locks() { attempt(|| check(c))? } else { check(c)? };
    match verdict {
        Ok(()) => return Ok(true),
        // A budget with no headroom refuses everything naming it.
        Err(Refused::Budget(Refusal::Exhausted(b))) => refused.budgets.push(b),
        // Only this candidate's reserve does not fit: a smaller one may.
        Err(Refused::Budget(Refusal::ReserveTooBig(_))) => refused.executions.push(cand.uuid),
        Err(Refused::Quota(q)) => refused.quotas.push(q),
    }
    Ok(false)
}

enum Refused {
    Budget(Refusal),
    Quota(String),
}

/// The whole claim, inside the caller's transaction: lanes in the order
/// given, up to `max_count` executions, each admitted and leased under its
/// own grant.
pub fn claim(r: &ClaimRequest) -> FfResult<Vec<(Leased, i64)>> {
    with_spi(|c| {
        let now = now_ms();
        let mut admitted: Vec<Candidate> = Vec::new();
        let mut key: Option<(String, Vec<u8>)> = None;
        // Once a claim holds budget or quota locks for one candidate, it
        // never waits for another's (that could close a cycle with a claim
        // taking them in the other order).
        let mut holds_locks = false;
        for lane in &r.lanes {
            let mut refused = Refusals::default();
            let (mut sets, mut seen) = exec::satisfied_sets(c, &r.capabilities, 0)?;
            let mut tried_sets: Vec<i32> = Vec::new();
            while admitted.len() < r.max_count && refused.len() <= MAX_REFUSALS {
                let open: Vec<i32> = sets.iter().copied().filter(|s| !tried_sets.contains(s)).collect();
                let set = match open.as_slice() {
                    [] => break,
                    [only] => *only,
                    _ => match rank_sets(c, lane, &open, &refused, now)?.first() {
                        Some(best) => *best,
                        None => break,
                    },
                };
                let taken: Vec<pgrx::Uuid> =
                    admitted.iter().map(|a| a.uuid).chain(refused.executions.iter().copied()).collect();
                let picked = pick(c, lane, set, r.max_count - admitted.len(), &refused, &taken, now)?;
                key.get_or_insert_with(|| (picked.kid.clone(), picked.secret.clone()));
                if picked.rows.is_empty() && picked.newest_set > seen {
                    // A capability set newer than our cache: refresh once and look again.
                    (sets, seen) = exec::satisfied_sets(c, &r.capabilities, picked.newest_set)?;
                    seen = seen.max(picked.newest_set);
                    continue;
                }
                if picked.rows.is_empty() {
                    tried_sets.push(set);
                    continue;
                }
                for cand in picked.rows {
                    let wait = if holds_locks { LockWait::Skip } else { LockWait::Wait };
                    if admit(c, &cand, wait, &mut refused, now)? {
                        holds_locks |= cand.takes_locks();
                        admitted.push(cand);
                    }
                }
            }
        }
        let Some((kid, secret)) = key else {
            // No lane was asked for, or nothing was picked: still fail closed.
            let t = exec(c, "SELECT 1 FROM ff_waitpoint_hmac WHERE active", &[])?;
            return if t.is_empty() { Err(no_signing_key()) } else { Ok(Vec::new()) };
        };
        lease(c, r, admitted, &kid, &secret, now)
    })
}

/// Signs a grant for each admitted row and leases them all.
fn lease(c: &mut SpiClient<'_>, r: &ClaimRequest, admitted: Vec<Candidate>, kid: &str, secret: &[u8], now: i64) -> FfResult<Vec<(Leased, i64)>> {
    if admitted.is_empty() {
        return Ok(Vec::new());
    }
    let expires = now + r.grant_ttl_ms;
    let rows = admitted
        .iter()
        .map(|a| {
            let id = ExecutionId { uuid: from_pg_uuid(&a.uuid), partition: a.partition };
            let grant = Grant {
                execution: id,
                worker_id: r.worker_id.clone(),
                worker_instance_id: r.worker_instance_id.clone(),
                expires_at_ms: expires,
            };
            let grant_key = grant.key(kid, secret);
            LeaseRow { uuid: id.uuid, grant_id: grant_id(&grant_key), grant_key }
        })
        .collect();
    let order: Vec<pgrx::Uuid> = admitted.iter().map(|a| a.uuid).collect();
    let mut leased = exec::lease(c, rows, &r.worker_id, &r.worker_instance_id, kid, r.grant_ttl_ms, expires, now)?;
    // Hand them back in pick order (lanes in the order given, best first).
    leased.sort_by_key(|l| order.iter().position(|u| u.as_bytes() == l.id.uuid.as_bytes()));
    Ok(leased.into_iter().map(|l| (l, expires)).collect())
}

/// What a grant key is worth right now. Fencing and `ff_verify_grant` both
/// come here, so they can never disagree about a grant.
enum GrantCheck {
    Malformed,
    /// A well-formed key for another execution than the one named.
    OtherExecution(ExecutionId),
    UnknownKid(KidRefusal),
    /// No grant row for this exact key (never issued, altered, or purged).
    UnknownGrant,
    SignatureMismatch,
    /// Issued by us, but the execution is no longer leased under it.
    Stale(String),
    LeaseExpired(i64),
    InForce(Lease),
}

/// The lease in force, as the fence found it (its row locked when asked).
pub struct Lease {
    pub flow: Option<pgrx::Uuid>,
    pub attempt_index: i32,
    pub attempts_left: bool,
    pub retry: RetryPolicy,
    /// Whether it names a quota policy or a budget reserve (so ending the
    /// lease frees a quota slot or a reservation).
    pub shares: bool,
}

// One read for the fence: the signing key of the grant, the grant row
// (looked up by the hash of the exact key) and the execution, locked when
// the caller is about to change it.
macro_rules! fence_sql {
    ($lock:literal) => {
        concat!(
            "SELECT k.secret, k.retired_at_ms, g.worker_id, g.worker_instance_id, x.lifecycle_phase,
                    x.current_grant_id = $1, x.lease_expires_at_ms, x.flow_id, x.attempt_index,
                    x.attempt_index - x.attempt_offset < x.max_attempts, x.retry_base_ms, x.retry_max_ms,
                    x.retry_jitter, k.kid IS NOT NULL,
                    x.quota_policy_id IS NOT NULL OR x.budget_reserve IS NOT NULL
             FROM ff_exec_core x
             LEFT JOIN ff_waitpoint_hmac k ON k.kid = $4
             LEFT JOIN ff_claim_grant g ON g.grant_id = $1 AND g.execution_id = x.execution_id
             WHERE x.execution_id = $2 AND x.partition_key = $3 ",
            $lock
        )
    };
}
const FENCE_LOCK: &str = fence_sql!("FOR NO KEY UPDATE OF x");
const FENCE_READ: &str = fence_sql!("");

/// Checks `grant_key` in the order fencing needs: form, execution, kid,
/// issued grant (looked up by the hash of the exact key, so any change to it,
/// even of letter case, is unknown), signature, then the lease in force.
/// With `lock`, the execution row is locked for the change that follows
/// (lock order 1).
fn check_grant(c: &mut SpiClient<'_>, grant_key: &str, expected: Option<&ExecutionId>, lock: bool, now: i64) -> FfResult<GrantCheck> {
    let Some(p) = parse_grant_key(grant_key) else { return Ok(GrantCheck::Malformed) };
    if expected.is_some_and(|id| *id != p.execution) {
        return Ok(GrantCheck::OtherExecution(p.execution));
    }
    let id = p.execution;
    let gid = grant_id(grant_key);
    let sql = if lock { FENCE_LOCK } else { FENCE_READ };
    let t = exec(c, sql, &[gid.into(), pg_uuid(&id.uuid).into(), id.partition.into(), p.kid.as_str().into()])?;
    let Some(row) = first_row(t) else {
        // No such execution: a grant for it can only be unknown or stale.
        return Ok(GrantCheck::UnknownGrant);
    };
    if !col::<bool>(&row, 14)?.unwrap_or(false) {
        return Ok(GrantCheck::UnknownKid(KidRefusal::Unknown));
    }
    let secret = match verification_secret(col_req(&row, 1)?, col(&row, 2)?, now) {
        Ok(secret) => secret,
        Err(why) => return Ok(GrantCheck::UnknownKid(why)),
    };
    let (Some(worker_id), Some(worker_instance_id)) = (col::<String>(&row, 3)?, col::<String>(&row, 4)?) else {
        return Ok(GrantCheck::UnknownGrant);
    };
    let grant = Grant { execution: id, worker_id, worker_instance_id, expires_at_ms: p.expires_at_ms };
    if !signature_matches(&secret, &p.kid, &grant.message(), &p.hex_sig) {
        return Ok(GrantCheck::SignatureMismatch);
    }
    let phase: String = col_req(&row, 5)?;
    if phase != "active" || !col::<bool>(&row, 6)?.unwrap_or(false) {
        return Ok(GrantCheck::Stale(phase));
    }
    let lease_expires: i64 = col(&row, 7)?.unwrap_or(0);
    if lease_expires <= now {
        return Ok(GrantCheck::LeaseExpired(lease_expires));
    }
    Ok(GrantCheck::InForce(Lease {
        flow: col(&row, 8)?,
        attempt_index: col_req(&row, 9)?,
        attempts_left: col(&row, 10)?.unwrap_or(false),
        retry: RetryPolicy { base_ms: col_req(&row, 11)?, max_ms: col_req(&row, 12)?, jitter: col_req(&row, 13)? },
        shares: col(&row, 15)?.unwrap_or(true),
    }))
}

/// `ff_verify_grant`'s answer: `ok` only for the grant in force. A grant we
/// issued that no longer holds the lease (completed, failed, cancelled,
/// reclaimed, lease run out) is `expired`; one we never issued (or any
/// alteration of one, letter case included) is `unknown_grant`.
pub fn verify_grant(key: &str) -> FfResult<&'static str> {
    with_spi(|c| {
        Ok(match check_grant(c, key, None, false, now_ms())? {
            GrantCheck::Malformed => "malformed",
            GrantCheck::OtherExecution(_) | GrantCheck::UnknownGrant => "unknown_grant",
            GrantCheck::UnknownKid(_) => "unknown_kid",
            GrantCheck::SignatureMismatch => "signature_mismatch",
            GrantCheck::Stale(_) | GrantCheck::LeaseExpired(_) => "expired",
            GrantCheck::InForce(_) => "ok",
        })
    })
}

/// Fencing: the grant must be well-formed, for this execution, one we
/// issued (its row is kept until it expires), correctly signed by a kid
/// that may still verify, the grant currently in force, and unexpired.
/// Forgeries are 28000; grants we issued that are no longer current are
/// 55000.
fn fence(c: &mut SpiClient<'_>, id: &ExecutionId, grant_key: &str, now: i64) -> FfResult<Lease> {
    match check_grant(c, grant_key, Some(id), true, now)? {
        GrantCheck::InForce(lease) => Ok(lease),
        GrantCheck::Malformed => Err(FfError::invalid(format!("malformed grant key \"{}\"", clip(grant_key)))),
        GrantCheck::OtherExecution(other) => {
            Err(FfError::unauthorized(format!("grant was issued for execution {other}, not {id}")))
        }
        GrantCheck::UnknownKid(why) => Err(FfError::unauthorized(match why {
            KidRefusal::Unknown => "grant signed with an unknown kid".to_string(),
            KidRefusal::PastGrace => "grant signed with a kid retired past its grace window".to_string(),
        })),
        GrantCheck::UnknownGrant => Err(FfError::unauthorized(format!(
            "grant for execution {id} was not issued by this engine (or expired long ago)"
        ))),
        GrantCheck::SignatureMismatch => {
            Err(FfError::unauthorized(format!("grant signature does not match for execution {id}")))
        }
        GrantCheck::Stale(phase) => Err(FfError::wrong_state(format!(
            "grant is stale: execution {id} is {phase} and no longer leased under this grant"
        ))),
        GrantCheck::LeaseExpired(at) => Err(FfError::wrong_state(format!("lease of execution {id} expired at {at}"))),
    }
}

pub fn renew_lease(id: &ExecutionId, grant_key: &str, ttl_ms: i64) -> FfResult<i64> {
    check_ttl("ttl_ms", ttl_ms)?;
    with_spi(|c| {
        let now = now_ms();
        let lease = fence(c, id, grant_key, now)?;
        let expires = now + ttl_ms;
        exec::extend_lease(c, &id.uuid, lease.attempt_index, &grant_id(grant_key), expires)?;
        Ok(expires)
    })
}

pub fn complete(id: &ExecutionId, grant_key: &str, result: Option<RawJsonb>) -> FfResult<()> {
    with_spi(|c| {
        let now = now_ms();
        let lease = fence(c, id, grant_key, now)?;
        let ending = Ending { outcome: Outcome::Success, result, error: None, reason: None, dispatched: true };
        dispatch::end_held(c, &pg_uuid(&id.uuid), lease.flow, lease.shares, &ending, now)
    })
}

/// Fails the running attempt: retried after the execution's backoff while
/// attempts are left and the error is retryable, terminal `failed` otherwise.
pub fn fail(id: &ExecutionId, grant_key: &str, error: &str, retryable: bool) -> FfResult<&'static str> {
    with_spi(|c| {
        let now = now_ms();
        let lease = fence(c, id, grant_key, now)?;
        if retryable && lease.attempts_left {
            let wait = lease.retry.backoff_ms(lease.attempt_index + 1, exec::random_unit());
            exec::requeue(c, &id.uuid, "failed", error, now + wait, now)?;
            return Ok("retry_scheduled");
        }
        let ending = Ending { outcome: Outcome::Failed, result: None, error: Some(error), reason: None, dispatched: true };
        dispatch::end_held(c, &pg_uuid(&id.uuid), lease.flow, lease.shares, &ending, now)?;
        Ok("failed")
    })
}

// ---------------------------------------------------------------------------
// SQL API
// ---------------------------------------------------------------------------

/// Claims the best eligible execution of a lane for a worker: zero or one
/// row with the signed grant the worker must present to renew, complete or
/// fail it.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_claim_for_worker")]
#[search_path(@extschema@, pg_temp)]
fn sql_claim_for_worker(
    lane_id: Option<String>,
    worker_id: Option<String>,
    worker_instance_id: Option<String>,
    capabilities: default!(Option<Vec<Option<String>>>, "'{}'"),
    grant_ttl_ms: default!(Option<i64>, 30000),
) -> TableIterator<
    'static,
    (
        name!(execution_id, String),
        name!(partition_key, String),
        name!(grant_key, String),
        name!(expires_at_ms, i64),
    ),
> {
    let claimed = (|| {
        let lane = required(lane_id, "lane_id")?;
        claim(&ClaimRequest::validate(vec![lane], worker_id, worker_instance_id, capabilities, grant_ttl_ms, 1)?)
    })()
    .or_raise();
    TableIterator::new(claimed.into_iter().map(|(l, expires)| (l.id.to_string(), l.id.tag(), l.grant_key, expires)))
}

/// Claims up to `max_count` executions over `lane_ids`, tried in the order
/// given, each under its own grant and with the same admission as
/// `ff_claim_for_worker`; returns payload and attempt so a worker needs no
/// second round trip.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_claim_batch")]
#[search_path(@extschema@, pg_temp)]
fn sql_claim_batch(
    lane_ids: Option<Vec<Option<String>>>,
    worker_id: Option<String>,
    worker_instance_id: Option<String>,
    capabilities: default!(Option<Vec<Option<String>>>, "'{}'"),
    grant_ttl_ms: default!(Option<i64>, 30000),
    max_count: default!(Option<i32>, 10),
) -> TableIterator<
    'static,
    (
        name!(execution_id, String),
        name!(partition_key, String),
        name!(grant_key, String),
        name!(expires_at_ms, i64),
        name!(lane_id, String),
        name!(payload, Option<RawJsonb>),
        name!(attempt, i32),
    ),
> {
    let claimed = (|| {
        let lanes = required(lane_ids, "lane_ids")?
            .into_iter()
            .map(|l| required(l, "lane_ids element"))
            .collect::<FfResult<Vec<_>>>()?;
        let max = required(max_count, "max_count")?;
        claim(&ClaimRequest::validate(lanes, worker_id, worker_instance_id, capabilities, grant_ttl_ms, max)?)
    })()
    .or_raise();
    TableIterator::new(
        claimed
            .into_iter()
            .map(|(l, expires)| (l.id.to_string(), l.id.tag(), l.grant_key, expires, l.lane_id, l.payload, l.attempt)),
    )
}

/// Checks a grant key: 'ok' (the grant in force), 'malformed', 'expired'
/// (issued, but no longer in force), 'unknown_kid', 'unknown_grant' or
/// 'signature_mismatch', exactly as fencing decides.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_verify_grant")]
#[search_path(@extschema@, pg_temp)]
fn sql_verify_grant(grant_key: Option<String>) -> &'static str {
    (|| verify_grant(&required(grant_key, "grant_key")?))().or_raise()
}

fn parse_exec(execution_id: Option<String>) -> FfResult<ExecutionId> {
    ExecutionId::parse(&required(execution_id, "execution_id")?)
}

/// Extends the lease of a claimed execution; returns the new expiry (ms).
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_renew_lease")]
#[search_path(@extschema@, pg_temp)]
fn sql_renew_lease(execution_id: Option<String>, grant_key: Option<String>, ttl_ms: Option<i64>) -> i64 {
    (|| renew_lease(&parse_exec(execution_id)?, &required(grant_key, "grant_key")?, required(ttl_ms, "ttl_ms")?))()
        .or_raise()
}

/// Completes a claimed execution with an optional result; writes its
/// 'success' completion event and runs its cascade in the same transaction.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_complete_execution")]
#[search_path(@extschema@, pg_temp)]
fn sql_complete_execution(execution_id: Option<String>, grant_key: Option<String>, result: default!(Option<RawJsonb>, "NULL")) {
    (|| complete(&parse_exec(execution_id)?, &required(grant_key, "grant_key")?, result))().or_raise()
}

/// Fails the running attempt. Retryable failures with attempts left return
/// to the queue after the execution's backoff ('retry_scheduled'); otherwise
/// the execution ends 'failed' with a completion event and its cascade.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_fail_execution")]
#[search_path(@extschema@, pg_temp)]
fn sql_fail_execution(
    execution_id: Option<String>,
    grant_key: Option<String>,
    error: Option<String>,
    retryable: default!(Option<bool>, true),
) -> &'static str {
    (|| {
        let error = required(error, "error")?;
        if error.len() > 65_536 {
            return Err(FfError::invalid(format!("error text is {} bytes; the limit is 65536", error.len())));
        }
        fail(&parse_exec(execution_id)?, &required(grant_key, "grant_key")?, &error, required(retryable, "retryable")?)
    })()
    .or_raise()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds() {
        assert!(check_ttl("t", 1).is_ok());
        assert!(check_ttl("t", 0).is_err());
        assert!(check_ttl("t", MAX_TTL_MS + 1).is_err());
    }
}

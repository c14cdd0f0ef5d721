//! Rules for rows that reach immuta's tables other than through immuta's functions: a restore
//! (`pg_restore`, `psql < dump`), by a superuser or by the role that installed immuta.
//!
//! Such a row holds whatever its author wrote, so before immuta ever uses it, it is held to what
//! immuta itself would have written: ids and counts within bounds that keep immuta's arithmetic
//! exact, a finite creation time that is not in the future (a key "created" in 2999 would never
//! roll over, one created at `-infinity` breaks every date computation), a wrapping key and region
//! that a configuration could have named (the region becomes a host name), and a wrapped key of a
//! length its provider produces. The wrapping rules are applied again whenever a row is read
//! ([`key_row`]), so a row that slipped in before they existed is refused then; the bounds on ids
//! are the restore's only ([`id_ok`]), since ids immuta hands out go on past them.
//!
//! When rows may be added at all, and by whom, is the SQL layer's (`src/restore.rs`): this file
//! only says whether a row is one immuta could have written.

use crate::key::{KeyId, WrappedKey, WrappingKeyRef};
use crate::local::WRAPPED_LEN;
use crate::time::UnixMicros;
use crate::usage::HARD_LIMIT;

/// The largest id a restored row may have: 2^32 below the largest bigint, so that ids after it
/// cannot run out in practice, and far above any id immuta hands out (a dump of a database whose
/// ids went past a restored 2^62 still restores).
pub const MAX_RESTORED_ID: i64 = i64::MAX - (1 << 32);

/// The longest ciphertext AWS KMS `Encrypt` returns for a 32-byte plaintext is a few hundred
/// bytes; KMS accepts ciphertext blobs of up to 6144 bytes.
pub const MAX_KMS_WRAPPED_LEN: usize = 6144;

/// How far in the future a restored row's creation time may be (clock skew between clusters).
pub const MAX_CLOCK_SKEW: UnixMicros = UnixMicros(UnixMicros::DAY);

/// Whether `id` may be a restored row's id.
pub fn id_ok(id: i64) -> bool {
    (1..=MAX_RESTORED_ID).contains(&id)
}

/// Whether `count` may be the `encryptions` of a restored row of `immuta.key_usage`.
pub fn encryptions_ok(count: i64) -> bool {
    (1..=HARD_LIMIT as i64).contains(&count)
}

/// Whether a key created at `created_at` may be restored at `now`: after 1970, and not later
/// than a day of clock skew ahead.
pub fn created_at_ok(created_at: UnixMicros, now: UnixMicros) -> bool {
    (0..=now.0.saturating_add(MAX_CLOCK_SKEW.0)).contains(&created_at.0)
}

/// Whether a restored key row `id` may name `rolled_over_from` as the key it replaced: nothing
/// (a manual rotation), 0 (the first key), or an older key. A later key named there would
/// forbid, by the column's uniqueness, the automatic rollover of that key when its time comes.
pub fn rolled_over_from_ok(id: i64, rolled_over_from: Option<i64>) -> bool {
    rolled_over_from.is_none_or(|from| (0..id).contains(&from))
}

/// Whether `wrapped` has a length that the provider of `wrapping` produces.
pub fn wrapped_len_ok(wrapping: &WrappingKeyRef, wrapped: &WrappedKey) -> bool {
    let len = wrapped.as_bytes().len();
    match wrapping {
        WrappingKeyRef::Local { .. } => len == WRAPPED_LEN,
        WrappingKeyRef::AwsKms { .. } => (1..=MAX_KMS_WRAPPED_LEN).contains(&len),
    }
}

/// The wrapping of a key row as read, if immuta could have written it: a positive id, its
/// provider, wrapping key and region (held to the rules of a configured KMS key), and its wrapped
/// key's length. The error completes the sentence "The row of immuta.data_keys ...".
pub fn key_row(
    id: i64,
    provider: &str,
    key: &str,
    region: Option<&str>,
    wrapped: &WrappedKey,
) -> Result<(KeyId, WrappingKeyRef), &'static str> {
    let id = KeyId::new(id).ok_or("has an id that is not positive")?;
    let wrapping = WrappingKeyRef::from_columns(provider, key, region)
        .ok_or("names a provider, wrapping key or region that immuta does not write")?;
    if !wrapped_len_ok(&wrapping, wrapped) {
        return Err("holds a wrapped key of a length its provider never produces");
    }
    Ok((id, wrapping))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Fingerprint;

    #[test]
    fn ids_and_counts_stay_where_immutas_arithmetic_is_exact() {
        assert!(id_ok(1) && id_ok(MAX_RESTORED_ID));
        assert!(!id_ok(0) && !id_ok(-1) && !id_ok(MAX_RESTORED_ID + 1) && !id_ok(i64::MAX));
        assert!(encryptions_ok(1) && encryptions_ok(1 << 32));
        assert!(!encryptions_ok(0) && !encryptions_ok((1 << 32) + 1) && !encryptions_ok(i64::MAX));
    }

    #[test]
    fn a_restored_key_names_only_an_older_key_as_the_one_it_replaced() {
        assert!(
            rolled_over_from_ok(5, None)
                && rolled_over_from_ok(5, Some(0))
                && rolled_over_from_ok(5, Some(4))
        );
        assert!(
            !rolled_over_from_ok(5, Some(5))
                && !rolled_over_from_ok(5, Some(6))
                && !rolled_over_from_ok(5, Some(-1))
        );
    }

    #[test]
    fn a_key_from_the_future_is_not_restored() {
        let now = UnixMicros(1_000 * UnixMicros::DAY);
        assert!(created_at_ok(now, now));
        assert!(created_at_ok(UnixMicros(now.0 + UnixMicros::DAY), now), "a day of clock skew");
        assert!(!created_at_ok(UnixMicros(now.0 + UnixMicros::DAY + 1), now));
        assert!(created_at_ok(UnixMicros(0), now));
        assert!(!created_at_ok(UnixMicros(-1), now), "before 1970");
        assert!(!created_at_ok(UnixMicros(i64::MIN), now), "-infinity");
    }

    #[test]
    fn key_rows_are_held_to_what_immuta_writes() {
        let local = WrappingKeyRef::Local { fingerprint: Fingerprint([1; 8]) };
        let fp = local.key_column();
        let ok = WrappedKey::new(vec![0; WRAPPED_LEN]);
        assert!(key_row(3, "local", &fp, None, &ok).is_ok());
        assert!(key_row(0, "local", &fp, None, &ok).is_err());
        assert!(key_row(MAX_RESTORED_ID + 1, "local", &fp, None, &ok).is_ok(), "ids immuta hands out go on");
        assert!(!id_ok(MAX_RESTORED_ID + 1), "but a restore stops short of them");
        let short = WrappedKey::new(vec![0; WRAPPED_LEN - 1]);
        assert!(key_row(3, "local", &fp, None, &short).is_err());
        let blob = WrappedKey::new(vec![1; 200]);
        assert!(key_row(3, "awsKms", "alias/x", Some("us-east-1"), &blob).is_ok());
        assert!(key_row(3, "awsKms", "alias/x", Some("us-east-1.attacker.example"), &blob).is_err());
        assert!(key_row(3, "awsKms", "alias/x", None, &blob).is_err());
        let huge = WrappedKey::new(vec![1; MAX_KMS_WRAPPED_LEN + 1]);
        assert!(key_row(3, "awsKms", "alias/x", Some("us-east-1"), &huge).is_err());
        assert!(key_row(3, "vault", "x", None, &blob).is_err());
    }
}

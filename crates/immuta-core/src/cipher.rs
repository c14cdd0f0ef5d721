//! Sealing and opening values under one data key (AES-256-GCM, layouts in `format.rs`).
//!
//! [`DataCipher`] holds two implementations of the same AES-256-GCM, with the key expanded once
//! per backend rather than once per row:
//! - sealing a value of up to [`SMALL_VALUE`] bytes (identifiers, card numbers, names, dates,
//!   addresses: most columns) goes through RustCrypto's `aes-gcm` over an encrypt-only AES-256
//!   schedule held inline in the cipher (AES-NI and carry-less multiplication on x86-64, where
//!   `.cargo/config.toml` builds with them and `_PG_init` refuses a processor without them; the
//!   crates' constant-time software code elsewhere). A row reads the schedule's 240 bytes, next to
//!   the cipher's first cache line, and nothing else: the GHASH key `H` is computed for each value
//!   (one AES block) rather than kept (see `SmallAead`). With thousands of keys in use in turn
//!   (a keyring per tenant), each row misses the processor's caches for its key, and that is what
//!   such a row costs most: AWS-LC's context is behind a pointer of its own, and it copies its
//!   GHASH table (hundreds of bytes) to the stack at every call.
//! - sealing larger values, and opening every value, goes through AWS-LC (through `aws-lc-rs`,
//!   which the AWS SDK links anyway), whose stitched AES-GCM assembly runs at memory speed.
//!
//! Measured outside the server (2026-12-04, `aes-gcm` keeping `H`): sealing 96 bytes cost 99 ns
//! against AWS-LC's 158 ns with one key, and 122 ns against 200 ns with 10,000 keys in turn;
//! 512 bytes 393 ns against 266 ns: the crossover is near 230 bytes. Opening stays with AWS-LC:
//! through `aes-gcm` it was no faster inside the server (`immuta_decrypt` of 96 bytes, one key;
//! `aes-gcm` opens in two passes, the tag first, and compares the tag byte by byte). AWS-LC's
//! context is made with the cipher and its pointer sits in the cipher's first cache line: made at
//! its first use instead, behind the inline schedule, it cost decryption 15 to 25 ns a row. A
//! cipher takes about 1.6 kB: the inline schedule 1 kB (the `aes` crate keeps room for its
//! software fallback beside the AES-NI schedule; a row reads the 240 bytes it uses) and AWS-LC's
//! context about 600 bytes.
//!
//! Both produce the same bytes (a unit test checks each length up to and past the threshold
//! against AWS-LC's own sealing, and the FORMAT vectors hold). Both zeroize their key schedules
//! when the cipher is dropped (the `aes` crate's `zeroize` feature; AWS-LC frees its context with
//! `OPENSSL_free`, which overwrites the memory first). What a seal leaves on the stack is left
//! there, as AWS-LC's copy of its GHASH table is: `aes-gcm`'s copies of `H`, the tag mask and the
//! last keystream blocks for that value, in the frames of the call, until later calls happen to
//! overwrite them. Values are sealed from the input straight into the output and opened the same
//! way (a small value is copied into the output and encrypted in place). Tag comparison is
//! constant-time, and a value that fails authentication yields one error, never partial
//! plaintext (the output is zeroed).
//!
//! The associated data of a version-2 value is its header followed by the context, if one is
//! given; the context itself is never stored.

use aes::Aes256Enc;
use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::AesGcm;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use zeroize::Zeroize;

use crate::encoding;
use crate::error::ContextProblem;
use crate::format::{self, BODY_OFFSET, HEADER_LEN, NONCE_LEN, OVERHEAD};
use crate::key::{DataKey, KeyId};
use crate::value_type::ValueType;
use crate::{Error, Result};

/// Plaintexts of up to this many bytes are sealed by the inline engine, longer ones by AWS-LC
/// (see the module's documentation for the measurements).
pub const SMALL_VALUE: usize = 192;

/// AES-256-GCM with a 96-bit nonce over a borrowed encrypt-only AES-256 schedule (GCM never runs
/// AES backwards), made for each value: it computes the GHASH key `H = AES_K(0)` (one block) and
/// lives on the stack for that value only. The cipher keeps the schedule alone: `polyval`'s
/// run-time dispatch wrapper has no `Drop`, so an `H` held for the cipher's life would outlive it
/// unzeroized, and `H` with any one ciphertext is enough to forge values under the key.
type SmallAead<'a> = AesGcm<&'a Aes256Enc, U12>;

/// A ready AES-256-GCM cipher for one data key. `repr(C)`: what a row reads comes first, the
/// key id and the pointer to AWS-LC's context in one cache line, then the inline schedule.
#[repr(C)]
pub struct DataCipher {
    key_id: KeyId,
    /// AWS-LC's context (its own allocation).
    large: LessSafeKey,
    /// The schedule of small values' seals; `aes` zeroizes it on drop (its `zeroize` feature).
    small: Aes256Enc,
}

/// Contexts up to this length are joined to the header on the stack; longer ones on the heap.
const STACK_AAD: usize = 256;

/// Calls `f` with the associated data: `header`, then the context's bytes.
fn with_aad<R>(header: &[u8], context: Option<&[u8]>, f: impl FnOnce(&[u8]) -> R) -> R {
    match context {
        None => f(header),
        Some(context) if header.len() + context.len() <= STACK_AAD => {
            let mut buf = [0u8; STACK_AAD];
            let n = header.len() + context.len();
            buf[..header.len()].copy_from_slice(header);
            buf[header.len()..n].copy_from_slice(context);
            f(&buf[..n])
        }
        Some(context) => f(&[header, context].concat()),
    }
}

impl DataCipher {
    pub fn new(key_id: KeyId, key: &DataKey) -> DataCipher {
        let unbound = UnboundKey::new(&AES_256_GCM, key.expose()).expect("a data key is 32 bytes");
        DataCipher { key_id, large: LessSafeKey::new(unbound), small: Aes256Enc::new(key.expose().into()) }
    }

    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Seals the encoding `plaintext` of a value of `value_type`, with `context` if given, into
    /// `out`, which must be exactly `format::sealed_len(plaintext.len())` bytes long (version 2).
    /// Writing into a caller's buffer lets the SQL layer seal straight into the `bytea` it
    /// returns.
    pub fn seal_into(
        &self,
        nonce: &[u8; NONCE_LEN],
        value_type: ValueType,
        context: Option<&[u8]>,
        plaintext: &[u8],
        out: &mut [u8],
    ) {
        assert_eq!(out.len(), format::sealed_len(plaintext.len()), "output buffer of wrong size");
        format::write_header(self.key_id, value_type, context.is_some(), out);
        out[HEADER_LEN..BODY_OFFSET].copy_from_slice(nonce);
        let (head, rest) = out.split_at_mut(BODY_OFFSET);
        let (body, tag) = rest.split_at_mut(plaintext.len());
        with_aad(&head[..HEADER_LEN], context, |aad| {
            if plaintext.len() <= SMALL_VALUE {
                body.copy_from_slice(plaintext);
                let computed = SmallAead::from(&self.small)
                    .encrypt_in_place_detached(nonce.into(), aad, body)
                    .expect("AES-GCM accepts any plaintext below 64 GiB");
                tag.copy_from_slice(&computed);
                return;
            }
            self.large
                .seal_out_of_place_scatter(
                    Nonce::assume_unique_for_key(*nonce),
                    Aad::from(aad),
                    plaintext,
                    body,
                    &[],
                    tag,
                )
                .expect("AES-GCM accepts any plaintext below 64 GiB, and PostgreSQL values are below 1 GiB")
        });
    }

    /// Seals into a new vector.
    pub fn seal(
        &self,
        nonce: &[u8; NONCE_LEN],
        value_type: ValueType,
        context: Option<&[u8]>,
        plaintext: &[u8],
    ) -> Vec<u8> {
        let mut out = vec![0u8; plaintext.len() + OVERHEAD];
        self.seal_into(nonce, value_type, context, plaintext, &mut out);
        out
    }

    /// Opens a parsed ciphertext with `context` into `out`, which must be exactly
    /// `sealed.body.len()` bytes; checks that the plaintext is a valid encoding of its type as
    /// far as the core can tell (`encoding::check_scalar`; the SQL layer's decoder checks the
    /// rest). On failure `out` is zeroed. The caller has already checked that `sealed.key_id` is
    /// this cipher's key and that the value holds the type it wants ([`expect_type`]).
    pub fn open_into(
        &self,
        sealed: &format::Sealed<'_>,
        context: Option<&[u8]>,
        out: &mut [u8],
    ) -> Result<()> {
        debug_assert_eq!(sealed.key_id, self.key_id);
        assert_eq!(out.len(), sealed.body.len(), "output buffer of wrong size");
        let context_problem = match (sealed.has_context, context.is_some()) {
            (true, false) => Some(ContextProblem::Missing),
            (false, true) => Some(ContextProblem::NotExpected),
            _ => None,
        };
        if let Some(problem) = context_problem {
            return Err(Error::ContextMismatch { key_id: self.key_id, problem });
        }
        let opened = with_aad(sealed.header, context, |aad| {
            self.large.open_separate_gather(
                Nonce::assume_unique_for_key(*sealed.nonce),
                Aad::from(aad),
                sealed.body,
                sealed.tag,
                out,
            )
        });
        if opened.is_err() {
            out.zeroize();
            return Err(if sealed.has_context {
                Error::ContextMismatch { key_id: self.key_id, problem: ContextProblem::Different }
            } else {
                Error::AuthenticationFailed { key_id: self.key_id }
            });
        }
        if !sealed.value_type.array && encoding::check_scalar(sealed.value_type, out).is_err() {
            out.zeroize();
            return Err(if sealed.value_type == ValueType::TEXT {
                Error::InvalidText { key_id: self.key_id }
            } else {
                Error::InvalidEncoding { key_id: self.key_id, value_type: sealed.value_type }
            });
        }
        Ok(())
    }

    /// Opens a text value (version 1, or version 2 of type text) into a new string.
    pub fn open_text(&self, sealed: &format::Sealed<'_>, context: Option<&[u8]>) -> Result<String> {
        expect_type(sealed, ValueType::TEXT)?;
        let mut out = vec![0u8; sealed.body.len()];
        self.open_into(sealed, context, &mut out)?;
        Ok(String::from_utf8(out).expect("checked"))
    }
}

/// Refuses to read a value as another type than the one it holds.
pub fn expect_type(sealed: &format::Sealed<'_>, wanted: ValueType) -> Result<()> {
    if sealed.value_type != wanted {
        return Err(Error::TypeMismatch { held: sealed.value_type, wanted });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::parse;
    use crate::value_type::Scalar;

    fn cipher(id: i64, byte: u8) -> DataCipher {
        let mut raw = [byte; 32];
        DataCipher::new(KeyId::new(id).unwrap(), &DataKey::from_bytes(&mut raw))
    }

    fn seal_text(c: &DataCipher, text: &str, context: Option<&str>) -> Vec<u8> {
        c.seal(&[3; 12], ValueType::TEXT, context.map(str::as_bytes), text.as_bytes())
    }

    #[test]
    fn seal_then_open_round_trips() {
        let c = cipher(5, 7);
        let long_context = "c".repeat(1000);
        for text in ["", "123-45-6789", "żółw 🐢 ☃", &"x".repeat(3 << 20)] {
            for context in [None, Some(""), Some("public.patients.ssn:42"), Some(long_context.as_str())] {
                let sealed = seal_text(&c, text, context);
                assert_eq!(sealed.len(), text.len() + OVERHEAD);
                assert_eq!(c.open_text(&parse(&sealed).unwrap(), context.map(str::as_bytes)).unwrap(), text);
            }
        }
    }

    /// Both engines are the same AES-256-GCM: at every length up to and past the threshold, with
    /// and without a context, the cipher's bytes are AWS-LC's own, and it opens them.
    #[test]
    fn both_engines_produce_and_open_the_same_bytes() {
        let mut raw = [0x5a; 32];
        raw[..4].copy_from_slice(b"key!");
        let c = DataCipher::new(KeyId::new(9).unwrap(), &DataKey::from_bytes(&mut raw.clone()));
        let reference = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).unwrap());
        let long_context = vec![b'c'; 300];
        for len in (0..=SMALL_VALUE + 70).chain([1000, 4096]) {
            let plaintext: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let nonce: [u8; 12] = std::array::from_fn(|i| (i * 31 + len) as u8);
            for context in [None, Some(&b"public.t.c:7"[..]), Some(&long_context[..])] {
                let sealed = c.seal(&nonce, ValueType::TEXT, context, &plaintext);
                // AWS-LC over the same header and associated data.
                let header = &sealed[..HEADER_LEN];
                let aad = [header, context.unwrap_or_default()].concat();
                let mut body = plaintext.clone();
                let tag = reference
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&aad),
                        &mut body,
                    )
                    .unwrap();
                assert_eq!(&sealed[BODY_OFFSET..BODY_OFFSET + len], &body[..], "body at {len}");
                assert_eq!(&sealed[BODY_OFFSET + len..], tag.as_ref(), "tag at {len}");
                assert_eq!(
                    c.open_text(&parse(&sealed).unwrap(), context).unwrap().as_bytes(),
                    &plaintext[..]
                );
                // A wrong tag fails, and leaves nothing in the output.
                let mut bad = sealed.clone();
                *bad.last_mut().unwrap() ^= 1;
                let mut out = vec![0xffu8; len];
                assert!(c.open_into(&parse(&bad).unwrap(), context, &mut out).is_err());
                assert!(out.iter().all(|&b| b == 0), "zeroed at {len}");
            }
        }
    }

    #[test]
    fn every_single_bit_flip_fails_authentication() {
        let c = cipher(1, 1);
        for context in [None, Some(&b"row 1"[..])] {
            let sealed = c.seal(&[0; 12], ValueType::TEXT, context, b"4111 1111 1111 1111");
            for byte in 0..sealed.len() {
                for bit in 0..8 {
                    let mut bad = sealed.clone();
                    bad[byte] ^= 1 << bit;
                    match parse(&bad) {
                        Ok(s) if s.key_id == c.key_id() && s.value_type == ValueType::TEXT => {
                            assert!(matches!(
                                c.open_text(&s, context),
                                Err(Error::AuthenticationFailed { .. } | Error::ContextMismatch { .. })
                            ))
                        }
                        // Another key id, version, flag or type: rejected before opening.
                        Ok(_) | Err(_) => {}
                    }
                }
            }
        }
    }

    #[test]
    fn a_context_opens_only_what_it_sealed() {
        let c = cipher(1, 1);
        let with = |ctx: &str| seal_text(&c, "123-45-6789", Some(ctx));
        let open = |v: &[u8], ctx: Option<&str>| c.open_text(&parse(v).unwrap(), ctx.map(str::as_bytes));
        let problem = |r: Result<String>| match r {
            Err(Error::ContextMismatch { problem, .. }) => problem,
            other => panic!("{:?}", other.map(|_| ())),
        };
        assert_eq!(problem(open(&with("row 1"), Some("row 2"))), ContextProblem::Different);
        assert_eq!(problem(open(&with("row 1"), None)), ContextProblem::Missing);
        assert_eq!(problem(open(&seal_text(&c, "x", None), Some("row 1"))), ContextProblem::NotExpected);
        // The empty context is a context: it is not the same as none.
        assert_eq!(problem(open(&with(""), None)), ContextProblem::Missing);
        assert_eq!(open(&with(""), Some("")).unwrap(), "123-45-6789");
        // The header is authenticated too: clearing the context flag does not make a bound value
        // open without its context.
        let mut cleared = with("row 1");
        cleared[1] = 0;
        assert!(matches!(open(&cleared, None), Err(Error::AuthenticationFailed { .. })));
    }

    #[test]
    fn a_different_key_with_the_same_id_fails_authentication() {
        let sealed = seal_text(&cipher(1, 1), "secret", None);
        let other = cipher(1, 2);
        assert!(matches!(
            other.open_text(&parse(&sealed).unwrap(), None),
            Err(Error::AuthenticationFailed { .. })
        ));
    }

    #[test]
    fn a_value_is_read_as_its_own_type_only() {
        let c = cipher(1, 1);
        let sealed = c.seal(&[0; 12], ValueType::scalar(Scalar::Jsonb), None, b"\x01{}");
        assert!(matches!(
            c.open_text(&parse(&sealed).unwrap(), None),
            Err(Error::TypeMismatch { held, wanted }) if held == ValueType::scalar(Scalar::Jsonb) && wanted == ValueType::TEXT
        ));
        // A type byte changed in transit does not authenticate.
        let mut retyped = sealed.clone();
        retyped[2] = ValueType::TEXT.to_byte();
        assert!(matches!(
            c.open_text(&parse(&retyped).unwrap(), None),
            Err(Error::AuthenticationFailed { .. })
        ));
    }

    #[test]
    fn authenticated_bytes_that_are_not_their_type_are_rejected() {
        let c = cipher(1, 1);
        for bad in [&b"\xff\xfe"[..], b"a\0b"] {
            let sealed = c.seal(&[0; 12], ValueType::TEXT, None, bad);
            assert!(matches!(c.open_text(&parse(&sealed).unwrap(), None), Err(Error::InvalidText { .. })));
        }
        let int4 = ValueType::scalar(Scalar::Int4);
        let sealed = c.seal(&[0; 12], int4, None, &[0; 3]);
        let mut out = [0u8; 3];
        assert!(matches!(
            c.open_into(&parse(&sealed).unwrap(), None, &mut out),
            Err(Error::InvalidEncoding { value_type, .. }) if value_type == int4
        ));
    }
}

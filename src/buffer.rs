//! Buffers of plaintext sized by SQL input. Rust's allocator aborts the process when an
//! allocation fails, which would take every session of the cluster down with the backend; these
//! ask first and raise an ERROR instead. A buffer that is outgrown is zeroed before it is freed,
//! and every buffer when it is dropped.

use pgrx::PgSqlErrorCode;
use zeroize::Zeroize;

use crate::errors::raise;

/// Makes room for `additional` more bytes in `v`, or raises `53200`.
pub fn reserve(v: &mut Vec<u8>, additional: usize) {
    if v.try_reserve_exact(additional).is_err() {
        raise(
            PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY,
            "out of memory",
            Some(format!("immuta could not allocate {} bytes.", v.len().saturating_add(additional))),
            None,
        );
    }
}

/// A growing plaintext buffer, zeroed (its whole capacity) when dropped.
///
/// A buffer that never allocated is left alone: zeroizing an empty `Vec` still zeroes its
/// spare capacity of length 0 at the vector's dangling address, which glibc does with a masked
/// AVX-512 store, and on this machine's AMD processor that store costs about 60 ns (16% of a
/// `timestamptz` decryption, found by profiling).
pub struct SecretBuf(Vec<u8>);

impl Drop for SecretBuf {
    fn drop(&mut self) {
        if self.0.capacity() != 0 {
            self.0.zeroize();
        }
    }
}

impl SecretBuf {
    /// An empty buffer that allocates nothing.
    pub const fn new() -> SecretBuf {
        SecretBuf(Vec::new())
    }

    pub fn with_capacity(capacity: usize) -> SecretBuf {
        let mut buf = SecretBuf::new();
        reserve(&mut buf.0, capacity);
        buf
    }

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> SecretBuf {
        let mut buf = SecretBuf::with_capacity(len);
        buf.0.resize(len, 0);
        buf
    }

    /// Appends `bytes`; when the buffer must grow, the old one is copied and zeroed.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.0.capacity() - self.0.len() < bytes.len() {
            let want = (self.0.len() + bytes.len()).max(self.0.capacity().saturating_mul(2));
            let mut bigger = SecretBuf::with_capacity(want);
            bigger.0.extend_from_slice(&self.0);
            *self = bigger;
        }
        self.0.extend_from_slice(bytes);
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// A plaintext of a known length that exists only while a value is sealed again: up to
/// [`Scratch::SMALL`] bytes on the stack (the common case: a column of identifiers), longer ones
/// in a [`SecretBuf`]. Only the bytes used are zeroed when it is dropped: zeroing is a volatile
/// store per byte, and zeroing the whole array was the costliest step of re-encrypting a short
/// value after the cipher itself (found by profiling).
pub struct Scratch {
    small: [u8; Scratch::SMALL],
    len: usize,
    large: SecretBuf,
}

impl Scratch {
    pub const SMALL: usize = 256;

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Scratch {
        let large = if len > Scratch::SMALL { SecretBuf::zeroed(len) } else { SecretBuf::new() };
        Scratch { small: [0; Scratch::SMALL], len, large }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.len > Scratch::SMALL {
            self.large.as_mut_slice()
        } else {
            &mut self.small[..self.len]
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.len <= Scratch::SMALL {
            self.small[..self.len].zeroize();
        }
    }
}

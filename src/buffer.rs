//! Buffers of plaintext sized by SQL input. Rust's allocator aborts the process when an
//! allocation fails, which would take every session of the cluster down with the backend; these
//! ask first and raise an ERROR instead. A buffer that is outgrown is zeroed before it is freed,
//! and every buffer when it is dropped.

use pgrx::PgSqlErrorCode;
use zeroize::Zeroizing;

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

/// A growing plaintext buffer.
pub struct SecretBuf(Zeroizing<Vec<u8>>);

impl SecretBuf {
    pub fn with_capacity(capacity: usize) -> SecretBuf {
        let mut v = Vec::new();
        reserve(&mut v, capacity);
        SecretBuf(Zeroizing::new(v))
    }

    /// Appends `bytes`; when the buffer must grow, the old one is copied and zeroed.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.0.capacity() - self.0.len() < bytes.len() {
            let want = (self.0.len() + bytes.len()).max(self.0.capacity().saturating_mul(2));
            let mut bigger = Vec::new();
            reserve(&mut bigger, want);
            bigger.extend_from_slice(&self.0);
            self.0 = Zeroizing::new(bigger);
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

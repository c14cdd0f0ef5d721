//! Nonces for AES-GCM: 96 random bits per value.
//!
//! Asking the kernel for 12 bytes per row costs a system call per row; a ChaCha20 generator seeded
//! once from the kernel gives the same unpredictability in a few nanoseconds. The generator must
//! never be shared between processes (two forked copies would repeat nonces), so the SQL layer
//! creates it lazily in each backend, never in the postmaster, and re-seeds when it sees that its
//! process id changed.

use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, RngCore, SeedableRng};

use crate::format::NONCE_LEN;

/// A per-process source of random nonces.
pub struct NonceSource {
    rng: ChaCha20Rng,
}

impl NonceSource {
    /// A generator seeded from the operating system's CSPRNG.
    pub fn from_os() -> NonceSource {
        NonceSource { rng: ChaCha20Rng::from_rng(OsRng).expect("the OS random source failed") }
    }

    /// The next nonce.
    pub fn next_nonce(&mut self) -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill_bytes(&mut nonce);
        nonce
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sources_do_not_repeat_each_other() {
        let (mut a, mut b) = (NonceSource::from_os(), NonceSource::from_os());
        let from_a: std::collections::HashSet<_> = (0..1000).map(|_| a.next_nonce()).collect();
        assert_eq!(from_a.len(), 1000);
        assert!((0..1000).all(|_| !from_a.contains(&b.next_nonce())));
    }
}

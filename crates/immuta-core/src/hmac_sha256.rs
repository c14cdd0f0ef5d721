//! HMAC-SHA256 (RFC 2104) for a key that makes many MACs: the SHA-256 states after the key's
//! inner and outer pad blocks are computed once, so each MAC of an `n`-byte message costs only
//! the compressions of its own blocks (`(n + 9) / 64` rounded up, plus one for the outer hash):
//! three for a value of about 100 bytes, where a general HMAC context also copies its keyed state
//! and buffers each update. The compression function is the `sha2` crate's (SHA-NI where the CPU
//! has it). The result is exactly HMAC-SHA256; the tests check it against AWS-LC's HMAC for every
//! message length across several block boundaries.
//!
//! Blind index terms are made with it (blind_index.rs): the states are as secret as the key, so
//! they are zeroized on drop, as is each block of message copied on the stack.

use sha2::digest::consts::U64;
use sha2::digest::generic_array::GenericArray;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// SHA-256's block size in bytes.
const BLOCK: usize = 64;

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const IV: [u32; 8] =
    [0x6a09_e667, 0xbb67_ae85, 0x3c6e_f372, 0xa54f_f53a, 0x510e_527f, 0x9b05_688c, 0x1f83_d9ab, 0x5be0_cd19];

fn compress(state: &mut [u32; 8], block: &[u8]) {
    sha2::compress256(state, core::slice::from_ref(GenericArray::<u8, U64>::from_slice(block)));
}

/// The keyed states of HMAC-SHA256 under one key. No `Debug`, no `Clone`.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct HmacSha256 {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl HmacSha256 {
    /// The states for `key`, at most one block (64 bytes) long, as immuta's MAC keys are (32).
    pub fn new(key: &[u8]) -> HmacSha256 {
        assert!(key.len() <= BLOCK, "an HMAC key longer than a block is hashed first; immuta's are 32 bytes");
        let mut pad = Zeroizing::new([0u8; BLOCK]);
        let mut keyed = |byte: u8| {
            pad.fill(byte);
            pad.iter_mut().zip(key).for_each(|(p, k)| *p ^= k);
            let mut state = IV;
            compress(&mut state, &pad[..]);
            state
        };
        HmacSha256 { inner: keyed(0x36), outer: keyed(0x5c) }
    }

    /// HMAC-SHA256 of the message `prefix || message`.
    pub fn mac(&self, prefix: u8, message: &[u8]) -> [u8; 32] {
        let mut state = self.inner;
        // The bytes hashed after the inner pad block; the length the padding records counts it.
        let len = 1 + message.len();
        let mut block = Zeroizing::new([0u8; BLOCK]);
        // The first block: the prefix, then as much of the message as fits.
        block[0] = prefix;
        let first = message.len().min(BLOCK - 1);
        block[1..1 + first].copy_from_slice(&message[..first]);
        let mut rest = &message[first..];
        let mut filled = 1 + first;
        if filled == BLOCK {
            compress(&mut state, &block[..]);
            // The full blocks in the middle are hashed where they lie.
            let mut chunks = rest.chunks_exact(BLOCK);
            for chunk in &mut chunks {
                compress(&mut state, chunk);
            }
            rest = chunks.remainder();
            block[..rest.len()].copy_from_slice(rest);
            filled = rest.len();
        }
        // Padding: 0x80, zeros, and the bit length of pad block and message, big-endian.
        block[filled..].fill(0);
        block[filled] = 0x80;
        if filled + 1 + 8 > BLOCK {
            compress(&mut state, &block[..]);
            block.fill(0);
        }
        let bits = ((BLOCK + len) as u64) * 8;
        block[BLOCK - 8..].copy_from_slice(&bits.to_be_bytes());
        compress(&mut state, &block[..]);
        drop(block);

        // The outer hash: the inner digest, padded, after the outer pad block.
        let mut outer = [0u8; BLOCK];
        for (out, word) in outer.chunks_exact_mut(4).zip(state) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        outer[32] = 0x80;
        outer[BLOCK - 8..].copy_from_slice(&(((BLOCK + 32) as u64) * 8).to_be_bytes());
        let mut state = self.outer;
        compress(&mut state, &outer);
        let mut tag = [0u8; 32];
        for (out, word) in tag.chunks_exact_mut(4).zip(state) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::hmac;

    fn reference(key: &[u8], prefix: u8, message: &[u8]) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
        ctx.update(&[prefix]);
        ctx.update(message);
        ctx.sign().as_ref().to_vec()
    }

    /// Every message length up to five blocks, so every place the padding can fall (in the first
    /// block, the middle ones, a block of its own) and every remainder of the prefixed message.
    #[test]
    fn is_hmac_sha256_at_every_length() {
        let key: Vec<u8> = (0..32u8).map(|b| b.wrapping_mul(37) ^ 0xa5).collect();
        let mac = HmacSha256::new(&key);
        let message: Vec<u8> = (0..320u32).map(|i| (i * 131 % 251) as u8).collect();
        for len in 0..=message.len() {
            for prefix in [0u8, 0x41, 0xff] {
                assert_eq!(
                    mac.mac(prefix, &message[..len]).to_vec(),
                    reference(&key, prefix, &message[..len]),
                    "{len}"
                );
            }
        }
    }

    #[test]
    fn keys_of_every_length_up_to_a_block() {
        for len in [0usize, 1, 16, 31, 32, 33, 63, 64] {
            let key = vec![0x0b; len];
            assert_eq!(HmacSha256::new(&key).mac(7, b"Hi There").to_vec(), reference(&key, 7, b"Hi There"));
        }
    }

    /// RFC 4231, test case 2 ("Jefe"), the prefix taken as the message's first byte.
    #[test]
    fn rfc_4231_case_2() {
        let tag = HmacSha256::new(b"Jefe").mac(b'w', b"hat do ya want for nothing?");
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}

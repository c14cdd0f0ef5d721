//! HMAC-SHA256 (RFC 2104) for a key that makes many MACs: the SHA-256 states after the key's
//! inner and outer pad blocks are computed once, so each MAC of a prefix byte and an `n`-byte
//! message costs only the compressions of its own blocks (`(n + 10) / 64` rounded up, plus one
//! for the outer hash): three for a value of about 100 bytes, where a general HMAC context also
//! copies its keyed state and buffers each update. The compression function is the `sha2` crate's (SHA-NI where the CPU
//! has it). The result is exactly HMAC-SHA256; the tests check it against AWS-LC's HMAC for every
//! message length across several block boundaries.
//!
//! Blind index terms are made with it (blind_index.rs). The states are as secret as the key: they
//! are computed in place on the heap (moving a key moves a pointer) and zeroized on drop; each MAC
//! zeroizes its copies of them, the message block it copied on the stack and the inner digest.
//! (sha2's software fallback, used only on CPUs without SHA extensions, keeps its message
//! schedule on its own stack frame, which it does not wipe.)

use sha2::digest::consts::U64;
use sha2::digest::generic_array::GenericArray;
use zeroize::{ZeroizeOnDrop, Zeroizing};

/// The MAC keys immuta uses: 32 bytes (HKDF-SHA256 output).
pub const KEY_LEN: usize = 32;

/// SHA-256's block size in bytes.
const BLOCK: usize = 64;

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const IV: [u32; 8] =
    [0x6a09_e667, 0xbb67_ae85, 0x3c6e_f372, 0xa54f_f53a, 0x510e_527f, 0x9b05_688c, 0x1f83_d9ab, 0x5be0_cd19];

fn compress(state: &mut [u32; 8], block: &[u8]) {
    sha2::compress256(state, core::slice::from_ref(GenericArray::<u8, U64>::from_slice(block)));
}

/// The keyed states of HMAC-SHA256 under one key. No `Debug`, no `Clone`, no public `zeroize`
/// (a zeroized key would go on making MACs).
#[derive(ZeroizeOnDrop)]
pub struct HmacSha256 {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl HmacSha256 {
    /// The states for `key`, computed where they stay.
    pub fn new(key: &[u8; KEY_LEN]) -> Box<HmacSha256> {
        let mut mac = Box::new(HmacSha256 { inner: IV, outer: IV });
        let mut pad = Zeroizing::new([0u8; BLOCK]);
        for (byte, state) in [(0x36u8, &mut mac.inner), (0x5c, &mut mac.outer)] {
            pad.fill(byte);
            pad.iter_mut().zip(key).for_each(|(p, k)| *p ^= k);
            compress(state, &pad[..]);
        }
        mac
    }

    /// HMAC-SHA256 of the message `prefix || message`.
    pub fn mac(&self, prefix: u8, message: &[u8]) -> [u8; 32] {
        let mut state = Zeroizing::new(self.inner);
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
        let mut outer = Zeroizing::new([0u8; BLOCK]);
        for (out, word) in outer.chunks_exact_mut(4).zip(state.iter()) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        drop(state);
        outer[32] = 0x80;
        outer[BLOCK - 8..].copy_from_slice(&(((BLOCK + 32) as u64) * 8).to_be_bytes());
        let mut state = Zeroizing::new(self.outer);
        compress(&mut state, &outer[..]);
        let mut tag = [0u8; 32];
        for (out, word) in tag.chunks_exact_mut(4).zip(state.iter()) {
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
        let key: [u8; KEY_LEN] = std::array::from_fn(|b| (b as u8).wrapping_mul(37) ^ 0xa5);
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
    fn keys_of_every_pattern() {
        for byte in [0x00u8, 0x0b, 0x36, 0x5c, 0xff] {
            let key = [byte; KEY_LEN];
            assert_eq!(HmacSha256::new(&key).mac(7, b"Hi There").to_vec(), reference(&key, 7, b"Hi There"));
        }
    }

    /// RFC 4231, test case 1 (key 0x0b x 20, "Hi There"), the key zero-padded to 32 bytes (HMAC
    /// pads a short key with zeros to the block, so it is the same key), the prefix taken as the
    /// message's first byte.
    #[test]
    fn rfc_4231_case_1() {
        let mut key = [0u8; KEY_LEN];
        key[..20].fill(0x0b);
        let tag = HmacSha256::new(&key).mac(b'H', b"i There");
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
    }
}

// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Incremental Internet checksum updates (RFC 1624), for headers the
//! dataplane rewrites in place without a kernel helper call.

/// The checksum `check` of data in which the 32-bit word `old` became
/// `new` (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')). The one's-complement
/// sum does not depend on byte order, so all three may be taken in the
/// host's order, as long as each 16-bit half of a word is a 16-bit word of
/// the data (true for a `u32` and a `u16` read from the same buffer).
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IPv4 header checksum computed from scratch, over native-order
    /// 16-bit words, with the checksum field (bytes 10..12) taken as zero.
    fn full(header: &[u8; 20]) -> u16 {
        let mut sum = 0u32;
        for (i, pair) in header.chunks(2).enumerate() {
            if i != 5 {
                sum += u32::from(u16::from_ne_bytes([pair[0], pair[1]]));
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn csum_replace4_matches_a_full_recompute_for_every_address_change() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..100_000 {
            let mut header = [0u8; 20];
            for chunk in header.chunks_mut(8) {
                let bytes = next().to_ne_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
            // Edge values too: all-zero and all-ones addresses.
            let new = match case % 5 {
                0 => 0,
                1 => u32::MAX,
                _ => next() as u32,
            };
            let check = full(&header);
            header[10..12].copy_from_slice(&check.to_ne_bytes());
            for at in [12, 16] {
                let mut h = header;
                let old = u32::from_ne_bytes(h[at..at + 4].try_into().unwrap());
                h[at..at + 4].copy_from_slice(&new.to_ne_bytes());
                let updated = replace4(check, old, new);
                let expected = full(&h);
                // 0x0000 and 0xffff are the same one's-complement value.
                assert!(
                    updated == expected
                        || (updated ^ expected == 0xffff && updated & expected == 0),
                    "case {case}, address at {at}: incremental {updated:#06x} must equal recomputed {expected:#06x}"
                );
            }
        }
    }
}

//! The one seeded generator of the test suites and the benches
//! (SplitMix64): random enough to spread inputs, and the same sequence for a
//! seed on every machine, so a failure replays.

/// SplitMix64: tiny, fast, and the same sequence on every machine, so a
/// seed replays a run.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for item `index` of stream `stream`, independent of how
    /// much randomness the items before it used (one packet of a program).
    pub fn for_item(seed: u64, stream: u64, index: u64) -> Self {
        let mut base = Self(seed ^ stream.wrapping_mul(0xa076_1d64_78bd_642f));
        let mix = base.u64();
        Self(mix ^ index.wrapping_mul(0xe703_7ed1_a0b4_28db))
    }

    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }

    /// A number in `0..n` (`n` > 0) over 128 bits.
    pub fn below128(&mut self, n: u128) -> u128 {
        (u128::from(self.u64()) << 64 | u128::from(self.u64())) % n
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn u8(&mut self) -> u8 {
        self.u64() as u8
    }

    pub fn u16(&mut self) -> u16 {
        self.u64() as u16
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        for chunk in out.chunks_mut(8) {
            let word = self.u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        out
    }
}

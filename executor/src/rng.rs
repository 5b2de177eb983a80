//! A small seeded random number generator (xoshiro256**, seeded through SplitMix64).
//!
//! Random weights and sampling must be reproducible from a seed across runs, machines and thread
//! counts; a few lines of a well-known generator do that without another dependency.

/// Combines a seed with a stream index into a new, well-mixed seed (SplitMix64 finaliser), so that
/// parallel chunks get independent generators.
pub fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256** generator.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut s = [0u64; 4];
        for (i, word) in s.iter_mut().enumerate() {
            *word = mix(seed, i as u64 + 1);
        }
        if s == [0; 4] {
            s[0] = 1;
        }
        Rng { s }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), 24 bits of resolution.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [0, 1), 53 bits of resolution.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [lo, hi).
    pub fn range_u32(&mut self, lo: u32, hi: u32) -> u32 {
        debug_assert!(lo < hi);
        lo + (((self.next_u64() >> 32) * (hi - lo) as u64) >> 32) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_floats_cover_the_unit_interval_evenly() {
        let mut rng = Rng::new(1);
        let mut buckets = [0usize; 10];
        for _ in 0..100_000 {
            let x = rng.next_f32();
            assert!((0.0..1.0).contains(&x));
            buckets[(x * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((9_000..11_000).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn integer_range_stays_in_bounds_and_depends_on_seed() {
        let mut a = Rng::new(5);
        let mut b = Rng::new(6);
        let xs: Vec<u32> = (0..50).map(|_| a.range_u32(4, 9)).collect();
        let ys: Vec<u32> = (0..50).map(|_| b.range_u32(4, 9)).collect();
        assert!(xs.iter().all(|x| (4..9).contains(x)));
        assert_ne!(xs, ys);
    }
}

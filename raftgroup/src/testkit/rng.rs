//! A small seeded pseudo-random generator for simulations: SplitMix64.
//!
//! Simulations must replay bit for bit from a seed on every platform and every version of the
//! crate, so they use this generator (whose output is fixed here forever) and never a library's
//! or the operating system's.

/// SplitMix64 (Steele, Lea & Flood): 64 bits of state, passes BigCrush, trivially seedable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimRng {
    state: u64,
}

impl SimRng {
    /// A generator whose whole output is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        SimRng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound`; `bound` must not be zero.
    ///
    /// Uses the high half of a 128-bit product (Lemire), whose bias is below 2⁻⁶⁴ × `bound`:
    /// irrelevant for a simulation.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "below(0) has no answer");
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        assert!(low <= high, "empty range {low}..={high}");
        match (high - low).checked_add(1) {
            Some(span) => low + self.below(span),
            None => self.next_u64(),
        }
    }

    /// True with probability `percent` / 100 (always for 100 or more).
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// True with probability `numerator` / `denominator`.
    pub fn ratio(&mut self, numerator: u64, denominator: u64) -> bool {
        self.below(denominator) < numerator
    }

    /// An index into a collection of `len` items; `len` must not be zero.
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// An independent generator for a sub-system, so that one sub-system drawing more or fewer
    /// numbers does not shift every other's sequence.
    #[must_use]
    pub fn fork(&mut self) -> SimRng {
        SimRng::new(self.next_u64())
    }

    /// Shuffles `items` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for last in (1..items.len()).rev() {
            items.swap(last, self.index(last + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SimRng;

    #[test]
    fn the_sequence_is_fixed_forever() {
        // SplitMix64 seeded with 1234567, as the reference algorithm computes it.
        let mut rng = SimRng::new(1_234_567);
        let expected = [
            6_457_827_717_110_365_317,
            3_203_168_211_198_807_973,
            9_817_491_932_198_370_423,
            4_593_380_528_125_082_431,
            16_408_922_859_458_223_821,
        ];
        for value in expected {
            assert_eq!(rng.next_u64(), value);
        }
    }

    #[test]
    fn bounded_draws_stay_in_bounds_and_cover_them() {
        let mut rng = SimRng::new(7);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let value = rng.between(5, 14);
            assert!((5..=14).contains(&value));
            seen[(value - 5) as usize] += 1;
        }
        assert!(seen.iter().all(|&count| (800..1_200).contains(&count)), "{seen:?}");
        assert_eq!(rng.between(3, 3), 3);
        let _ = rng.between(0, u64::MAX);
        let hits = (0..10_000).filter(|_| rng.percent(30)).count();
        assert!((2_700..3_300).contains(&hits), "{hits}");
        assert!(!rng.percent(0));
        assert!(rng.percent(100));
    }

    #[test]
    fn forks_and_shuffles_are_deterministic() {
        let mut first = SimRng::new(42);
        let mut second = SimRng::new(42);
        assert_eq!(first.fork().next_u64(), second.fork().next_u64());
        let mut items: Vec<u32> = (0..20).collect();
        let mut again = items.clone();
        first.shuffle(&mut items);
        second.shuffle(&mut again);
        assert_eq!(items, again);
        assert_ne!(items, (0..20).collect::<Vec<_>>());
        items.sort_unstable();
        assert_eq!(items, (0..20).collect::<Vec<_>>());
    }
}

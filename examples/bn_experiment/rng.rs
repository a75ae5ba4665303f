//! A seeded random number generator (SplitMix64) for the weight initialization and the
//! batch order: small, fast, and the same sequence on every platform.

/// SplitMix64 (Steele, Lea & Flood 2014): one 64-bit state, a full-period Weyl sequence
/// through a mixing function. Plenty for initialization and shuffling.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x6A09_E667_F3BC_C908,
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in the open interval (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller; one of the pair is dropped, which keeps this stateless).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform in 0..n (n > 0), by Lemire's multiply-shift (bias below 2⁻⁶⁴·n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Mini-batches of example indices: a fresh seeded permutation each epoch, so two
/// networks given the same seed see exactly the same batches in the same order.
#[derive(Clone, Debug)]
pub struct Batches {
    rng: Rng,
    order: Vec<usize>,
    next: usize,
}

impl Batches {
    /// Batches over `0..len`, shuffled by `seed`.
    pub fn new(len: usize, seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            order: (0..len).collect(),
            next: len,
        }
    }

    /// The next `size` indices (`size` ≤ len); an epoch's incomplete tail is dropped and a
    /// new permutation drawn.
    pub fn next_batch(&mut self, size: usize) -> &[usize] {
        if self.next + size > self.order.len() {
            self.rng.shuffle(&mut self.order);
            self.next = 0;
        }
        let batch = &self.order[self.next..self.next + size];
        self.next += size;
        batch
    }
}

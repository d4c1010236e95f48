//! Random numbers with algorithms fixed by this crate, so that a seed means the same model and
//! the same data on every machine and every version of every dependency.
//!
//! - [`counter_hash`]: a counter-based generator (a stateless hash of a key and a counter), so
//!   any embedding row's initial value is a pure function of (seed, table, row) and can be
//!   materialised lazily, in any order, by any thread.
//! - [`SplitMix64`]: a small sequential generator (Steele, Lea & Flood, 2014) for data.
//! - [`Zipf`]: Zipf-distributed ranks by rejection-inversion (Hörmann & Derflinger, 1996).

/// The SplitMix64 output function: a bijective 64-bit mixer with full avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Derives a key from a seed and a list of identifiers (table, row, ...).
#[inline]
pub fn derive_key(seed: u64, ids: &[u64]) -> u64 {
    ids.iter().fold(mix64(seed ^ GOLDEN), |k, &id| {
        mix64(k ^ id.wrapping_mul(GOLDEN))
    })
}

/// The `counter`-th 64-bit value of the stream `key`.
#[inline]
pub fn counter_hash(key: u64, counter: u64) -> u64 {
    mix64(key.wrapping_add(counter.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// A uniform f32 in [0, 1) from the top 24 bits of `bits`.
#[inline]
pub fn unit_f32(bits: u64) -> f32 {
    (bits >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// A uniform f64 in [0, 1) from the top 53 bits of `bits`.
#[inline]
pub fn unit_f64(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Sequential generator: SplitMix64.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 {
            state: mix64(seed ^ GOLDEN),
        }
    }

    /// The generator's whole state (to save and restore it).
    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn from_state(state: u64) -> Self {
        SplitMix64 { state }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// Uniform in [0, 1).
    #[inline]
    pub fn unit_f32(&mut self) -> f32 {
        unit_f32(self.next_u64())
    }

    /// Uniform in [0, 1).
    #[inline]
    pub fn unit_f64(&mut self) -> f64 {
        unit_f64(self.next_u64())
    }

    /// Uniform in [lo, hi).
    #[inline]
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit_f32()
    }

    /// Uniform integer in [0, n), n > 0 (Lemire's multiply-shift, bias below 2^-32 for the
    /// sizes used here).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal (Box-Muller; one of the pair is discarded for simplicity).
    pub fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.unit_f64(); // (0, 1]
        let u2 = self.unit_f64();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Bernoulli(p).
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.unit_f64() < p
    }
}

/// Zipf(s) over ranks 1..=n: P(k) proportional to k^-s, s > 0. Rejection-inversion sampling
/// (W. Hörmann, G. Derflinger, "Rejection-inversion to generate variates from monotone discrete
/// distributions", ACM TOMACS 6(3), 1996): O(1) per sample, no table of size n.
#[derive(Clone, Debug)]
pub struct Zipf {
    n: f64,
    s: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    threshold: f64,
}

impl Zipf {
    pub fn new(n: u64, s: f64) -> Zipf {
        assert!(n >= 1, "Zipf needs at least one rank");
        assert!(s > 0.0 && s.is_finite(), "Zipf exponent must be positive");
        let mut z = Zipf {
            n: n as f64,
            s,
            h_integral_x1: 0.0,
            h_integral_n: 0.0,
            threshold: 0.0,
        };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(z.n + 0.5);
        z.threshold = 2.0 - z.h_integral_inv(z.h_integral(2.5) - z.h(2.0));
        z
    }

    /// A rank in 1..=n.
    pub fn sample(&self, rng: &mut SplitMix64) -> u64 {
        loop {
            let u = self.h_integral_n + rng.unit_f64() * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inv(u);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            if k - x <= self.threshold || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }

    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }

    /// Integral of h: ((x^(1-s)) - 1) / (1 - s), stable as s -> 1 (then ln x).
    fn h_integral(&self, x: f64) -> f64 {
        let lx = x.ln();
        helper_expm1_over_x((1.0 - self.s) * lx) * lx
    }

    fn h_integral_inv(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        (helper_ln1p_over_x(t) * x).exp()
    }
}

/// (e^x - 1) / x, 1 at x = 0.
fn helper_expm1_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
    }
}

/// ln(1 + x) / x, 1 at x = 0.
fn helper_ln1p_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// A bijection of [0, n): rank r goes to (r * p + c) mod n with p coprime to n, so Zipf ranks
/// (hot ids first) are spread over the whole table instead of crowding its first pages.
#[derive(Clone, Copy, Debug)]
pub struct RankScatter {
    n: u64,
    p: u64,
    c: u64,
}

impl RankScatter {
    pub fn new(n: u64, key: u64) -> RankScatter {
        assert!(n > 0);
        let gcd = |mut a: u64, mut b: u64| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        // A large odd multiplier near n * golden ratio, nudged until coprime to n.
        let mut p = ((n as f64 * 0.618_033_988_75) as u64 | 1).max(1);
        while gcd(p, n) != 1 {
            p += 2;
        }
        RankScatter {
            n,
            p: p % n.max(1),
            c: mix64(key) % n,
        }
    }

    #[inline]
    pub fn map(&self, rank: u64) -> u64 {
        ((rank as u128 * self.p as u128 + self.c as u128) % self.n as u128) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_scatter_is_a_bijection() {
        for n in [1u64, 2, 3, 10, 97, 1000, 1024] {
            let s = RankScatter::new(n, 7);
            let mut seen = vec![false; n as usize];
            for r in 0..n {
                let id = s.map(r) as usize;
                assert!(!seen[id], "n={n}: {id} hit twice");
                seen[id] = true;
            }
        }
    }

    #[test]
    fn zipf_frequencies_follow_the_power_law() {
        let z = Zipf::new(1000, 1.05);
        let mut rng = SplitMix64::new(1);
        let mut counts = vec![0u32; 1001];
        let draws = 200_000;
        for _ in 0..draws {
            counts[z.sample(&mut rng) as usize] += 1;
        }
        let norm: f64 = (1..=1000).map(|k| (k as f64).powf(-1.05)).sum();
        for k in [1usize, 2, 10] {
            let expect = draws as f64 * (k as f64).powf(-1.05) / norm;
            let got = counts[k] as f64;
            assert!(
                (got - expect).abs() < 5.0 * expect.sqrt() + 1.0,
                "rank {k}: {got} vs {expect}"
            );
        }
    }

    #[test]
    fn counter_hash_is_a_pure_function() {
        let k = derive_key(42, &[3, 17]);
        assert_eq!(
            counter_hash(k, 5),
            counter_hash(derive_key(42, &[3, 17]), 5)
        );
        assert_ne!(counter_hash(k, 5), counter_hash(k, 6));
        assert_ne!(k, derive_key(42, &[17, 3]));
    }
}

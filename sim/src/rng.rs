//! The run's randomness: one seed, split into independent streams so that
//! adding a draw to the workload does not shift the network's faults.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Probabilities are in parts per million, so that every knob is an integer
/// and a run never depends on floating-point rounding.
pub(crate) const MILLION: u32 = 1_000_000;

/// A seeded stream.
pub struct SimRng(ChaCha8Rng);

impl SimRng {
    /// Stream `stream` of run `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Self(rng)
    }

    /// A uniform value in `low..=high` (`low` if the range is empty).
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.0.next_u64() % (high - low + 1)
    }

    /// True with probability `ppm` parts per million.
    pub fn chance(&mut self, ppm: u32) -> bool {
        (self.0.next_u32() % MILLION) < ppm
    }

    /// An index below `len` (which must not be zero).
    pub fn index(&mut self, len: usize) -> usize {
        (self.0.next_u64() % len.max(1) as u64) as usize
    }

    /// 32 random bytes (seeds for identities and engine RNGs).
    pub fn bytes32(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        self.0.fill_bytes(&mut out);
        out
    }
}

/// The streams of one run.
pub(crate) mod stream {
    /// Knobs.
    pub(crate) const KNOBS: u64 = 0;
    /// Identities and engine RNGs.
    pub(crate) const KEYS: u64 = 1;
    /// Latency, loss, duplication.
    pub(crate) const NETWORK: u64 = 2;
    /// The fault schedule.
    pub(crate) const FAULTS: u64 = 3;
    /// API operations.
    pub(crate) const WORKLOAD: u64 = 4;
}

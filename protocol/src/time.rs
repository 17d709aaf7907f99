//! The one time type that flows into the core.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as the driver's clock reported it.
///
/// The core never reads a clock: every operation that needs the time takes a
/// `Timestamp` argument, so the same inputs always give the same outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// A timestamp from milliseconds since the Unix epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Whole seconds since the Unix epoch (the unit of the REST API).
    pub const fn as_secs(self) -> u64 {
        self.0 / 1000
    }

    /// `self + millis`, saturating at the end of time.
    pub const fn saturating_add_millis(self, millis: u64) -> Self {
        Self(self.0.saturating_add(millis))
    }

    /// How many milliseconds `self` is after `earlier` (zero if it is not).
    pub const fn millis_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

//! Persisting the core's state: every stateful type turns into bytes for the
//! store and back.
//!
//! The bytes hold secrets. They are returned in `Zeroizing` buffers, and a
//! store must seal them before they reach disk (the SQLite store encrypts
//! them with the node's master key). Layout: one version byte, then postcard.

use serde::de::DeserializeOwned;
use serde::Serialize;
use zeroize::Zeroizing;

/// The version of the state encoding.
pub const STATE_VERSION: u8 = 1;

/// Why stored state could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The bytes were written by another state version.
    #[error("stored state has version {0}; this build reads version {STATE_VERSION}")]
    UnsupportedVersion(u8),
    /// The bytes do not decode.
    #[error("stored {what} does not decode: {reason}")]
    Malformed {
        /// Which state.
        what: &'static str,
        /// What failed.
        reason: String,
    },
    /// A stored public key is not valid.
    #[error("stored {0} is not a valid key")]
    InvalidKey(&'static str),
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(vec![STATE_VERSION]);
    match postcard::to_io(value, &mut *out) {
        Ok(_) => out,
        Err(_) => unreachable!("postcard serialisation into a Vec is infallible for state types"),
    }
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, StateError> {
    let (&version, rest) = bytes.split_first().ok_or(StateError::Malformed { what, reason: "empty".into() })?;
    if version != STATE_VERSION {
        return Err(StateError::UnsupportedVersion(version));
    }
    let (value, rest) =
        postcard::take_from_bytes::<T>(rest).map_err(|e| StateError::Malformed { what, reason: e.to_string() })?;
    if !rest.is_empty() {
        return Err(StateError::Malformed { what, reason: format!("{} trailing bytes", rest.len()) });
    }
    Ok(value)
}

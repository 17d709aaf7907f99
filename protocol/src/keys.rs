//! Small secret key types, each with one job.
//!
//! Every type here lives in a boxed fixed-size array, is zeroized on drop, and
//! prints as `Name(..)` so that no log or panic message can carry key bytes.

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub struct $name(Box<[u8; 32]>);

        impl $name {
            /// Wraps 32 secret bytes.
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                let key = Self(Box::new(bytes));
                let mut bytes = bytes;
                bytes.zeroize();
                key
            }

            /// The secret bytes; handle with care.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        /// Constant-time comparison, so that comparing keys leaks nothing
        /// about where they differ.
        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.0.ct_eq(&*other.0).into()
            }
        }

        impl Eq for $name {}

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(concat!(stringify!($name), "(..)"))
            }
        }
    };
}

secret_key!(
    /// The Double Ratchet root key, updated at every DH ratchet step.
    RootKey
);
secret_key!(
    /// A Double Ratchet sending or receiving chain key.
    ChainKey
);
secret_key!(
    /// A Double Ratchet message key: used for exactly one message.
    MessageKey
);
secret_key!(
    /// A Sender Keys chain key.
    SenderChainKey
);
secret_key!(
    /// A Sender Keys message key: used for exactly one group message.
    SenderMessageKey
);
secret_key!(
    /// The XSalsa20-Poly1305 key of one message.
    CipherKey
);
secret_key!(
    /// The HMAC key authenticating one ratchet message's header.
    HeaderKey
);
secret_key!(
    /// An Ed25519 identity's 32-byte secret seed (RFC 8032 secret key).
    IdentitySeed
);
secret_key!(
    /// An X25519 secret scalar, as drawn (before clamping).
    X25519Secret
);

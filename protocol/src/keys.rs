//! Small secret key types, each with one job.
//!
//! Every type here lives in a boxed fixed-size array, is zeroized on drop, and
//! prints as `Name(..)` so that no log or panic message can carry key bytes.

use zeroize::{Zeroize, ZeroizeOnDrop};

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
        pub struct $name(Box<[u8; 32]>);

        impl $name {
            /// Wraps 32 secret bytes.
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                let key = Self(Box::new(bytes));
                let mut bytes = bytes;
                bytes.zeroize();
                key
            }

            // Not every key type is built from a KDF's split output.
            #[allow(dead_code)]
            pub(crate) fn from_slice(bytes: &[u8]) -> Self {
                let mut key = Self(Box::new([0u8; 32]));
                key.0.copy_from_slice(bytes);
                key
            }

            /// The secret bytes; handle with care.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

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

//! NaCl secretbox (XSalsa20-Poly1305), the one cipher of the protocol.

use crypto_secretbox::aead::{Aead, KeyInit};
use crypto_secretbox::XSalsa20Poly1305;
use zeroize::Zeroizing;

use crate::keys::CipherKey;

/// Encrypts: the output is Poly1305 tag (16) ‖ ciphertext, as NaCl's
/// `crypto_secretbox_easy`.
pub(crate) fn seal(key: &CipherKey, nonce: &[u8; 24], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XSalsa20Poly1305::new(key.as_bytes().into());
    match cipher.encrypt(nonce.into(), plaintext) {
        Ok(ciphertext) => ciphertext,
        // Only inputs beyond 256 GiB can fail; the envelope limit is far lower.
        Err(_) => unreachable!("secretbox encryption of a bounded message cannot fail"),
    }
}

/// Decrypts and authenticates; `None` when the tag does not verify.
pub(crate) fn open(key: &CipherKey, nonce: &[u8; 24], ciphertext: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let cipher = XSalsa20Poly1305::new(key.as_bytes().into());
    cipher.decrypt(nonce.into(), ciphertext).ok().map(Zeroizing::new)
}

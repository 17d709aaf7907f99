//! Sealing at rest: NaCl secretbox under a master key derived from the
//! node's identity key, held only in memory.

use crypto_secretbox::aead::{Aead, KeyInit};
use crypto_secretbox::{Nonce, XSalsa20Poly1305};
use rand_core::{OsRng, RngCore};
use zeroize::{Zeroize, Zeroizing};

use p2pchat_protocol::keys::IdentitySeed;

/// HKDF-SHA256 `info` of the storage master key.
pub const MASTER_KEY_INFO: &[u8] = b"p2pchat/v1/storage-master-key";
/// HKDF-SHA256 salt of the storage master key.
pub const MASTER_KEY_SALT: &[u8] = b"p2pchat/v1/storage";
const NONCE_LEN: usize = 24;

/// The key every sealed column is sealed under. Zeroized on drop; never
/// printed.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl core::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// HKDF-SHA256 of the node's Ed25519 private key (its seed), so the key
    /// needs no storage of its own: whoever holds the identity key file can
    /// open the database, and nobody else.
    pub fn derive(identity: &IdentitySeed) -> Self {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(MASTER_KEY_SALT), identity.as_bytes());
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8,160-byte limit.
        if hk.expand(MASTER_KEY_INFO, &mut key[..]).is_err() {
            unreachable!("HKDF-SHA256 can always produce 32 bytes");
        }
        Self(key)
    }

    /// `nonce ‖ secretbox(label ‖ row ‖ plaintext)`. The label and the row's
    /// key inside the box tie a sealed value to its place: one copied into
    /// another row or table does not open.
    pub(crate) fn seal(&self, label: &[u8], row: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        // Labels are constants and row keys IDs (at most 40 bytes): a byte
        // holds either length.
        debug_assert!(label.len() <= 255 && row.len() <= 255);
        let mut framed = Zeroizing::new(Vec::with_capacity(label.len() + row.len() + plaintext.len() + 2));
        framed.push(label.len() as u8);
        framed.extend_from_slice(label);
        framed.push(row.len() as u8);
        framed.extend_from_slice(row);
        framed.extend_from_slice(plaintext);
        let cipher = XSalsa20Poly1305::new(self.0.as_ref().into());
        let mut out = nonce.to_vec();
        match cipher.encrypt(Nonce::from_slice(&nonce), framed.as_slice()) {
            Ok(ct) => out.extend_from_slice(&ct),
            Err(_) => unreachable!("secretbox encryption cannot fail for in-memory input"),
        }
        nonce.zeroize();
        out
    }

    /// Opens a value sealed for this label and row; `None` if it does not
    /// authenticate or belongs elsewhere.
    pub(crate) fn open(&self, label: &[u8], row: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let cipher = XSalsa20Poly1305::new(self.0.as_ref().into());
        let plain = Zeroizing::new(cipher.decrypt(Nonce::from_slice(nonce), ct).ok()?);
        let (&label_len, rest) = plain.split_first()?;
        let (got_label, rest) = rest.split_at_checked(label_len as usize)?;
        let (&row_len, rest) = rest.split_first()?;
        let (got_row, body) = rest.split_at_checked(row_len as usize)?;
        if got_label != label || got_row != row {
            return None;
        }
        Some(Zeroizing::new(body.to_vec()))
    }
}

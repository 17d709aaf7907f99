//! The identity key file: created once inside the data directory with mode
//! 0600, re-used afterwards, never silently replaced.
//!
//! Format (72 bytes): `"p2pchat-identity-v1\n"` (20 bytes) ‖ the Ed25519
//! seed (32 bytes) ‖ the first 20 bytes of SHA-256 over both, so a
//! truncated or corrupted file is recognised as such.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use p2pchat_protocol::keys::IdentitySeed;
use p2pchat_protocol::IdentityKeyPair;

use crate::StorageError;

/// The file's name inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";
const MAGIC: &[u8; 20] = b"p2pchat-identity-v1\n";
const FILE_LEN: usize = 20 + 32 + 20;

fn checksum(seed: &[u8; 32]) -> [u8; 20] {
    let mut h = Sha256::new();
    h.update(MAGIC);
    h.update(seed);
    let digest = h.finalize();
    let mut out = [0u8; 20];
    out.copy_from_slice(&digest[..20]);
    out
}

/// Loads the node's identity from `dir`, creating it on first start.
pub fn load_or_create_identity(dir: &Path) -> Result<IdentityKeyPair, StorageError> {
    let path = dir.join(IDENTITY_FILE);
    match fs::symlink_metadata(&path) {
        Ok(_) => load_identity(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_identity(dir, &path),
        Err(e) => Err(StorageError::Io { path, reason: e.to_string() }),
    }
}

/// Loads an existing identity file, refusing one that others may read or
/// that is not intact.
pub fn load_identity(path: &Path) -> Result<IdentityKeyPair, StorageError> {
    let io = |e: std::io::Error| StorageError::Io { path: path.to_owned(), reason: e.to_string() };
    let meta = fs::symlink_metadata(path).map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(StorageError::IdentityFile {
            path: path.to_owned(),
            problem: "is not a regular file (a symlink or directory is not accepted)".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StorageError::IdentityFile {
            path: path.to_owned(),
            problem: format!("has mode {mode:o}; it must be readable by its owner only (chmod 600)"),
        });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(FILE_LEN));
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io)?;
    if bytes.len() != FILE_LEN || &bytes[..20] != MAGIC {
        return Err(StorageError::IdentityFile {
            path: path.to_owned(),
            problem: format!("is not a p2pchat identity file ({} bytes); it was not replaced", bytes.len()),
        });
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    seed.copy_from_slice(&bytes[20..52]);
    if bytes[52..] != checksum(&seed) {
        return Err(StorageError::IdentityFile {
            path: path.to_owned(),
            problem: "is corrupt (its checksum does not match); it was not replaced".into(),
        });
    }
    Ok(IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(*seed)))
}

fn create_identity(dir: &Path, path: &Path) -> Result<IdentityKeyPair, StorageError> {
    let io = |p: &Path, e: std::io::Error| StorageError::Io { path: p.to_owned(), reason: e.to_string() };
    if !dir.exists() {
        // The data directory holds the key and the databases: its owner only.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| io(dir, e))?;
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(&mut seed[..]);
    let mut contents = Zeroizing::new(Vec::with_capacity(FILE_LEN));
    contents.extend_from_slice(MAGIC);
    contents.extend_from_slice(&seed[..]);
    contents.extend_from_slice(&checksum(&seed));
    // Written beside, synced, then renamed into place: a crash leaves
    // either no file or a whole one, never a torn one to be refused.
    let temp: PathBuf = dir.join(format!("{IDENTITY_FILE}.new"));
    let _ = fs::remove_file(&temp);
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp).map_err(|e| io(&temp, e))?;
    file.write_all(&contents).and_then(|()| file.sync_all()).map_err(|e| io(&temp, e))?;
    drop(file);
    // Never over an identity that appeared meanwhile (another process).
    fs::hard_link(&temp, path).map_err(|e| io(path, e))?;
    let _ = fs::remove_file(&temp);
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
    Ok(IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(*seed)))
}

//! The identity key file: created once inside the data directory with mode
//! 0600, re-used afterwards, never silently replaced.
//!
//! Format (72 bytes): `"p2pchat-identity-v1\n"` (20 bytes) ‖ the Ed25519
//! seed (32 bytes) ‖ the first 20 bytes of SHA-256 over both, so a
//! truncated or corrupted file is recognised as such.
//!
//! Wrapped under a passphrase (117 bytes): `"p2pchat-identity-v2\n"` ‖
//! scrypt's `log_n` (1 byte), `r` and `p` (4 bytes each, big-endian) ‖ a
//! 16-byte salt ‖ a 24-byte nonce ‖ XSalsa20-Poly1305 (the secretbox) of the
//! seed under the 32 bytes scrypt derives from the passphrase and salt. A
//! wrong passphrase, or any altered byte, fails the box's authentication.

use std::fs::{self, File, OpenOptions};

use crypto_secretbox::aead::{Aead, KeyInit};
use crypto_secretbox::XSalsa20Poly1305;
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
const WRAPPED_MAGIC: &[u8; 20] = b"p2pchat-identity-v2\n";
const WRAPPED_LEN: usize = 20 + 1 + 4 + 4 + 16 + 24 + 32 + 16;

/// scrypt's cost for new wrappings: 2^17 × 8 × 128 bytes (128 MiB) of
/// memory, about a second here; it is paid once per start.
const SCRYPT_LOG_N: u8 = 17;
const SCRYPT_R: u32 = 8;
const SCRYPT_P: u32 = 1;

/// A passphrase that wraps the identity key: zeroized when dropped, never
/// printed.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl Passphrase {
    /// A passphrase from its bytes (a trailing newline, as a line read from
    /// a terminal or a file has, is not part of it). An empty one is
    /// refused.
    pub fn new(mut bytes: Vec<u8>) -> Result<Self, StorageError> {
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(StorageError::EmptyPassphrase);
        }
        Ok(Self(Zeroizing::new(bytes)))
    }
}

impl Passphrase {
    /// Whether two passphrases are the same (compared in constant time).
    pub fn same_as(&self, other: &Passphrase) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(other.0.iter()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
    }
}

impl core::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

/// The secretbox key scrypt derives from a passphrase.
fn wrapping_key(
    passphrase: &Passphrase,
    salt: &[u8],
    log_n: u8,
    r: u32,
    p: u32,
    path: &Path,
) -> Result<Zeroizing<[u8; 32]>, StorageError> {
    let bad = |problem: String| StorageError::IdentityFile { path: path.to_owned(), problem };
    // A file names its cost, and whoever can write it could name one that
    // takes gigabytes or minutes: at most twice the memory and work this
    // version writes.
    if !(10..=SCRYPT_LOG_N + 1).contains(&log_n) || r != SCRYPT_R || p != SCRYPT_P {
        return Err(bad(format!("asks for an scrypt cost this node refuses (log_n {log_n}, r {r}, p {p})")));
    }
    let params =
        scrypt::Params::new(log_n, r, p, 32).map_err(|e| bad(format!("has unusable scrypt parameters: {e}")))?;
    let mut key = Zeroizing::new([0u8; 32]);
    scrypt::scrypt(&passphrase.0, salt, &params, &mut key[..]).map_err(|e| bad(format!("scrypt failed: {e}")))?;
    Ok(key)
}

fn wrap(seed: &[u8; 32], passphrase: &Passphrase, path: &Path) -> Result<Zeroizing<Vec<u8>>, StorageError> {
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 24];
    OsRng.fill_bytes(&mut salt);
    OsRng.fill_bytes(&mut nonce);
    let key = wrapping_key(passphrase, &salt, SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P, path)?;
    let sealed = XSalsa20Poly1305::new((&*key).into())
        .encrypt((&nonce).into(), &seed[..])
        .map_err(|_| StorageError::IdentityFile { path: path.to_owned(), problem: "could not be sealed".into() })?;
    let mut out = Zeroizing::new(Vec::with_capacity(WRAPPED_LEN));
    out.extend_from_slice(WRAPPED_MAGIC);
    out.push(SCRYPT_LOG_N);
    out.extend_from_slice(&SCRYPT_R.to_be_bytes());
    out.extend_from_slice(&SCRYPT_P.to_be_bytes());
    out.extend_from_slice(&salt);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

fn unwrap_seed(bytes: &[u8], passphrase: &Passphrase, path: &Path) -> Result<Zeroizing<[u8; 32]>, StorageError> {
    let log_n = bytes[20];
    let r = u32::from_be_bytes([bytes[21], bytes[22], bytes[23], bytes[24]]);
    let p = u32::from_be_bytes([bytes[25], bytes[26], bytes[27], bytes[28]]);
    let (salt, rest) = bytes[29..].split_at(16);
    let (nonce, sealed) = rest.split_at(24);
    let key = wrapping_key(passphrase, salt, log_n, r, p, path)?;
    let opened = Zeroizing::new(
        XSalsa20Poly1305::new((&*key).into())
            .decrypt(nonce.into(), sealed)
            .map_err(|_| StorageError::WrongPassphrase { path: path.to_owned() })?,
    );
    let mut seed = Zeroizing::new([0u8; 32]);
    seed.copy_from_slice(&opened);
    Ok(seed)
}

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
    load_or_create_identity_with(dir, None)
}

/// As [`load_or_create_identity`], with the passphrase that wraps the key
/// (a new identity is created wrapped under it).
pub fn load_or_create_identity_with(
    dir: &Path,
    passphrase: Option<&Passphrase>,
) -> Result<IdentityKeyPair, StorageError> {
    let path = dir.join(IDENTITY_FILE);
    match fs::symlink_metadata(&path) {
        Ok(_) => load_identity_with(&path, passphrase),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_identity(dir, &path, passphrase),
        Err(e) => Err(StorageError::Io { path, reason: e.to_string() }),
    }
}

/// Whether the identity in `dir` is wrapped under a passphrase (`false`
/// when there is none yet).
pub fn identity_is_wrapped(dir: &Path) -> Result<bool, StorageError> {
    let path = dir.join(IDENTITY_FILE);
    if fs::symlink_metadata(&path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return Ok(false);
    }
    Ok(read_identity_file(&path)?.starts_with(WRAPPED_MAGIC))
}

/// Wraps the identity in `dir` under `new`, or unwraps it (`None`),
/// opening it with `current` if it is wrapped now. The file is replaced
/// whole (written beside, synced, renamed), so a crash leaves the old one
/// or the new one.
pub fn set_identity_passphrase(
    dir: &Path,
    current: Option<&Passphrase>,
    new: Option<&Passphrase>,
) -> Result<IdentityKeyPair, StorageError> {
    let path = dir.join(IDENTITY_FILE);
    let bytes = read_identity_file(&path)?;
    let seed = seed_of(&bytes, current, &path)?;
    let contents = match new {
        Some(passphrase) => wrap(&seed, passphrase, &path)?,
        None => plain_contents(&seed),
    };
    let io = |p: &Path, e: std::io::Error| StorageError::Io { path: p.to_owned(), reason: e.to_string() };
    let temp = temp_path(dir);
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp).map_err(|e| io(&temp, e))?;
    file.write_all(&contents).and_then(|()| file.sync_all()).map_err(|e| io(&temp, e))?;
    drop(file);
    fs::rename(&temp, &path).map_err(|e| io(&path, e))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
    Ok(IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(*seed)))
}

/// Loads an existing identity file, refusing one that others may read or
/// that is not intact.
pub fn load_identity(path: &Path) -> Result<IdentityKeyPair, StorageError> {
    load_identity_with(path, None)
}

/// As [`load_identity`], opening a wrapped file with `passphrase`.
pub fn load_identity_with(path: &Path, passphrase: Option<&Passphrase>) -> Result<IdentityKeyPair, StorageError> {
    let bytes = read_identity_file(path)?;
    let seed = seed_of(&bytes, passphrase, path)?;
    Ok(IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(*seed)))
}

/// The seed in an identity file's bytes, plain or wrapped.
fn seed_of(bytes: &[u8], passphrase: Option<&Passphrase>, path: &Path) -> Result<Zeroizing<[u8; 32]>, StorageError> {
    if bytes.len() == WRAPPED_LEN && &bytes[..20] == WRAPPED_MAGIC {
        let passphrase = passphrase.ok_or_else(|| StorageError::PassphraseNeeded { path: path.to_owned() })?;
        return unwrap_seed(bytes, passphrase, path);
    }
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
    Ok(seed)
}

/// A temporary file name of this process's own beside the identity file,
/// so that two processes writing at once never share one.
fn temp_path(dir: &Path) -> PathBuf {
    let mut tag = [0u8; 8];
    OsRng.fill_bytes(&mut tag);
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{IDENTITY_FILE}.{}.{tag}.new", std::process::id()))
}

fn plain_contents(seed: &[u8; 32]) -> Zeroizing<Vec<u8>> {
    let mut contents = Zeroizing::new(Vec::with_capacity(FILE_LEN));
    contents.extend_from_slice(MAGIC);
    contents.extend_from_slice(&seed[..]);
    contents.extend_from_slice(&checksum(seed));
    contents
}

/// The identity file's bytes, if it is a regular file only its owner may read.
fn read_identity_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, StorageError> {
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
    let mut bytes = Zeroizing::new(Vec::with_capacity(WRAPPED_LEN));
    File::open(path).and_then(|f| f.take(4096).read_to_end(&mut bytes)).map_err(io)?;
    Ok(bytes)
}

fn create_identity(dir: &Path, path: &Path, passphrase: Option<&Passphrase>) -> Result<IdentityKeyPair, StorageError> {
    let io = |p: &Path, e: std::io::Error| StorageError::Io { path: p.to_owned(), reason: e.to_string() };
    if !dir.exists() {
        // The data directory holds the key and the databases: its owner only.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| io(dir, e))?;
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(&mut seed[..]);
    let contents = match passphrase {
        Some(passphrase) => wrap(&seed, passphrase, path)?,
        None => plain_contents(&seed),
    };
    // Written beside, synced, then renamed into place: a crash leaves
    // either no file or a whole one, never a torn one to be refused.
    let temp = temp_path(dir);
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp).map_err(|e| io(&temp, e))?;
    file.write_all(&contents).and_then(|()| file.sync_all()).map_err(|e| io(&temp, e))?;
    drop(file);
    // Never over an identity that appeared meanwhile (another process).
    fs::hard_link(&temp, path).map_err(|e| io(path, e))?;
    let _ = fs::remove_file(&temp);
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
    Ok(IdentityKeyPair::from_seed(&IdentitySeed::from_bytes(*seed)))
}

//! Sealing under the cluster master key: envelope encryption with AES-256-GCM.
//!
//! Every sealed item gets a fresh 256-bit data key. The item is encrypted with the data key
//! (the caller's `aad` is bound to the ciphertext, so a sealed value copied to another resource
//! fails to open), and the data key is encrypted ("wrapped") with the master key. Rotating the
//! master key only re-wraps data keys ([`Sealed::rewrap`]); ciphertexts stay as they are.
//!
//! The master key lives in one file per server (`<data-dir>/master.key`, 32 raw bytes, mode
//! 0600) and never in the replicated state: only [`Sealed`] values are replicated. A key is named
//! by its [`MasterKey::key_id`] (a SHA-256 fingerprint prefix), recorded in every [`Sealed`] so a
//! server can tell which key an item needs and refuse the wrong one with a clear error.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// Length of a master key and of a data key in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// Length of an AES-GCM nonce in bytes.
pub const NONCE_LEN: usize = 12;
/// Associated data bound to every wrapped data key, so a wrapped key cannot pass for data.
const WRAP_AAD: &[u8] = b"nimbus-seal/data-key/v1";

/// Errors of loading keys and opening sealed items. Messages never contain key or plaintext bytes.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// Reading or writing a key file failed.
    #[error("master key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The key file exists but is not a valid key file (size or permissions).
    #[error("master key file {path}: {reason}")]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Key bytes of the wrong length were given.
    #[error("a master key is {KEY_LEN} bytes, got {0}")]
    BadKeyLength(usize),
    /// The item was sealed under another master key than the one given.
    #[error("sealed under master key {sealed_with}, this key is {given}")]
    WrongKey {
        /// The key id recorded in the sealed item.
        sealed_with: String,
        /// The key id of the key given.
        given: String,
    },
    /// Authentication failed: tampered ciphertext, wrong associated data or a malformed item.
    #[error(
        "sealed item failed authentication (tampered, malformed or opened with the wrong context)"
    )]
    Tampered,
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, SealError>;

/// The cluster master key. Zeroed on drop; `Debug` shows only its id.
#[derive(Clone)]
pub struct MasterKey {
    key: Zeroizing<[u8; KEY_LEN]>,
    id: String,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    /// A new random key.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        Self::from_array(key)
    }

    /// A key from its raw bytes (e.g. received from another server).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| SealError::BadKeyLength(bytes.len()))?;
        Ok(Self::from_array(Zeroizing::new(arr)))
    }

    fn from_array(key: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let digest = Sha256::digest(key.as_ref());
        let id = hex::encode(&digest[..8]);
        Self { key, id }
    }

    /// The raw key bytes (to hand the key to a joining server over an authenticated channel).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.key.to_vec())
    }

    /// The key's id: the first 8 bytes of its SHA-256, in hex. Safe to print and replicate.
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// Reads a key file: exactly [`KEY_LEN`] bytes, no permission for group or others.
    pub fn from_file(path: &Path) -> Result<Self> {
        let io = |source| SealError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SealError::BadKeyFile {
                path: path.to_path_buf(),
                reason: format!("mode {mode:04o} lets group or others read it; expected 0600"),
            });
        }
        if meta.len() != KEY_LEN as u64 {
            return Err(SealError::BadKeyFile {
                path: path.to_path_buf(),
                reason: format!("{} bytes, expected {KEY_LEN}", meta.len()),
            });
        }
        let bytes = Zeroizing::new(fs::read(path).map_err(io)?);
        Self::from_bytes(&bytes).map_err(|_| SealError::BadKeyFile {
            path: path.to_path_buf(),
            reason: format!("{} bytes, expected {KEY_LEN}", bytes.len()),
        })
    }

    /// Reads the key at `path`, or creates it (random, mode 0600) if no file is there.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        if path.exists() {
            return Self::from_file(path);
        }
        let key = Self::generate();
        match key.write_new(path) {
            Ok(()) => Ok(key),
            // Another process created it between the check and the create: use theirs.
            Err(SealError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                Self::from_file(path)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes the key to a new file (mode 0600, fsynced); fails if the file exists.
    pub fn write_new(&self, path: &Path) -> Result<()> {
        let io = |source| SealError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.write_all(self.key.as_ref()).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// Replaces the key file at `path` atomically (temp file, fsync, rename).
    pub fn replace_file(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("key.new");
        let _ = fs::remove_file(&tmp);
        self.write_new(&tmp)?;
        fs::rename(&tmp, path).map_err(|source| SealError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(self.key.as_ref()))
    }

    /// Seals `plaintext` under a fresh data key; `aad` (e.g. the resource's identity) must be
    /// given again to open it.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Sealed {
        let mut data_key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(data_key.as_mut());
        let data_cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(data_key.as_ref()));
        let nonce = random_nonce();
        let ciphertext = data_cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        Sealed {
            key_id: self.id.clone(),
            wrapped_data_key: self.wrap(&data_key),
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// Opens an item sealed under this key with the same `aad`.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let data_key = self.unwrap_key(sealed)?;
        if sealed.nonce.len() != NONCE_LEN {
            return Err(SealError::Tampered);
        }
        let data_cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(data_key.as_ref()));
        data_cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SealError::Tampered)
    }

    fn wrap(&self, data_key: &[u8; KEY_LEN]) -> Vec<u8> {
        let nonce = random_nonce();
        let mut out = nonce.to_vec();
        let wrapped = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: data_key,
                    aad: WRAP_AAD,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        out.extend_from_slice(&wrapped);
        out
    }

    fn unwrap_key(&self, sealed: &Sealed) -> Result<Zeroizing<[u8; KEY_LEN]>> {
        if sealed.key_id != self.id {
            return Err(SealError::WrongKey {
                sealed_with: sealed.key_id.clone(),
                given: self.id.clone(),
            });
        }
        if sealed.wrapped_data_key.len() <= NONCE_LEN {
            return Err(SealError::Tampered);
        }
        let (nonce, wrapped) = sealed.wrapped_data_key.split_at(NONCE_LEN);
        let mut plain = self
            .cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: wrapped,
                    aad: WRAP_AAD,
                },
            )
            .map_err(|_| SealError::Tampered)?;
        let key: std::result::Result<[u8; KEY_LEN], _> = plain.as_slice().try_into();
        plain.zeroize();
        key.map(Zeroizing::new).map_err(|_| SealError::Tampered)
    }
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

/// A sealed item: what is stored and replicated. Byte fields serialize as hex strings.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Id of the master key that wraps the data key.
    pub key_id: String,
    /// Nonce (12 bytes) followed by the data key encrypted under the master key (32 + 16 bytes).
    #[serde(with = "hex_bytes")]
    pub wrapped_data_key: Vec<u8>,
    /// Nonce of the data encryption.
    #[serde(with = "hex_bytes")]
    pub nonce: Vec<u8>,
    /// Ciphertext with its 16-byte GCM tag.
    #[serde(with = "hex_bytes")]
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

impl Sealed {
    /// The same item with its data key re-wrapped from `old` to `new`; the ciphertext is kept.
    pub fn rewrap(&self, old: &MasterKey, new: &MasterKey) -> Result<Sealed> {
        let data_key = old.unwrap_key(self)?;
        Ok(Sealed {
            key_id: new.id.clone(),
            wrapped_data_key: new.wrap(&data_key),
            nonce: self.nonce.clone(),
            ciphertext: self.ciphertext.clone(),
        })
    }

    /// Length of the plaintext this item holds (the ciphertext minus its tag).
    pub fn plaintext_len(&self) -> usize {
        self.ciphertext.len().saturating_sub(16)
    }
}

/// Master keys a server can open with: the current one seals, older ones (kept during a
/// rotation until every item is re-wrapped) only open.
#[derive(Clone, Debug)]
pub struct Keyring {
    current: MasterKey,
    previous: Vec<MasterKey>,
}

impl Keyring {
    /// A keyring with one key.
    pub fn new(current: MasterKey) -> Self {
        Self {
            current,
            previous: Vec::new(),
        }
    }

    /// The key new items are sealed with.
    pub fn current(&self) -> &MasterKey {
        &self.current
    }

    /// Makes `key` current, keeping the former current key for opening.
    pub fn rotate_to(&mut self, key: MasterKey) {
        if key.key_id() == self.current.key_id() {
            return;
        }
        let old = std::mem::replace(&mut self.current, key);
        self.previous.retain(|k| k.key_id() != old.key_id());
        self.previous.push(old);
    }

    /// Forgets every key but the current one (after all items are re-wrapped).
    pub fn retire_previous(&mut self) {
        self.previous.clear();
    }

    /// The key with this id, if held.
    pub fn get(&self, key_id: &str) -> Option<&MasterKey> {
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .find(|k| k.key_id() == key_id)
    }

    /// Seals with the current key.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Sealed {
        self.current.seal(plaintext, aad)
    }

    /// Opens with whichever held key the item names.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        match self.get(&sealed.key_id) {
            Some(key) => key.open(sealed, aad),
            None => self.current.open(sealed, aad),
        }
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;

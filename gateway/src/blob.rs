//! Blob storage: opening an `object_store` backend from a URL (`file://`, `az://`, `s3://`) and
//! the object layout. Everything about one protected machine lives under one prefix:
//!
//! ```text
//! keyring.json                                   KDF salt + verifier (no key material)
//! machines/MACHINE/disks/DISK/keys/KEYID.json    the disk's data key, wrapped by the KEK
//! machines/MACHINE/disks/DISK/segments/FIRST-LAST.lbseg
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use thiserror::Error;
use url::Url;

use crate::crypto::{CryptoError, KdfParams, Key, Keyring, WrappedKey};

#[derive(Debug, Error)]
pub enum BlobError {
    #[error("blob URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("blob store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// Opens the blob store named by `url`. `options` are object_store configuration keys
/// (e.g. `azure_storage_account_name`, `aws_endpoint`); `AZURE_*` and `AWS_*` environment
/// variables are added underneath them.
pub fn open_store(url: &str, options: &BTreeMap<String, String>) -> Result<Arc<dyn ObjectStore>, BlobError> {
    let bad = |reason: String| BlobError::Url {
        url: url.to_owned(),
        reason,
    };
    let parsed = Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if parsed.scheme() == "file" {
        let path = parsed
            .to_file_path()
            .map_err(|_| bad("not an absolute file path".into()))?;
        std::fs::create_dir_all(&path).map_err(|e| bad(format!("cannot create {}: {e}", path.display())))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&path).map_err(|e| bad(e.to_string()))?;
        return Ok(Arc::new(store));
    }
    let mut opts: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("AZURE_") || k.starts_with("AWS_"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    opts.extend(options.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())));
    let (store, prefix) = object_store::parse_url_opts(&parsed, opts).map_err(|e| bad(e.to_string()))?;
    if !prefix.as_ref().is_empty() {
        return Ok(Arc::new(object_store::prefix::PrefixStore::new(store, prefix)));
    }
    Ok(Arc::from(store))
}

/// Object paths.
pub mod layout {
    use super::Path;

    pub fn keyring() -> Path {
        Path::from("keyring.json")
    }
    pub fn machines() -> Path {
        Path::from("machines")
    }
    pub fn disk_prefix(machine: &str, disk: &str) -> Path {
        Path::from(format!("machines/{machine}/disks/{disk}"))
    }
    pub fn key(machine: &str, disk: &str, key_id: u32) -> Path {
        Path::from(format!("machines/{machine}/disks/{disk}/keys/{key_id:08}.json"))
    }
    pub fn segments(machine: &str, disk: &str) -> Path {
        Path::from(format!("machines/{machine}/disks/{disk}/segments"))
    }
    pub fn segment(machine: &str, disk: &str, first: u64, last: u64) -> Path {
        Path::from(format!(
            "machines/{machine}/disks/{disk}/segments/{first:020}-{last:020}.lbseg"
        ))
    }
    /// The manifest naming a disk's current base image (see `BaseManifest`).
    pub fn base_manifest(machine: &str, disk: &str) -> Path {
        Path::from(format!("machines/{machine}/disks/{disk}/base.json"))
    }
    pub fn base_dir(machine: &str, disk: &str) -> Path {
        Path::from(format!("machines/{machine}/disks/{disk}/base"))
    }
    pub fn base_part(machine: &str, disk: &str, generation: u64, part: u32) -> Path {
        Path::from(format!(
            "machines/{machine}/disks/{disk}/base/{generation:012}-{part:06}.lbseg"
        ))
    }
    /// The sequence range a segment name carries.
    pub fn parse_segment_name(path: &Path) -> Option<(u64, u64)> {
        let name = path.filename()?.strip_suffix(".lbseg")?;
        let (a, b) = name.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }
}

pub async fn get_json<T: serde::de::DeserializeOwned>(
    store: &dyn ObjectStore,
    path: &Path,
) -> Result<Option<T>, BlobError> {
    match store.get(path).await {
        Ok(r) => {
            let bytes = r.bytes().await?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| BlobError::Json {
                    path: path.to_string(),
                    source,
                })
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn put_json<T: serde::Serialize>(
    store: &dyn ObjectStore,
    path: &Path,
    v: &T,
    create_only: bool,
) -> Result<bool, BlobError> {
    let body = serde_json::to_vec_pretty(v).expect("serialize");
    let opts = if create_only {
        object_store::PutMode::Create.into()
    } else {
        Default::default()
    };
    match store.put_opts(path, PutPayload::from(body), opts).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Opens the store's keyring with `passphrase`, creating it on first use. Returns the KEK and
/// the keyring document (which holds no key material, so it may be cached locally).
pub async fn open_or_create_keyring(
    store: &dyn ObjectStore,
    passphrase: &str,
    new_params: impl FnOnce() -> KdfParams,
) -> Result<(Key, Keyring), BlobError> {
    if let Some(ring) = get_json::<Keyring>(store, &layout::keyring()).await? {
        let kek = open_keyring_blocking(ring.clone(), passphrase.to_owned()).await?;
        return Ok((kek, ring));
    }
    let params = new_params();
    let pass = passphrase.to_owned();
    let (kek, ring) = tokio::task::spawn_blocking(move || {
        let kek = crate::crypto::derive_kek(&pass, &params)?;
        let ring = Keyring::new(&kek, params);
        Ok::<_, CryptoError>((kek, ring))
    })
    .await
    .expect("kdf task")?;
    if put_json(store, &layout::keyring(), &ring, true).await? {
        return Ok((kek, ring));
    }
    // Someone created it first: use theirs.
    let ring = get_json::<Keyring>(store, &layout::keyring())
        .await?
        .expect("keyring exists");
    let kek = open_keyring_blocking(ring.clone(), passphrase.to_owned()).await?;
    Ok((kek, ring))
}

/// Opens an existing keyring (for replay and rebuild); `None` if the store has none.
pub async fn open_keyring(store: &dyn ObjectStore, passphrase: &str) -> Result<Option<Key>, BlobError> {
    match get_json::<Keyring>(store, &layout::keyring()).await? {
        Some(ring) => Ok(Some(open_keyring_blocking(ring, passphrase.to_owned()).await?)),
        None => Ok(None),
    }
}

pub async fn open_keyring_blocking(ring: Keyring, passphrase: String) -> Result<Key, CryptoError> {
    tokio::task::spawn_blocking(move || ring.open(&passphrase))
        .await
        .expect("kdf task")
}

/// Stores a disk's wrapped data key (write-once).
pub async fn put_wrapped_key(store: &dyn ObjectStore, w: &WrappedKey) -> Result<(), BlobError> {
    let path = layout::key(&w.machine, &w.disk, w.key_id);
    if !put_json(store, &path, w, true).await? {
        // Already there (a retry after a crash): it must be the same key.
        let existing: WrappedKey = get_json(store, &path).await?.expect("exists");
        if existing.wrapped != w.wrapped {
            return Err(BlobError::Url {
                url: path.to_string(),
                reason: "a different data key already exists under this id".into(),
            });
        }
    }
    Ok(())
}

/// A disk's base image: the blocks as they were at `through_seq`, in segment-format parts whose
/// records all carry that sequence number. Retention writes a new generation, then this manifest
/// (the switch), then deletes what the old generation and the rolled-up log segments held.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseManifest {
    pub format: String,
    pub version: u32,
    pub machine: String,
    pub disk: String,
    pub generation: u64,
    pub through_seq: u64,
    pub parts: Vec<String>,
    /// BLAKE3 of this document's JSON with `checksum` empty.
    pub checksum: String,
}

impl BaseManifest {
    pub fn new(machine: &str, disk: &str, generation: u64, through_seq: u64, parts: Vec<String>) -> Self {
        let mut m = Self {
            format: "lifeboat-base".into(),
            version: 1,
            machine: machine.into(),
            disk: disk.into(),
            generation,
            through_seq,
            parts,
            checksum: String::new(),
        };
        m.checksum = m.digest();
        m
    }

    fn digest(&self) -> String {
        let mut plain = self.clone();
        plain.checksum.clear();
        blake3::hash(&serde_json::to_vec(&plain).expect("json"))
            .to_hex()
            .to_string()
    }
}

/// Reads a disk's base manifest, checking its checksum, format and owner.
pub async fn get_base_manifest(
    store: &dyn ObjectStore,
    machine: &str,
    disk: &str,
) -> Result<Option<BaseManifest>, BlobError> {
    let path = layout::base_manifest(machine, disk);
    let Some(m) = get_json::<BaseManifest>(store, &path).await? else {
        return Ok(None);
    };
    if m.format != "lifeboat-base"
        || m.version != 1
        || m.machine != machine
        || m.disk != disk
        || m.digest() != m.checksum
    {
        return Err(CryptoError::Unauthentic(format!("{path}: checksum, format or owner mismatch")).into());
    }
    Ok(Some(m))
}

/// Loads and unwraps a disk's data key.
pub async fn get_data_key(
    store: &dyn ObjectStore,
    kek: &Key,
    machine: &str,
    disk: &str,
    key_id: u32,
) -> Result<Option<Key>, BlobError> {
    let path = layout::key(machine, disk, key_id);
    match get_json::<WrappedKey>(store, &path).await? {
        Some(w) if w.machine == machine && w.disk == disk && w.key_id == key_id => Ok(Some(w.unwrap_key(kek)?)),
        Some(_) => Err(CryptoError::Unauthentic(path.to_string()).into()),
        None => Ok(None),
    }
}

/// Highest data key id stored for a disk (0 if none).
pub async fn max_key_id(store: &dyn ObjectStore, machine: &str, disk: &str) -> Result<u32, BlobError> {
    use futures::TryStreamExt;
    let prefix = Path::from(format!("machines/{machine}/disks/{disk}/keys"));
    let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
    Ok(metas
        .iter()
        .filter_map(|m| m.location.filename()?.strip_suffix(".json")?.parse::<u32>().ok())
        .max()
        .unwrap_or(0))
}

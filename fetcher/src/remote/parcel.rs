//! A parcel: the versions of one VM in a store, opened with the user's key.

use bytes::Bytes;
use format::chunk::ChunkDecoder;
use format::{ChunkKey, Manifest, Secret};

use crate::Image;
use crate::aligned::AlignedBuf;
use crate::remote::store::validate_parcel_name;
use crate::{ChunkFault, Error, Store};

/// One parcel of a store, with the secret that opens it.
#[derive(Debug, Clone)]
pub struct Parcel {
    store: Store,
    name: String,
    secret: Secret,
}

/// The result of a successful publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The version now at HEAD.
    pub version: u64,
    /// The manifest object as stored.
    pub object: Bytes,
}

impl Parcel {
    /// A handle on parcel `name` (which need not exist yet).
    pub fn new(store: Store, name: &str, secret: Secret) -> Result<Parcel, Error> {
        validate_parcel_name(name)?;
        Ok(Parcel {
            store,
            name: name.to_owned(),
            secret,
        })
    }

    /// The store the parcel lives in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The parcel's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The secret that opens it.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// The newest version, or `None` for a parcel not yet created.
    pub async fn head(&self) -> Result<Option<u64>, Error> {
        self.store.head(&self.name).await
    }

    /// The newest version; [`Error::NoParcel`] if there is none
    /// ([`Error::NoStore`] if the whole local store is missing).
    pub async fn require_head(&self) -> Result<u64, Error> {
        match self.head().await? {
            Some(v) => Ok(v),
            None => {
                self.store.check_exists()?;
                Err(Error::NoParcel {
                    parcel: self.name.clone(),
                    store: self.store.url().to_owned(),
                })
            }
        }
    }

    /// Version `version`, or HEAD when `None`, with its decoded manifest.
    pub async fn resolve(&self, version: Option<u64>) -> Result<(u64, Manifest), Error> {
        let head = self.require_head().await?;
        let version = version.unwrap_or(head);
        if version == 0 || version > head {
            return Err(Error::NoVersion {
                parcel: self.name.clone(),
                version,
                head,
            });
        }
        // Below the floor: removed by gc, or about to be (its manifest may
        // still be there for a moment, its chunks not for long).
        if version < head
            && let Some(oldest) = self.store.floor(&self.name).await?
            && version < oldest
        {
            return Err(self.removed(version, oldest));
        }
        Ok((version, self.manifest(version).await?))
    }

    fn removed(&self, version: u64, oldest: u64) -> Error {
        Error::VersionRemoved {
            parcel: self.name.clone(),
            version,
            oldest,
        }
    }

    /// Fetches and decodes the manifest of `version`.
    pub async fn manifest(&self, version: u64) -> Result<Manifest, Error> {
        self.manifest_with_object(version).await.map(|(m, _)| m)
    }

    /// Like [`manifest`](Self::manifest), also returning the stored object.
    pub async fn manifest_with_object(&self, version: u64) -> Result<(Manifest, Bytes), Error> {
        let object = Store::manifest_path(&self.name, version);
        let Some(bytes) = self.store.get_manifest(&self.name, version).await? else {
            // Missing below gc's floor: removed, not damaged.
            return Err(match self.store.floor(&self.name).await? {
                Some(oldest) if version < oldest => self.removed(version, oldest),
                _ => Error::NotFound {
                    op: "get manifest",
                    object,
                    store: self.store.url().to_owned(),
                },
            });
        };
        let manifest = self.decode_manifest(&bytes, version, object)?;
        Ok((manifest, bytes))
    }

    /// Decodes a manifest object of `version` (`object` names it in errors).
    pub fn decode_manifest(
        &self,
        bytes: &[u8],
        version: u64,
        object: String,
    ) -> Result<Manifest, Error> {
        Manifest::decode(bytes, &self.secret, &self.name, version).map_err(|e| match e {
            format::Error::WrongKey { .. } => Error::WrongKey {
                parcel: self.name.clone(),
                object,
            },
            source => Error::BadManifest {
                parcel: self.name.clone(),
                object,
                source,
            },
        })
    }

    /// Publishes `manifest` as `version`. The caller must have made every
    /// chunk it names durable in the store first (invariant 4): the manifest's
    /// creation is the commit point, and it fails rather than overwrite.
    pub async fn publish(&self, manifest: &Manifest, version: u64) -> Result<Published, Error> {
        let object = manifest
            .encode(&self.secret, &self.name, version)
            .map_err(|source| Error::BadManifest {
                parcel: self.name.clone(),
                object: Store::manifest_path(&self.name, version),
                source,
            })?;
        let object = Bytes::from(object);
        self.store
            .create_manifest(&self.name, version, object.clone())
            .await?;
        // The version is committed; a failed hint only costs the next reader
        // a few more existence checks.
        let _ = self.store.put_head_hint(&self.name, version).await;
        Ok(Published { version, object })
    }

    /// Fences a lease just stolen: publishes a copy of HEAD as the next
    /// version (same content; this host; no writer cache), so that the old
    /// holder's commit of that version number fails. If the old holder
    /// commits first, its version is the one copied (nothing of it is
    /// lost). Returns the fence's version.
    pub async fn publish_fence(&self, host: &str, created_unix: i64) -> Result<u64, Error> {
        for _ in 0..16 {
            let head = self.require_head().await?;
            let mut m = self.manifest(head).await?;
            m.parent = Some(head);
            m.host = host.to_owned();
            m.created_unix = created_unix;
            m.writer = None;
            match self.publish(&m, head + 1).await {
                Ok(p) => return Ok(p.version),
                Err(Error::VersionExists { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Invalid(format!(
            "could not fence parcel {}: its HEAD kept moving",
            self.name
        )))
    }

    /// Fetches chunk `key` (disk chunk `index` of `version`, for messages),
    /// verifies, decrypts and decompresses it into `len` bytes. Decoding runs
    /// on tokio's blocking pool, off the async threads.
    pub async fn fetch_chunk(
        &self,
        key: ChunkKey,
        len: usize,
        index: u64,
        version: u64,
    ) -> Result<AlignedBuf, Error> {
        self.fetch_image_chunk(key, len, Image::Disk, index, version)
            .await
    }

    /// [`fetch_chunk`](Self::fetch_chunk) of chunk `index` of `image`.
    pub async fn fetch_image_chunk(
        &self,
        key: ChunkKey,
        len: usize,
        image: Image,
        index: u64,
        version: u64,
    ) -> Result<AlignedBuf, Error> {
        let id = key.id();
        let bad = |fault| Error::BadChunk {
            id,
            image,
            index,
            parcel: self.name.clone(),
            version,
            fault,
        };
        let object = match self.store.get_chunk(&id).await {
            Ok(o) => o,
            Err(Error::NotFound { .. }) => return Err(bad(ChunkFault::Missing)),
            Err(e) => return Err(bad(ChunkFault::Store(Box::new(e)))),
        };
        let secret = self.secret.clone();
        // A runtime that shuts down (a suspend with fetches in flight)
        // cancels a decode not yet started: an error, not a panic.
        // Decoded into an aligned buffer: a cache that works direct
        // writes it as it is.
        let decoded = tokio::task::spawn_blocking(move || {
            let mut out = AlignedBuf::zeroed(len.min(format::MAX_CHUNK_SIZE as usize));
            ChunkDecoder::new(secret)
                .decode_into(&key, &object, &mut out)
                .map(|()| out)
        })
        .await
        .map_err(|e| {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic())
            }
            bad(ChunkFault::Cancelled)
        })?;
        decoded.map_err(|e| bad(ChunkFault::Decode(e)))
    }
}

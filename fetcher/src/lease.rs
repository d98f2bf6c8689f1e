//! Leases: at most one host uses a parcel at a time.
//!
//! A lease is a sequence of objects `parcels/<name>/leases/<generation>`,
//! each created with put-if-absent and never changed or deleted, holding who
//! took it (host, pid, time) and a random nonce. The holder is the highest
//! generation, unless a marker `<generation>.released` exists beside it.
//! Taking the lease creates the next generation, so two takers cannot both
//! win; a second taker is refused with the holder's name; `steal` takes the
//! next generation over a live holder deliberately. Releasing creates the
//! marker of one's own generation: it can never remove a lease that was
//! stolen meanwhile (nothing is deleted). A release also overwrites the
//! hint `parcels/<name>/LEASE` with its generation, so that the next taker
//! finds the highest generation in one round trip instead of probing for it
//! (the hint is checked, never trusted alone).
//!
//! A lease alone cannot stop a holder that checked it a moment before it was
//! stolen from committing. So a steal also *fences*: the stealer publishes a
//! copy of HEAD as the next version ([`crate::Parcel::publish_fence`]); the
//! old holder's commit, which needs that same version number, then fails at
//! the store's put-if-absent, and its changes stay in its cache.

use bytes::Bytes;

use crate::{Error, PutOutcome, Store};

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When it was taken, Unix seconds.
    pub since_unix: i64,
    /// Random identity of this lease.
    pub nonce: String,
}

impl LeaseInfo {
    fn encode(&self) -> String {
        format!(
            "host={}\npid={}\nsince={}\nnonce={}\n",
            self.host, self.pid, self.since_unix, self.nonce
        )
    }

    fn decode(bytes: &[u8]) -> Option<LeaseInfo> {
        let text = std::str::from_utf8(bytes).ok()?;
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Some(LeaseInfo {
            host: field("host")?,
            pid: field("pid")?.parse().ok()?,
            since_unix: field("since")?.parse().ok()?,
            nonce: field("nonce")?,
        })
    }

    /// "host H (pid P) since T UTC".
    pub fn describe(&self) -> String {
        format!(
            "host {} (pid {}) since {} (Unix time)",
            self.host, self.pid, self.since_unix
        )
    }
}

/// A lease this process holds.
#[derive(Debug, Clone)]
pub struct Lease {
    store: Store,
    parcel: String,
    generation: u64,
    info: LeaseInfo,
    stolen_from: Option<LeaseInfo>,
}

impl Lease {
    /// Takes the lease on `parcel`. If `reuse_nonce` names the lease held in
    /// the store (this cache's own, from a session that died), it is
    /// adopted; with `steal`, a live holder's lease is taken over (see
    /// [`stolen_from`](Self::stolen_from): the caller must then fence).
    pub async fn acquire(
        store: &Store,
        parcel: &str,
        host: &str,
        now_unix: i64,
        reuse_nonce: Option<&str>,
        steal: bool,
    ) -> Result<Lease, Error> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| Error::Invalid(format!("no randomness: {e}")))?;
        let info = LeaseInfo {
            host: host.to_owned(),
            pid: std::process::id(),
            since_unix: now_unix,
            nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
        };
        let body = Bytes::from(info.encode());
        // Each round either takes the next generation or sees who did.
        for _ in 0..8 {
            let (generation, holder) = current(store, parcel).await?;
            let mut stolen_from = None;
            match holder {
                Some(h) if h.nonce == info.nonce || reuse_nonce == Some(h.nonce.as_str()) => {
                    tracing::info!(
                        parcel,
                        generation,
                        holder = %h.describe(),
                        "adopted this cache's own lease (from a session that ended uncleanly)"
                    );
                    return Ok(Lease {
                        store: store.clone(),
                        parcel: parcel.to_owned(),
                        generation,
                        info: h,
                        stolen_from: None,
                    });
                }
                Some(h) if !steal => {
                    tracing::debug!(parcel, generation, holder = %h.describe(), "the lease is held");
                    return Err(Error::LeaseHeld {
                        parcel: parcel.to_owned(),
                        holder: h.describe(),
                    });
                }
                Some(h) => stolen_from = Some(h),
                None => {}
            }
            let next = generation + 1;
            let path = Store::lease_path(parcel, next);
            match store.create("take lease", &path, body.clone()).await? {
                PutOutcome::Created => {
                    match &stolen_from {
                        Some(old) => tracing::info!(
                            parcel,
                            generation = next,
                            from = %old.describe(),
                            "took the lease over (--steal)"
                        ),
                        None => tracing::info!(parcel, generation = next, "took the lease"),
                    }
                    return Ok(Lease {
                        store: store.clone(),
                        parcel: parcel.to_owned(),
                        generation: next,
                        info,
                        stolen_from,
                    });
                }
                // Someone took it first (or our own retried create did):
                // look again.
                PutOutcome::AlreadyPresent => {
                    tracing::debug!(
                        parcel,
                        generation = next,
                        "lost a race for the lease; looking again"
                    );
                }
            }
        }
        Err(Error::Invalid(format!(
            "could not take the lease on parcel {parcel}: it changed hands 8 times while trying"
        )))
    }

    /// The same lease, checked and released through `store` (the same
    /// store, e.g. with another retry timeout than the one it was taken
    /// with).
    pub fn with_store(mut self, store: &Store) -> Lease {
        self.store = store.clone();
        self
    }

    /// Who holds the lease on `parcel` now; `None` if it is free.
    pub async fn holder_of(store: &Store, parcel: &str) -> Result<Option<LeaseInfo>, Error> {
        Ok(current(store, parcel).await?.1)
    }

    /// Releases the lease on `parcel` that a cache recorded by its `nonce`
    /// (a session that ended without releasing it: an offline suspend, a
    /// discarded cache). True if it was released; false if that lease is
    /// not the one held (released already, or taken over since): nothing
    /// is changed then.
    pub async fn release_nonce(store: &Store, parcel: &str, nonce: &str) -> Result<bool, Error> {
        let (generation, holder) = current(store, parcel).await?;
        match holder {
            Some(h) if !nonce.is_empty() && h.nonce == nonce => {
                let marker = released_path(parcel, generation);
                store
                    .create("release lease", &marker, Bytes::from_static(b"released\n"))
                    .await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// This lease's identity.
    pub fn info(&self) -> &LeaseInfo {
        &self.info
    }

    /// Whose live lease this one took over (`--steal`), if any: the caller
    /// fences that holder by publishing (see the module docs).
    pub fn stolen_from(&self) -> Option<&LeaseInfo> {
        self.stolen_from.as_ref()
    }

    /// The lease's current holder, if any.
    pub async fn holder(&self) -> Result<Option<LeaseInfo>, Error> {
        Ok(current(&self.store, &self.parcel).await?.1)
    }

    /// Fails with [`Error::LeaseLost`] unless the store still holds this lease.
    pub async fn check(&self) -> Result<(), Error> {
        match current(&self.store, &self.parcel).await? {
            (g, Some(_)) if g == self.generation => Ok(()),
            (_, h) => Err(Error::LeaseLost {
                parcel: self.parcel.clone(),
                holder: h.map_or("nobody".into(), |h| h.describe()),
            }),
        }
    }

    /// Gives the lease up, if it is still ours: marks its generation
    /// released (creating a marker; nothing is deleted, so a lease stolen
    /// in the meantime stays with its new holder).
    pub async fn release(self) -> Result<(), Error> {
        if let Err(e) = self.check().await {
            tracing::info!(parcel = self.parcel, generation = self.generation, error = %e, "cannot release the lease");
            return Err(e);
        }
        let marker = released_path(&self.parcel, self.generation);
        let hint = Store::lease_hint_path(&self.parcel);
        let (released, hinted) = futures::join!(
            self.store
                .create("release lease", &marker, Bytes::from_static(b"released\n")),
            self.store.overwrite(
                "put lease hint",
                &hint,
                Bytes::from(self.generation.to_string())
            )
        );
        released?;
        if let Err(e) = hinted {
            // Only the next resume's speed depends on it.
            tracing::debug!(parcel = self.parcel, error = %e, "cannot write the lease hint");
        }
        tracing::info!(
            parcel = self.parcel,
            generation = self.generation,
            "released the lease"
        );
        Ok(())
    }
}

fn released_path(parcel: &str, generation: u64) -> String {
    format!("{}.released", Store::lease_path(parcel, generation))
}

/// The highest lease generation of `parcel` (0 if none) and its holder, if
/// that generation is not released.
async fn current(store: &Store, parcel: &str) -> Result<(u64, Option<LeaseInfo>), Error> {
    let hint = store
        .get_number("get lease hint", &Store::lease_hint_path(parcel))
        .await?;
    // Usually the hint is the highest generation, released: its lease, the
    // next one and its marker are checked at once, in one round trip.
    let checked = match hint {
        Some(h) if h > 0 && h < u64::MAX => {
            let (this, next, marker) = (
                Store::lease_path(parcel, h),
                Store::lease_path(parcel, h + 1),
                released_path(parcel, h),
            );
            let (here, after, released) = futures::join!(
                store.exists("find lease", &this),
                store.exists("find lease", &next),
                store.exists("check lease", &marker)
            );
            let (here, after, released) = (here?, after?, released?);
            (here && !after).then_some((h, released))
        }
        _ => None,
    };
    let (generation, released) = match checked {
        Some(found) => found,
        None => {
            let Some(generation) = store
                .highest("find lease", hint, |g| Store::lease_path(parcel, g))
                .await?
            else {
                return Ok((0, None));
            };
            let released = store
                .exists("check lease", &released_path(parcel, generation))
                .await?;
            (generation, released)
        }
    };
    if released {
        return Ok((generation, None));
    }
    let path = Store::lease_path(parcel, generation);
    match store.get("read lease", &path).await {
        Ok(b) => Ok((
            generation,
            Some(LeaseInfo::decode(&b).unwrap_or_else(|| LeaseInfo {
                host: "an unknown holder (unreadable lease)".into(),
                pid: 0,
                since_unix: 0,
                nonce: String::new(),
            })),
        )),
        Err(Error::NotFound { .. }) => Ok((generation, None)),
        Err(e) => Err(e),
    }
}

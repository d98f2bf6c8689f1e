//! Leases: at most one host uses a parcel at a time.
//!
//! A lease is an object `parcels/<name>/lease` created with put-if-absent,
//! holding who took it (host, pid, time) and a random nonce. A second
//! taker is refused with the holder's name; `steal` deletes and re-creates
//! it deliberately. Publishing checks the nonce is still ours first.

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
    info: LeaseInfo,
}

impl Lease {
    /// Takes the lease on `parcel`. If `reuse_nonce` names the lease already
    /// in the store (this cache's own, from a session that died), it is
    /// adopted; with `steal`, any other holder's lease is broken.
    pub async fn acquire(
        store: &Store,
        parcel: &str,
        host: &str,
        now_unix: i64,
        reuse_nonce: Option<&str>,
        steal: bool,
    ) -> Result<Lease, Error> {
        let path = Store::lease_path(parcel);
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| Error::Invalid(format!("no randomness: {e}")))?;
        let info = LeaseInfo {
            host: host.to_owned(),
            pid: std::process::id(),
            since_unix: now_unix,
            nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
        };
        let lease = Lease {
            store: store.clone(),
            parcel: parcel.to_owned(),
            info,
        };
        for attempt in 0..2 {
            let body = Bytes::from(lease.info.encode());
            if store.create("take lease", &path, body).await? == PutOutcome::Created {
                return Ok(lease);
            }
            let holder = lease.holder().await?;
            match holder {
                // Our own: a create retried after a lost answer finds the
                // lease its first attempt took.
                Some(h) if h.nonce == lease.info.nonce => return Ok(lease),
                Some(h) if reuse_nonce == Some(h.nonce.as_str()) => {
                    return Ok(Lease { info: h, ..lease });
                }
                Some(_) | None if steal && attempt == 0 => {
                    store.delete("break lease", &path).await?;
                }
                h => {
                    return Err(Error::LeaseHeld {
                        parcel: parcel.to_owned(),
                        holder: h.map_or("an unknown holder".into(), |h| h.describe()),
                    });
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// This lease's identity.
    pub fn info(&self) -> &LeaseInfo {
        &self.info
    }

    /// The lease object's current content, if any.
    pub async fn holder(&self) -> Result<Option<LeaseInfo>, Error> {
        match self
            .store
            .get("read lease", &Store::lease_path(&self.parcel))
            .await
        {
            Ok(b) => Ok(LeaseInfo::decode(&b)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Fails with [`Error::LeaseLost`] unless the store still holds this lease.
    pub async fn check(&self) -> Result<(), Error> {
        match self.holder().await? {
            Some(h) if h.nonce == self.info.nonce => Ok(()),
            h => Err(Error::LeaseLost {
                parcel: self.parcel.clone(),
                holder: h.map_or("nobody".into(), |h| h.describe()),
            }),
        }
    }

    /// Gives the lease up (only if it is still ours).
    pub async fn release(self) -> Result<(), Error> {
        self.check().await?;
        self.store
            .delete("release lease", &Store::lease_path(&self.parcel))
            .await
    }
}

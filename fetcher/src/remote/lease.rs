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
//! A lease records what took it (`task`) and the boot of its host, so a
//! lease whose process died on this host is told from a live one: the
//! process is gone (`kill(pid, 0)` says so) or the host restarted since.
//! A dead holder that kept nothing locally (an import, a rollback) is taken
//! over without `--steal`; a dead session (a resume) may have left changes
//! in its cache, so it is named as dead and left to `isr recover` or
//! `--steal`.
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
    /// The boot of the holder's host (`/proc/sys/kernel/random/boot_id`;
    /// empty in leases written before it was recorded).
    pub boot: String,
    /// What took it: a [`Task`] name ("" if not recorded).
    pub task: String,
}

/// What takes a lease, and so what is at stake if its process dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// A resumed session (or a check-in): its cache may hold changes not
    /// published yet.
    Session,
    /// An import: publishes at its end or not at all.
    Import,
    /// A rollback: publishes at its end or not at all.
    Rollback,
}

impl Task {
    fn name(self) -> &'static str {
        match self {
            Task::Session => "session",
            Task::Import => "import",
            Task::Rollback => "rollback",
        }
    }

    /// Whether a holder of this task that died left nothing behind: its
    /// lease may be taken over without `--steal`.
    fn leaves_nothing(name: &str) -> bool {
        name == Task::Import.name() || name == Task::Rollback.name()
    }
}

/// Whether the holder of a lease still runs, as far as this host can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Held on another host (or too old to tell): assumed alive.
    Unknown,
    /// Its process runs on this host.
    Alive,
    /// Its process is gone: why we know.
    Dead(String),
}

impl LeaseInfo {
    fn encode(&self) -> String {
        format!(
            "host={}\npid={}\nsince={}\nnonce={}\nboot={}\ntask={}\n",
            self.host, self.pid, self.since_unix, self.nonce, self.boot, self.task
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
            boot: field("boot").unwrap_or_default(),
            task: field("task").unwrap_or_default(),
        })
    }

    /// "host H (pid P, isr import) since YYYY-MM-DD HH:MM:SSZ".
    pub fn describe(&self) -> String {
        let task = match self.task.as_str() {
            "" => String::new(),
            t => format!(", isr {}", if t == "session" { "resume" } else { t }),
        };
        format!(
            "host {} (pid {}{task}) since {}",
            self.host,
            self.pid,
            crate::time::format_utc(self.since_unix)
        )
    }

    /// Whether the holder still runs, seen from host `host` (this one).
    pub fn liveness(&self, host: &str) -> Liveness {
        if self.host != host || self.pid == 0 || self.boot.is_empty() {
            return Liveness::Unknown;
        }
        if self.boot != current_boot() {
            return Liveness::Dead("this host has restarted since".into());
        }
        // SAFETY: kill with signal 0 sends nothing; it only checks that
        // the process exists.
        let r = unsafe { libc::kill(self.pid as libc::pid_t, 0) };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return Liveness::Dead(format!("pid {} is no longer running", self.pid));
        }
        Liveness::Alive
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
    /// The holder that had died on this host when this lease was taken.
    dead_before: Option<LeaseInfo>,
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
        Self::acquire_for(
            store,
            parcel,
            host,
            now_unix,
            reuse_nonce,
            steal,
            Task::Session,
        )
        .await
    }

    /// [`acquire`](Self::acquire) for `task`. A holder that died on this
    /// host ([`LeaseInfo::liveness`]) having left nothing behind (an
    /// import, a rollback) is taken over as if released; a dead session is
    /// refused, named as dead.
    pub async fn acquire_for(
        store: &Store,
        parcel: &str,
        host: &str,
        now_unix: i64,
        reuse_nonce: Option<&str>,
        steal: bool,
        task: Task,
    ) -> Result<Lease, Error> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| Error::Invalid(format!("no randomness: {e}")))?;
        let info = LeaseInfo {
            host: host.to_owned(),
            pid: std::process::id(),
            since_unix: now_unix,
            nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
            boot: current_boot(),
            task: task.name().to_owned(),
        };
        let body = Bytes::from(info.encode());
        // Each round either takes the next generation or sees who did.
        for _ in 0..8 {
            let (generation, holder) = current(store, parcel).await?;
            let mut stolen_from = None;
            let mut dead_before = None;
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
                        dead_before: None,
                    });
                }
                Some(h) if !steal => match h.liveness(host) {
                    Liveness::Dead(why) if Task::leaves_nothing(&h.task) => {
                        tracing::info!(
                            parcel,
                            generation,
                            holder = %h.describe(),
                            why,
                            "taking over the lease of a process that died"
                        );
                        dead_before = Some(h);
                    }
                    Liveness::Dead(why) => {
                        return Err(Error::LeaseHeld {
                            parcel: parcel.to_owned(),
                            holder: format!(
                                "{}, which is dead ({why}) and may have left changes in its cache: `isr recover {parcel}` picks the session up where it stopped, `isr discard {parcel}` drops its changes",
                                h.describe()
                            ),
                        });
                    }
                    _ => {
                        tracing::debug!(parcel, generation, holder = %h.describe(), "the lease is held");
                        return Err(Error::LeaseHeld {
                            parcel: parcel.to_owned(),
                            holder: h.describe(),
                        });
                    }
                },
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
                        dead_before,
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

    /// The holder whose process had died on this host, leaving nothing
    /// behind, when this lease took its place (see [`Lease::acquire_for`]).
    pub fn dead_before(&self) -> Option<&LeaseInfo> {
        self.dead_before.as_ref()
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

/// This boot's id, as leases record it.
fn current_boot() -> String {
    crate::host::current_boot_id()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
                boot: String::new(),
                task: String::new(),
            })),
        )),
        Err(Error::NotFound { .. }) => Ok((generation, None)),
        Err(e) => Err(e),
    }
}

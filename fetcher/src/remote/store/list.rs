//! Listing a store's objects, for the commands that must see everything
//! (`isr ls`, `isr gc`) and for finding HEAD when nothing else does. Every
//! listing is one retried operation: a listing cut off half-way is made
//! again from the start. An http(s) mirror has no listing (object_store
//! lists over WebDAV, which a plain web server does not speak): there a
//! listing fails with [`Error::NoListing`].

use std::time::{Duration, SystemTime};

use futures::TryStreamExt;
use object_store::path::Path;

use super::Store;
use crate::Error;

/// One object found by a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// Its name in the store (below the store URL's path).
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, as the store says (a file's mtime for
    /// `file://`; some S3 servers give whole seconds).
    pub last_modified: SystemTime,
}

impl StoredObject {
    fn from_meta(meta: object_store::ObjectMeta) -> StoredObject {
        StoredObject {
            path: meta.location.to_string(),
            size: meta.size,
            last_modified: to_system_time(meta.last_modified.timestamp_millis()),
        }
    }
}

/// Unix milliseconds as a `SystemTime` (clamped at the epoch).
pub(crate) fn to_system_time(millis: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

impl Store {
    /// Every object whose name starts with folder `prefix` (such as
    /// `parcels/vm/versions`; `""` for the whole store), in no set order.
    /// A local store whose directory does not exist fails with
    /// [`Error::NoStore`].
    pub async fn list(&self, prefix: &str) -> Result<Vec<StoredObject>, Error> {
        self.check_exists()?;
        let location = Path::from(prefix);
        let prefix_arg = (!prefix.is_empty()).then_some(&location);
        let found = self
            .retry
            .run_as(self.op("list", prefix), || {
                self.inner.list(prefix_arg).try_collect::<Vec<_>>()
            })
            .await
            .map_err(|f| self.list_error(prefix, f))?;
        Ok(found.into_iter().map(StoredObject::from_meta).collect())
    }

    /// The names of the folders one level below folder `prefix` (for
    /// `parcels`: the parcels' names), sorted.
    pub async fn list_folders(&self, prefix: &str) -> Result<Vec<String>, Error> {
        self.check_exists()?;
        let location = Path::from(prefix);
        let prefix_arg = (!prefix.is_empty()).then_some(&location);
        let found = self
            .retry
            .run_as(self.op("list", prefix), || {
                self.inner.list_with_delimiter(prefix_arg)
            })
            .await
            .map_err(|f| self.list_error(prefix, f))?;
        let mut names: Vec<String> = found
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The names of the parcels in the store (folders under `parcels/`).
    pub async fn parcels(&self) -> Result<Vec<String>, Error> {
        self.list_folders("parcels").await
    }

    /// The versions of `parcel` whose manifests exist, ascending (a listing).
    pub async fn versions(&self, parcel: &str) -> Result<Vec<u64>, Error> {
        let prefix = format!("parcels/{parcel}/versions");
        let mut versions: Vec<u64> = self
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|o| version_of(&o.path, parcel))
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }

    fn list_error(&self, prefix: &str, failed: super::retry::Failed) -> Error {
        let e = self.error("list", &format!("{prefix}/"), failed);
        if self.writable {
            return e;
        }
        Error::NoListing {
            store: self.url.clone(),
            detail: e.to_string(),
        }
    }
}

/// The version a manifest object of `parcel` is (`parcels/<parcel>/versions/<digits>`).
pub(crate) fn version_of(path: &str, parcel: &str) -> Option<u64> {
    let digits = path
        .strip_prefix("parcels/")?
        .strip_prefix(parcel)?
        .strip_prefix("/versions/")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names_parse() {
        let p = Store::manifest_path("vm", 42);
        assert_eq!(version_of(&p, "vm"), Some(42));
        assert_eq!(version_of(&p, "v"), None);
        assert_eq!(version_of("parcels/vm/versions/", "vm"), None);
        assert_eq!(version_of("parcels/vm/versions/12.tmp", "vm"), None);
        assert_eq!(version_of("parcels/vm/HEAD", "vm"), None);
    }
}

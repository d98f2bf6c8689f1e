//! Which versions of a parcel exist once `isr gc` has removed old ones.
//!
//! HEAD is found by probing upward from a starting point and bisecting,
//! which needs every version from that point to HEAD to exist. gc removes
//! versions from below only, and before it removes any it records the
//! lowest version it keeps in `parcels/<name>/FLOOR` (only ever raised):
//! [`Store::head`] starts from the higher of the HEAD hint and the floor,
//! both of which name existing versions. Should both be gone (or damaged),
//! the probe from 1 finds nothing, and HEAD is taken from a listing of the
//! parcel's versions instead.

use bytes::Bytes;

use super::Store;
use crate::Error;

impl Store {
    fn floor_path(parcel: &str) -> String {
        format!("parcels/{parcel}/FLOOR")
    }

    /// The oldest version gc kept of `parcel` (versions below it were
    /// removed); `None` if gc never removed any.
    pub async fn floor(&self, parcel: &str) -> Result<Option<u64>, Error> {
        self.get_number("get FLOOR", &Self::floor_path(parcel))
            .await
    }

    /// Records that versions below `floor` are (about to be) removed: the
    /// floor becomes `floor` unless it is higher already. Written before
    /// any manifest is deleted, so that HEAD discovery never starts below
    /// an existing version.
    pub(crate) async fn raise_floor(&self, parcel: &str, floor: u64) -> Result<(), Error> {
        if self.floor(parcel).await?.is_some_and(|f| f >= floor) {
            return Ok(());
        }
        self.overwrite(
            "put FLOOR",
            &Self::floor_path(parcel),
            Bytes::from(floor.to_string()),
        )
        .await
    }

    /// HEAD from a listing of the parcel's versions, when probing found
    /// nothing. A store that cannot list (an http mirror) or whose local
    /// directory does not exist has none to offer.
    pub(super) async fn highest_listed(&self, parcel: &str) -> Result<Option<u64>, Error> {
        match self.versions(parcel).await {
            Ok(v) => Ok(v.last().copied()),
            Err(Error::NoListing { .. } | Error::NoStore { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

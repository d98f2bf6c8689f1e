//! Whole-image operations on a parcel: import an image as a new version,
//! export a version to a file, verify that a version is intact; and the
//! operations on versions: list a store's parcels, roll a parcel back,
//! collect garbage.

mod export;
pub mod gc;
mod import;
mod listing;
mod rollback;

pub use export::{
    ExportOptions, ExportSummary, VerifyReport, export, export_image, export_with, verify,
};
pub use gc::{GcOptions, GcPhase, GcProgress, GcReport, ParcelGc, gc};
pub use import::{ImportOptions, ImportSummary, check_import, import};
pub use listing::{HeadInfo, ParcelListing, list_parcels};
pub use rollback::{RollbackSummary, rollback};

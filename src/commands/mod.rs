//! The commands, one file each, with its arguments beside it: argument
//! handling, output and exit status around the mechanisms below (the
//! daemon, the session, the VM) and the operations `fetcher` implements.
//! `crate::cli` lists them; `main` runs them.

pub mod check;
pub mod checkin;
pub mod discard;
pub mod export;
pub mod fork;
pub mod gc;
pub mod hoard;
pub mod import;
pub mod keygen;
pub mod log;
pub mod ls;
pub mod recover;
pub mod resume;
pub mod rollback;
pub mod run;
pub mod status;
pub mod suspend;
pub mod sync;
pub mod verify;

//! Bringing a cache to a state it can vouch for: opening it (recovery from
//! an unclean stop, reconciling with a store that moved on), checking it
//! (damage dropped, to be fetched again), and discarding its local changes.

pub(in crate::engine) mod check;
pub(in crate::engine) mod discard;
pub(in crate::engine) mod reconcile;

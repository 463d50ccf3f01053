//! Live replication figures, shared between a reader task (which updates
//! them as it reads) and status reporting (which copies them).

use std::sync::{Arc, Mutex, PoisonError};

use caudal_core::status::Replication;

/// Figures shared between a reader task and status reporting.
pub type SharedLag = Arc<Mutex<Replication>>;

/// A copy of the current figures.
pub fn read_lag(lag: &SharedLag) -> Replication {
    lag.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Changes the figures.
pub fn update_lag(lag: &SharedLag, f: impl FnOnce(&mut Replication)) {
    f(&mut lag.lock().unwrap_or_else(PoisonError::into_inner));
}

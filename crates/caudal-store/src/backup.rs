//! Online copies of an SQLite store, for `caudal backup`.
//!
//! Promises:
//! - A copy is one consistent state of the database (one read transaction,
//!   SQLite's `VACUUM INTO`), taken while other connections keep writing;
//!   it is complete and synced when [`Store::copy_to`] returns.
//! - An existing file is never overwritten.
//! - A PostgreSQL store is not copied here (that is `pg_dump`'s job): the
//!   call says so with [`ErrorKind::Config`].

use std::path::Path;

use caudal_core::{Error, ErrorKind, Result};

use crate::{Pool, Store, store_error};

impl Store {
    /// Writes a consistent copy of this SQLite store to `dest`, a new file.
    pub async fn copy_to(&self, dest: &Path) -> Result<()> {
        let Pool::Sqlite(pool) = &self.pool else {
            return Err(Error::new(
                ErrorKind::Config,
                "a PostgreSQL state store is backed up with pg_dump, not copied by caudal",
            ));
        };
        if dest.exists() {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "{} already exists; a backup never overwrites",
                    dest.display()
                ),
            ));
        }
        let target = dest.to_str().ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("{} is not a UTF-8 path", dest.display()),
            )
        })?;
        sqlx::query("VACUUM INTO ?")
            .bind(target)
            .execute(pool)
            .await
            .map_err(|e| store_error(format!("copying the state store to {target}"), e))?;
        let path = dest.to_path_buf();
        tokio::task::spawn_blocking(move || std::fs::File::open(&path)?.sync_all())
            .await
            .map_err(|e| Error::with_source(ErrorKind::Internal, "the fsync task failed", e))?
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Store,
                    format!("syncing the state store copy {target}"),
                    e,
                )
            })
    }
}

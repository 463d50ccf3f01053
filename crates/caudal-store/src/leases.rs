//! Leases: named, expiring locks that keep a pipeline from running twice at
//! once, across processes and machines sharing the store.
//!
//! A lease row names its holder and when it expires. Every operation on it is
//! a single statement whose condition is checked by the database as it
//! writes, so racing processes cannot both win: at most one holder at a time,
//! whatever the interleaving. Expiry is judged by the database's clock (see
//! the crate docs), never the caller's. A holder keeps its lease by renewing
//! it well within the TTL (a third of it is a good period); a holder that
//! stops renewing loses it once it expires, to the next process that asks.

use std::time::Duration;

use caudal_core::{Error, ErrorKind, Result};
use jiff::Timestamp;

use crate::{Store, clock, store_error};

/// The result of [`Store::try_acquire_lease`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The caller holds the lease until the TTL runs out (or it releases it).
    Acquired,
    /// Someone else holds it, until `expires_at` unless they renew it.
    Held {
        holder: String,
        expires_at: Timestamp,
    },
}

/// How often [`Store::try_acquire_lease`] retries when the lease changes
/// hands between its two statements; each retry means another process made
/// progress, so a few are plenty.
const ACQUIRE_ATTEMPTS: usize = 5;

impl Store {
    /// Takes the lease `name` for `holder` for `ttl` if it is free, expired,
    /// or already held by `holder` (which renews it); otherwise reports who
    /// holds it.
    pub async fn try_acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<LeaseOutcome> {
        // The WHERE of DO UPDATE is evaluated against the row as it is when
        // the write happens (after waiting for any concurrent writer), so of
        // several racing acquirers exactly one changes the row. `WHERE true`
        // settles an SQLite parsing ambiguity between upsert and join syntax.
        // The token grows unless the holder renews a lease it still has.
        const ACQUIRE: &str = "INSERT INTO leases (name, holder, acquired_at, expires_at, token) \
             SELECT $1, $2, now_us, now_us + $3, 1 FROM clock WHERE true \
             ON CONFLICT (name) DO UPDATE \
             SET holder = excluded.holder, \
                 acquired_at = CASE WHEN leases.holder = excluded.holder \
                     THEN leases.acquired_at ELSE excluded.acquired_at END, \
                 expires_at = excluded.expires_at, \
                 token = CASE WHEN leases.holder = excluded.holder \
                     AND leases.expires_at > excluded.acquired_at \
                     THEN leases.token ELSE leases.token + 1 END \
             WHERE leases.expires_at <= excluded.acquired_at \
                OR leases.holder = excluded.holder";
        const CURRENT: &str = "SELECT holder, expires_at FROM leases WHERE name = $1";
        let ttl = clock::duration_to_db(ttl);
        let failed = |e| store_error(format!("acquiring lease `{name}` for `{holder}`"), e);
        for _ in 0..ACQUIRE_ATTEMPTS {
            let acquired = with_pool!(self, |pool| {
                sqlx::query(ACQUIRE)
                    .bind(name)
                    .bind(holder)
                    .bind(ttl)
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected() > 0)
            })
            .map_err(failed)?;
            if acquired {
                return Ok(LeaseOutcome::Acquired);
            }
            let current: Option<(String, i64)> = with_pool!(self, |pool| {
                sqlx::query_as(CURRENT)
                    .bind(name)
                    .fetch_optional(pool)
                    .await
            })
            .map_err(failed)?;
            // Released (or expired and deleted) in between: try again.
            if let Some((current, expires_at)) = current {
                return Ok(LeaseOutcome::Held {
                    holder: current,
                    expires_at: clock::from_db(expires_at, "leases.expires_at")?,
                });
            }
        }
        Err(Error::new(
            ErrorKind::Store,
            format!("state store: lease `{name}` kept changing hands; gave up acquiring it"),
        ))
    }

    /// Gives the lease `name` to `holder` for `ttl`, but only if
    /// `expected_holder` still holds it (expired or not): a compare-and-swap
    /// for replacing a holder known to be dead. Returns `false`, changing
    /// nothing, if someone else holds it now or there is no such lease.
    pub async fn take_over_lease(
        &self,
        name: &str,
        expected_holder: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool> {
        const SQL: &str = "UPDATE leases \
             SET holder = $3, token = token + 1, \
                 acquired_at = (SELECT now_us FROM clock), \
                 expires_at = (SELECT now_us FROM clock) + $4 \
             WHERE name = $1 AND holder = $2";
        let ttl = clock::duration_to_db(ttl);
        with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(name)
                .bind(expected_holder)
                .bind(holder)
                .bind(ttl)
                .execute(pool)
                .await
                .map(|done| done.rows_affected() > 0)
        })
        .map_err(|e| {
            store_error(
                format!("taking over lease `{name}` from `{expected_holder}` for `{holder}`"),
                e,
            )
        })
    }

    /// Extends the lease `name` to `ttl` from now. Returns `false` if
    /// `holder` no longer holds it (someone else acquired it after it
    /// expired, or it was released): the caller must stop the work the lease
    /// protected. A lease that expired but that nobody else took is renewed.
    pub async fn renew_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        const SQL: &str = "UPDATE leases SET expires_at = (SELECT now_us FROM clock) + $3 \
             WHERE name = $1 AND holder = $2";
        let ttl = clock::duration_to_db(ttl);
        with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(name)
                .bind(holder)
                .bind(ttl)
                .execute(pool)
                .await
                .map(|done| done.rows_affected() > 0)
        })
        .map_err(|e| store_error(format!("renewing lease `{name}` for `{holder}`"), e))
    }

    /// Releases the lease `name` if `holder` holds it; does nothing
    /// otherwise (it may already have been taken over). The row goes, and
    /// its token with it: for leases nothing is fenced by (see
    /// [`expire_lease`](Self::expire_lease)).
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        const SQL: &str = "DELETE FROM leases WHERE name = $1 AND holder = $2";
        with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(name)
                .bind(holder)
                .execute(pool)
                .await
                .map(drop)
        })
        .map_err(|e| store_error(format!("releasing lease `{name}` for `{holder}`"), e))
    }

    /// Gives the lease `name` up at once if `holder` holds it, keeping its
    /// row (expired) so the next holder's token is greater than every
    /// earlier one, whoever held them: a [`Fence`] of any earlier holding,
    /// this holder's included, never works again.
    pub async fn expire_lease(&self, name: &str, holder: &str) -> Result<()> {
        const SQL: &str = "UPDATE leases SET expires_at = (SELECT now_us FROM clock) \
             WHERE name = $1 AND holder = $2 AND expires_at > (SELECT now_us FROM clock)";
        with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(name)
                .bind(holder)
                .execute(pool)
                .await
                .map(drop)
        })
        .map_err(|e| store_error(format!("releasing lease `{name}` for `{holder}`"), e))
    }

    /// The fencing token of the lease `name` while `holder` holds it (and
    /// it has not expired); `None` otherwise. The token grows each time the
    /// lease changes hands, so a [`Fence`] made from it stops working once
    /// anyone else has held the lease since.
    pub async fn lease_token(&self, name: &str, holder: &str) -> Result<Option<i64>> {
        const SQL: &str = "SELECT token FROM leases WHERE name = $1 AND holder = $2 \
             AND expires_at > (SELECT now_us FROM clock)";
        with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(name)
                .bind(holder)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| store_error(format!("reading the token of lease `{name}`"), e))
    }

    /// Every lease whose name starts with `prefix`, held or not, by name.
    pub async fn leases(&self, prefix: &str) -> Result<Vec<LeaseRow>> {
        const SQL: &str = "SELECT name, holder, token, expires_at > (SELECT now_us FROM clock) \
             FROM leases WHERE substr(name, 1, length($1)) = $1 ORDER BY name";
        let rows: Vec<(String, String, i64, bool)> = with_pool!(self, |pool| {
            sqlx::query_as(SQL).bind(prefix).fetch_all(pool).await
        })
        .map_err(|e| store_error(format!("listing leases `{prefix}*`"), e))?;
        Ok(rows
            .into_iter()
            .map(|(name, holder, token, held)| LeaseRow {
                name,
                holder,
                token,
                held,
            })
            .collect())
    }
}

/// A lease as [`Store::leases`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub name: String,
    /// The last holder (still holding it when `held`).
    pub holder: String,
    pub token: i64,
    /// Whether it is held now (not expired or released).
    pub held: bool,
}

/// Proof of holding a lease: writes made with it commit only while
/// `holder` still holds `lease` with this `token`, unexpired (checked by
/// the database in the writing transaction, which also locks the lease row
/// until it commits, so a takeover waits for it or refuses it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub lease: String,
    pub holder: String,
    pub token: i64,
}

/// The statement that checks a [`Fence`] and locks its lease row for the
/// rest of the transaction: the row is written (to itself), which takes
/// SQLite's write lock or PostgreSQL's row lock.
pub(crate) const FENCE_SQL: &str = "UPDATE leases SET holder = holder \
     WHERE name = $1 AND holder = $2 AND token = $3 AND expires_at > (SELECT now_us FROM clock)";

/// Why a fenced write was refused.
pub(crate) fn fenced_out(fence: &Fence, what: &str) -> Error {
    Error::new(
        ErrorKind::Busy,
        format!(
            "not {what}: this process no longer owns `{}` (its token {} is stale or its lease expired)",
            fence.lease, fence.token
        ),
    )
}

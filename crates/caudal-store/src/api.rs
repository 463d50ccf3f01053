//! API tokens and the audit log. Only a token's SHA-256 is stored: the
//! token itself is shown once, when it is created.

use caudal_core::{Error, ErrorKind, Result};
use jiff::Timestamp;

use crate::{Store, clock, store_error};

/// A token as the store keeps it (never the token itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// One mutating API call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub id: i64,
    pub at: Timestamp,
    /// The name of the token that made the call.
    pub token: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

type TokenRow = (String, String, i64, Option<i64>);

fn token(row: TokenRow) -> Result<TokenRecord> {
    let (name, role, created, revoked) = row;
    Ok(TokenRecord {
        name,
        role,
        created_at: clock::from_db(created, "api_tokens.created_at")?,
        revoked_at: revoked
            .map(|r| clock::from_db(r, "api_tokens.revoked_at"))
            .transpose()?,
    })
}

impl Store {
    /// Saves a new token `name` with `role`, by the SHA-256 of the token.
    /// A name in use (revoked or not) is refused.
    pub async fn create_token(&self, name: &str, role: &str, hash: &str) -> Result<()> {
        const SQL: &str = "INSERT INTO api_tokens (name, role, hash, created_at) \
             VALUES ($1, $2, $3, (SELECT now_us FROM clock)) ON CONFLICT (name) DO NOTHING";
        let inserted = with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(name)
                .bind(role)
                .bind(hash)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        })
        .map_err(|e| store_error(format!("creating token `{name}`"), e))?;
        if inserted == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                format!("a token named {name:?} exists already (revoked tokens keep their name)"),
            ));
        }
        Ok(())
    }

    /// Every token, by name.
    pub async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        const SQL: &str = "SELECT name, role, created_at, revoked_at FROM api_tokens ORDER BY name";
        let rows: Vec<TokenRow> =
            with_pool!(self, |pool| sqlx::query_as(SQL).fetch_all(pool).await)
                .map_err(|e| store_error("listing the API tokens".into(), e))?;
        rows.into_iter().map(token).collect()
    }

    /// The token whose SHA-256 is `hash`, revoked or not.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        const SQL: &str =
            "SELECT name, role, created_at, revoked_at FROM api_tokens WHERE hash = $1";
        let row: Option<TokenRow> = with_pool!(self, |pool| {
            sqlx::query_as(SQL).bind(hash).fetch_optional(pool).await
        })
        .map_err(|e| store_error("looking an API token up".into(), e))?;
        row.map(token).transpose()
    }

    /// Revokes token `name`; false when there is no such live token.
    pub async fn revoke_token(&self, name: &str) -> Result<bool> {
        const SQL: &str = "UPDATE api_tokens SET revoked_at = (SELECT now_us FROM clock) \
             WHERE name = $1 AND revoked_at IS NULL";
        let n = with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(name)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        })
        .map_err(|e| store_error(format!("revoking token `{name}`"), e))?;
        Ok(n > 0)
    }

    /// Records a mutating API call.
    pub async fn add_audit(
        &self,
        token: &str,
        method: &str,
        path: &str,
        status: u16,
    ) -> Result<()> {
        const SQL: &str = "INSERT INTO audit_log (at, token, method, path, status) \
             VALUES ((SELECT now_us FROM clock), $1, $2, $3, $4)";
        with_pool!(self, |pool| {
            sqlx::query(SQL)
                .bind(token)
                .bind(method)
                .bind(path)
                .bind(i32::from(status))
                .execute(pool)
                .await
                .map(drop)
        })
        .map_err(|e| store_error("recording an API call in the audit log".into(), e))
    }

    /// The latest `limit` audit records, newest first.
    pub async fn audit(&self, limit: u32) -> Result<Vec<AuditRecord>> {
        const SQL: &str = "SELECT id, at, token, method, path, status FROM audit_log \
             ORDER BY id DESC LIMIT $1";
        let rows: Vec<(i64, i64, String, String, String, i32)> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
        })
        .map_err(|e| store_error("reading the audit log".into(), e))?;
        rows.into_iter()
            .map(|(id, at, token, method, path, status)| {
                Ok(AuditRecord {
                    id,
                    at: clock::from_db(at, "audit_log.at")?,
                    token,
                    method,
                    path,
                    status: u16::try_from(status).unwrap_or(0),
                })
            })
            .collect()
    }
}

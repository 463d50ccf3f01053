//! The incremental SQL source: rows of a table or query read in keyset order
//! on a tuple of cursor columns, resumable from the last delivered row.
//!
//! Promises:
//! - Keyset paging on the whole cursor tuple: `WHERE (c1, c2) > (v1, v2)
//!   ORDER BY c1, c2 LIMIT n`. Rows sharing a value of `c1` are neither
//!   skipped nor repeated across pages or runs, as long as the tuple is
//!   unique per row (end it with a key column).
//! - A safety lag: each run fixes an upper bound `db_now - lag` on the first
//!   cursor column when it is a timestamp, so rows written by transactions
//!   still in flight are read by a later run instead of being overtaken.
//! - Identifiers from the configuration are quoted, values are bound as
//!   parameters; nothing from configuration or data is spliced into SQL
//!   unquoted (a user `query` is the user's own SQL, wrapped as a subquery).

pub mod first_load;
#[cfg(feature = "mysql")]
pub(crate) mod mysql;
#[cfg(feature = "mysql")]
pub(crate) mod mysql_tls;
pub(crate) mod postgres;
pub mod postgres_copy;
pub use postgres::table_columns;
#[cfg(feature = "files")]
pub mod report;
mod sqlite;

use caudal_core::config::{
    DEFAULT_LAG, DecimalFormat, FirstLoadMode, SourceConfig, SqlDialect, SqlSourceConfig,
};
use caudal_core::record::{CursorValue, Json, Position, Record};
use caudal_core::{Error, ErrorKind, Result};
use serde_json::{Map, Value};
#[cfg(feature = "mysql")]
use sqlx::MySqlPool;
use sqlx::{PgPool, SqlitePool};

/// What a column holds, as far as cursors and the safety lag care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    Int,
    Uint,
    Float,
    Decimal,
    Text,
    /// A zone-less timestamp.
    Timestamp,
    /// A timestamp with a zone (stored as an instant).
    TimestampTz,
    Date,
    Uuid,
    /// Anything else; usable in records, not as a cursor.
    Other(String),
}

impl ColumnKind {
    fn is_temporal(&self) -> bool {
        matches!(self, Self::Timestamp | Self::TimestampTz)
    }

    /// The typed cursor value of a decoded JSON value of this kind.
    pub(crate) fn cursor_value(&self, column: &str, value: &Value) -> Result<CursorValue> {
        let bad = || {
            Error::new(
                ErrorKind::Decode,
                format!(
                    "cursor column {column:?} holds {value} which cannot be a cursor value; \
                     cursor columns must be NOT NULL"
                ),
            )
        };
        Ok(match (self, value) {
            (Self::Int, Value::Number(n)) => CursorValue::Int(n.as_i64().ok_or_else(bad)?),
            (Self::Uint, Value::Number(n)) => CursorValue::Uint(n.as_u64().ok_or_else(bad)?),
            (Self::Float, Value::Number(n)) => CursorValue::Float(n.as_f64().ok_or_else(bad)?),
            (Self::Decimal, Value::String(s)) => CursorValue::Decimal(s.clone()),
            (Self::Decimal, Value::Number(n)) => CursorValue::Decimal(n.to_string()),
            (Self::Text, Value::String(s)) => CursorValue::Text(s.clone()),
            (Self::Timestamp, Value::String(s)) => CursorValue::Timestamp(s.clone()),
            (Self::TimestampTz, Value::String(s)) => CursorValue::TimestampTz(s.clone()),
            (Self::Date, Value::String(s)) => CursorValue::Date(s.clone()),
            (Self::Uuid, Value::String(s)) => CursorValue::Uuid(s.clone()),
            // SQLite is dynamically typed: take the value's own type.
            (Self::Other(_), Value::Number(n)) if n.is_i64() => {
                CursorValue::Int(n.as_i64().ok_or_else(bad)?)
            }
            (Self::Other(_), Value::Number(n)) => CursorValue::Float(n.as_f64().ok_or_else(bad)?),
            (Self::Other(_), Value::String(s)) => CursorValue::Text(s.clone()),
            _ => return Err(bad()),
        })
    }
}

/// A column of the source's result set.
#[derive(Clone, Debug)]
pub struct ColumnSpec {
    pub name: String,
    pub kind: ColumnKind,
}

/// A connection pool to one of the supported databases.
#[derive(Clone, Debug)]
enum Pool {
    Postgres(PgPool),
    #[cfg(feature = "mysql")]
    Mysql(MySqlPool),
    Sqlite(SqlitePool),
}

/// The queries of one source, built once from its configuration and the
/// column types the database reports.
#[derive(Clone, Debug)]
struct Plan {
    /// Query for the first page of a pipeline that has no checkpoint.
    first: String,
    /// Query for the following pages: adds the keyset predicate.
    next: String,
    /// How many times the cursor values are bound in `next`, in order
    /// (MySQL's expanded predicate repeats them).
    next_binds: Vec<usize>,
    /// Kinds of the cursor columns, in cursor order.
    cursor_kinds: Vec<ColumnKind>,
    /// The lag applied to this source, if any.
    lag: Option<std::time::Duration>,
    /// How rows are turned into JSON.
    decode: DecodeOptions,
}

/// How rows are turned into JSON.
#[derive(Clone, Debug, Default)]
pub(crate) struct DecodeOptions {
    pub decimals: DecimalFormat,
    /// Text columns that hold JSON (MariaDB's `JSON` is `LONGTEXT`).
    pub json_columns: std::collections::HashSet<String>,
}

/// An incremental SQL source. Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct SqlSource {
    name: String,
    dialect: SqlDialect,
    config: SqlSourceConfig,
    pool: Pool,
}

impl SqlSource {
    /// Connects to the database of a configured source. Nothing is queried
    /// until [`SqlSource::open_run`].
    pub async fn connect(name: &str, config: &SourceConfig) -> Result<Self> {
        let (Some(dialect), Some(sql)) = (config.dialect(), config.sql().cloned()) else {
            return Err(Error::new(
                ErrorKind::Config,
                format!("source {name:?} is not a SQL source"),
            ));
        };
        let url = sql.url.expose();
        let connect_err = |e: sqlx::Error| {
            Error::with_source(
                connect_kind(&e),
                format!(
                    "source {name:?}: cannot connect to {} at {}",
                    dialect.as_str(),
                    caudal_core::units::redact_url(url)
                ),
                e,
            )
        };
        let pool = match dialect {
            SqlDialect::Postgres => {
                Pool::Postgres(postgres::connect(url).await.map_err(connect_err)?)
            }
            #[cfg(feature = "mysql")]
            SqlDialect::Mysql => {
                let tls = mysql_tls::MysqlTlsFiles::load(sql.tls.as_ref())
                    .map_err(|e| Error::new(ErrorKind::Config, format!("source {name:?}: {e}")))?;
                Pool::Mysql(mysql::connect(url, &tls).await.map_err(connect_err)?)
            }
            #[cfg(not(feature = "mysql"))]
            SqlDialect::Mysql => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "source {name:?}: this caudal was built without MySQL/MariaDB support \
                         (cargo feature `mysql`)"
                    ),
                ));
            }
            SqlDialect::Sqlite => Pool::Sqlite(sqlite::connect(url).await.map_err(connect_err)?),
        };
        Ok(Self {
            name: name.to_string(),
            dialect,
            config: sql,
            pool,
        })
    }

    /// The source's name in the configuration.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts one run: checks the cursor columns against the database, fixes
    /// the safety-lag bound from the database clock, and returns a reader
    /// positioned after `from` (the last delivered position).
    /// `key_field`: the pipeline's `key` column; each record is keyed by
    /// its value.
    pub async fn open_run(
        &self,
        from: Option<&Position>,
        key_field: Option<&str>,
    ) -> Result<RunReader> {
        let columns = self.describe().await?;
        let plan = self.plan(&columns)?;
        // MySQL reports JSON columns as text: the catalog says which.
        #[cfg(feature = "mysql")]
        let plan = match (&self.pool, &self.config.table) {
            (Pool::Mysql(pool), Some(table)) => Plan {
                decode: DecodeOptions {
                    json_columns: mysql::json_columns(pool, table).await.unwrap_or_default(),
                    ..plan.decode
                },
                ..plan
            },
            _ => plan,
        };
        // A first load (no checkpoint yet), or one to resume.
        let mut load: Option<Option<(Vec<CursorValue>, postgres_copy::Ctid)>> = None;
        let after = match from {
            None => {
                load = Some(None);
                None
            }
            Some(Position::FirstLoad { hwm, page, tuple }) => {
                self.check_cursor_width(hwm, &plan)?;
                load = Some(Some((hwm.clone(), (*page, *tuple))));
                None
            }
            // After a first load, paging goes on from its high-water mark.
            Some(Position::FirstLoadDone { hwm: values } | Position::Cursor { values }) => {
                self.check_cursor_width(values, &plan)?;
                Some(values.clone())
            }
            Some(other) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "source {:?}: the checkpoint {} is not a cursor position; the source's mode \
                         changed since it was saved (see `caudal checkpoint reset`)",
                        self.name,
                        other.display()
                    ),
                ));
            }
        };
        let bound = match plan.lag {
            Some(lag) => Some(self.lag_bound(&plan.cursor_kinds[0], lag).await?),
            None => None,
        };
        let first_load = match (load, &self.pool, &self.config.table) {
            (Some(resume), Pool::Postgres(pool), Some(_))
                if self.config.first_load != Some(FirstLoadMode::Cursor)
                    && copy_ranges(pool).await =>
            {
                let plan = first_load::Plan {
                    source: &self.name,
                    relation: self.relation(),
                    select: self.select_list(),
                    cursor: self.config.cursor.iter().map(|c| self.quote(c)).collect(),
                    cursor_names: &self.config.cursor,
                    cursor_kinds: &plan.cursor_kinds,
                    bound: bound.as_ref(),
                    decode: &plan.decode,
                    key_field,
                };
                first_load::FirstLoad::start(pool, plan, resume).await?
            }
            (Some(Some(_)), _, _) => {
                // A first load this server cannot resume by ctid: the table
                // is read again by cursor (records repeat, none is lost).
                tracing::warn!(source = %self.name, "a first load cannot be resumed by ctid here; reading the table again by cursor");
                None
            }
            _ => None,
        };
        Ok(RunReader {
            source: self.clone(),
            plan,
            after,
            bound,
            done: false,
            key_field: key_field.map(str::to_string),
            first_load,
        })
    }

    /// Whether a run can read (`caudal doctor`): runs the source's query
    /// with `LIMIT 0` (which checks the table, the columns and the user's
    /// SELECT privilege without reading a row), then checks the cursor
    /// columns against what the query returns.
    pub async fn probe(&self) -> caudal_core::probe::Finding {
        use caudal_core::probe::Finding;
        let sql = format!(
            "SELECT {} FROM {} LIMIT 0",
            self.select_list(),
            self.relation()
        );
        let sql = || sqlx::AssertSqlSafe(sql.clone());
        let ran = match &self.pool {
            Pool::Postgres(p) => sqlx::query(sql()).execute(p).await.map(drop),
            #[cfg(feature = "mysql")]
            Pool::Mysql(p) => sqlx::query(sql()).execute(p).await.map(drop),
            Pool::Sqlite(p) => sqlx::query(sql()).execute(p).await.map(drop),
        };
        if let Err(e) = ran {
            let fix = self.read_fix(&e).await;
            let said = match &e {
                sqlx::Error::Database(d) => d.message().to_string(),
                other => other.to_string(),
            };
            return Finding::fail("read", format!("cannot read {}: {said}", self.what()), fix);
        }
        match self.describe().await.and_then(|columns| {
            self.plan(&columns)?;
            Ok(columns.len())
        }) {
            Ok(n) => Finding::ok(
                "read",
                format!(
                    "{} is readable: {n} columns, cursor ({})",
                    self.what(),
                    self.config.cursor.join(", ")
                ),
            ),
            Err(e) => Finding::fail(
                "read",
                e.report(),
                "correct `cursor` (or `columns`, `lag`) to match what the source returns",
            ),
        }
    }

    /// What to change when reading the source failed with `e`.
    async fn read_fix(&self, e: &sqlx::Error) -> String {
        let (code, text) = match e {
            sqlx::Error::Database(d) => (
                d.code().map(|c| c.to_string()).unwrap_or_default(),
                d.message().to_ascii_lowercase(),
            ),
            other => (String::new(), other.to_string().to_ascii_lowercase()),
        };
        let denied = code == "42501" || text.contains("denied") || text.contains("permission");
        if denied {
            let user: Option<String> = match &self.pool {
                Pool::Postgres(p) => sqlx::query_scalar("SELECT current_user::text")
                    .fetch_one(p)
                    .await
                    .ok(),
                #[cfg(feature = "mysql")]
                Pool::Mysql(p) => sqlx::query_scalar("SELECT CURRENT_USER()")
                    .fetch_one(p)
                    .await
                    .ok(),
                Pool::Sqlite(_) => None,
            };
            let user = user.unwrap_or_else(|| "the source's user".to_string());
            return match &self.config.table {
                Some(_) => format!("GRANT SELECT ON {} TO {user}", self.relation()),
                None => format!("GRANT SELECT on the tables of `query` TO {user}"),
            };
        }
        let missing_table = code == "42P01"
            || code == "42S02"
            || text.contains("no such table")
            || text.contains("doesn't exist");
        if missing_table {
            return "create the table, or correct `table` (or `query`) in the source".into();
        }
        if code == "42703" || code == "42S22" || text.contains("no such column") {
            return "correct `columns` (or `query`): a column it names does not exist".into();
        }
        "correct the source's `table`, `query` or `columns`, or the user's privileges".into()
    }

    /// Refuses a checkpoint whose cursor has another number of columns.
    fn check_cursor_width(&self, values: &[CursorValue], plan: &Plan) -> Result<()> {
        if values.len() == plan.cursor_kinds.len() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Config,
            format!(
                "source {:?}: the checkpoint has {} cursor values but the cursor has {} \
                 columns; the cursor changed since the checkpoint was saved \
                 (see `caudal checkpoint reset`)",
                self.name,
                values.len(),
                plan.cursor_kinds.len()
            ),
        ))
    }

    /// The columns of the source's result set, with their kinds.
    async fn describe(&self) -> Result<Vec<ColumnSpec>> {
        let probe = format!(
            "SELECT {} FROM {} LIMIT 0",
            self.select_list(),
            self.relation()
        );
        let result = match &self.pool {
            Pool::Postgres(p) => postgres::describe(p, probe).await,
            #[cfg(feature = "mysql")]
            Pool::Mysql(p) => mysql::describe(p, probe).await,
            Pool::Sqlite(p) => sqlite::describe(p, probe).await,
        };
        result.map_err(|e| {
            Error::with_source(
                ErrorKind::Query,
                format!(
                    "source {:?}: cannot read the columns of {}",
                    self.name,
                    self.what()
                ),
                e,
            )
        })
    }

    fn what(&self) -> String {
        match (&self.config.table, &self.config.query) {
            (Some(t), _) => format!("table {t:?}"),
            _ => "the configured query".into(),
        }
    }

    fn quote(&self, ident: &str) -> String {
        quote_ident(self.dialect, ident)
    }

    fn select_list(&self) -> String {
        match &self.config.columns {
            Some(cols) if !cols.is_empty() => cols
                .iter()
                .map(|c| self.quote(c))
                .collect::<Vec<_>>()
                .join(", "),
            _ => "*".into(),
        }
    }

    fn relation(&self) -> String {
        match (&self.config.table, &self.config.query) {
            (Some(table), _) => table
                .split('.')
                .map(|part| self.quote(part))
                .collect::<Vec<_>>()
                .join("."),
            (None, Some(query)) => {
                format!("({}) AS caudal_src", query.trim().trim_end_matches(';'))
            }
            (None, None) => "caudal_missing_table".into(),
        }
    }

    fn plan(&self, columns: &[ColumnSpec]) -> Result<Plan> {
        let mut cursor_kinds = Vec::new();
        for name in &self.config.cursor {
            let col = columns.iter().find(|c| &c.name == name).ok_or_else(|| {
                let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "source {:?}: cursor column {name:?} is not in {} (columns: {})",
                        self.name,
                        self.what(),
                        names.join(", ")
                    ),
                )
            })?;
            if let ColumnKind::Other(t) = &col.kind
                && self.dialect != SqlDialect::Sqlite
            {
                {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "source {:?}: cursor column {name:?} has type {t}, which cannot be a \
                             cursor; use integer, decimal, text, date, timestamp or uuid columns",
                            self.name
                        ),
                    ));
                }
            }
            cursor_kinds.push(col.kind.clone());
        }
        let temporal = cursor_kinds.first().is_some_and(ColumnKind::is_temporal);
        let lag = match self.config.lag {
            Some(l) if l.as_std().is_zero() => None,
            Some(l) if !temporal => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "source {:?}: lag = \"{l}\" needs a timestamp as the first cursor column, \
                         but {:?} is not one; remove `lag` or set it to \"0s\"",
                        self.name, self.config.cursor[0]
                    ),
                ));
            }
            Some(l) => Some(l.as_std()),
            None if temporal => Some(DEFAULT_LAG.as_std()),
            None => None,
        };

        let cursor: Vec<String> = self.config.cursor.iter().map(|c| self.quote(c)).collect();
        let order = cursor.join(", ");
        let base = format!("SELECT {} FROM {}", self.select_list(), self.relation());
        let ph = |i: usize| placeholder(self.dialect, i);

        // Placeholders are numbered 1.. for PostgreSQL; MySQL and SQLite use `?`.
        let mut first_preds = Vec::new();
        let mut next_preds = Vec::new();
        let mut next_binds = Vec::new();
        let mut n = 0;
        let (keyset, binds) = keyset_predicate(self.dialect, &cursor, &mut n);
        next_preds.push(keyset);
        next_binds.extend(binds);
        if lag.is_some() {
            let first_bound = self.lag_predicate(&cursor[0], &ph(1));
            first_preds.push(first_bound);
            n += 1;
            next_preds.push(self.lag_predicate(&cursor[0], &ph(n)));
            next_binds.push(usize::MAX); // marks the bound
        }
        let limit = self.config.page_size.max(1);
        let render = |preds: &[String]| {
            let filter = if preds.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", preds.join(" AND "))
            };
            format!("{base}{filter} ORDER BY {order} LIMIT {limit}")
        };
        Ok(Plan {
            first: render(&first_preds),
            next: render(&next_preds),
            next_binds,
            cursor_kinds,
            lag,
            decode: DecodeOptions {
                decimals: self.config.decimals,
                json_columns: Default::default(),
            },
        })
    }

    fn lag_predicate(&self, column: &str, ph: &str) -> String {
        match self.dialect {
            // SQLite stores timestamps as text in several layouts; compare
            // them as instants. The keyset predicate still uses the index.
            SqlDialect::Sqlite => format!("julianday({column}) <= julianday({ph})"),
            _ => format!("{column} <= {ph}"),
        }
    }

    /// `db_now - lag`, typed like the first cursor column. The database's
    /// clock is used, not caudal's, so clock skew between hosts cannot widen
    /// or narrow the lag. Zone-less timestamps are compared in UTC.
    async fn lag_bound(&self, kind: &ColumnKind, lag: std::time::Duration) -> Result<CursorValue> {
        let now = match &self.pool {
            Pool::Postgres(p) => postgres::now_utc(p).await,
            #[cfg(feature = "mysql")]
            Pool::Mysql(p) => mysql::now_utc(p).await,
            Pool::Sqlite(p) => sqlite::now_utc(p).await,
        }
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Query,
                format!("source {:?}: cannot read the database clock", self.name),
                e,
            )
        })?;
        let lag = chrono::Duration::from_std(lag).unwrap_or(chrono::Duration::MAX);
        let bound = now - lag;
        Ok(match kind {
            ColumnKind::TimestampTz => CursorValue::TimestampTz(format_utc(&bound)),
            _ => CursorValue::Timestamp(format_naive(&bound.naive_utc())),
        })
    }

    async fn fetch(
        &self,
        plan: &Plan,
        sql: &str,
        binds: &[&CursorValue],
        key_field: Option<&str>,
    ) -> Result<Vec<Record>> {
        let cursor = &self.config.cursor;
        let kinds = &plan.cursor_kinds;
        // The values the engine needs besides the record's text: the
        // cursor's, then the key field's.
        let mut pick: Vec<&str> = cursor.iter().map(String::as_str).collect();
        pick.extend(key_field);
        let pick = &pick[..];
        let rows = match &self.pool {
            Pool::Postgres(p) => postgres::fetch(p, sql, binds, &plan.decode, pick).await,
            #[cfg(feature = "mysql")]
            Pool::Mysql(p) => mysql::fetch(p, sql, binds, &plan.decode)
                .await
                .map(|rows| encode_rows(rows, pick)),
            Pool::Sqlite(p) => sqlite::fetch(p, sql, binds, &plan.decode)
                .await
                .map(|rows| encode_rows(rows, pick)),
        }
        .map_err(|e| match e {
            FetchError::Sql(e) => Error::with_source(
                connect_kind(&e),
                format!("source {:?}: query on {} failed", self.name, self.what()),
                e,
            ),
            FetchError::Decode(msg) => {
                Error::new(ErrorKind::Decode, format!("source {:?}: {msg}", self.name))
            }
        })?;
        rows.into_iter()
            .map(|row| {
                let mut picked = row.picked.into_iter();
                let values = cursor
                    .iter()
                    .zip(kinds)
                    .map(|(col, kind)| {
                        let v = picked.next().unwrap_or(Value::Null);
                        kind.cursor_value(col, &v)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Record {
                    data: row.data,
                    position: Position::Cursor { values },
                    key: caudal_core::sink::key_text(picked.next()),
                })
            })
            .collect()
    }
}

/// Reads the pages of one run, in cursor order.
#[derive(Debug)]
pub struct RunReader {
    source: SqlSource,
    plan: Plan,
    after: Option<Vec<CursorValue>>,
    bound: Option<CursorValue>,
    done: bool,
    /// The column records are keyed by.
    key_field: Option<String>,
    /// The first load, when this run reads one.
    first_load: Option<first_load::FirstLoad>,
}

impl RunReader {
    /// The next page of rows, or `None` when the run has read everything up
    /// to its bound. Pages are never empty.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Record>>> {
        if let Some(load) = &mut self.first_load {
            return load.next_page().await;
        }
        if self.done {
            return Ok(None);
        }
        let records = match &self.after {
            None => {
                let binds: Vec<&CursorValue> = self.bound.iter().collect();
                self.source
                    .fetch(
                        &self.plan,
                        &self.plan.first,
                        &binds,
                        self.key_field.as_deref(),
                    )
                    .await?
            }
            Some(after) => {
                let mut binds = Vec::with_capacity(self.plan.next_binds.len());
                for &i in &self.plan.next_binds {
                    match (i, &self.bound) {
                        (usize::MAX, Some(b)) => binds.push(b),
                        (i, _) => binds.push(&after[i]),
                    }
                }
                self.source
                    .fetch(
                        &self.plan,
                        &self.plan.next,
                        &binds,
                        self.key_field.as_deref(),
                    )
                    .await?
            }
        };
        if records.len() < self.source.config.page_size.max(1) as usize {
            self.done = true;
        }
        match records.last() {
            None => Ok(None),
            Some(last) => {
                if let Position::Cursor { values } = &last.position {
                    self.after = Some(values.clone());
                }
                Ok(Some(records))
            }
        }
    }

    /// The upper bound of this run on the first cursor column, if a lag
    /// applies.
    pub fn bound(&self) -> Option<&CursorValue> {
        self.bound.as_ref()
    }
}

/// A failure inside a dialect module, mapped to an [`Error`] by the caller
/// (which knows the source's name).
#[derive(Debug)]
pub(crate) enum FetchError {
    Sql(sqlx::Error),
    Decode(String),
}

impl From<sqlx::Error> for FetchError {
    fn from(e: sqlx::Error) -> Self {
        Self::Sql(e)
    }
}

fn connect_kind(e: &sqlx::Error) -> ErrorKind {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => ErrorKind::Connect,
        sqlx::Error::Database(_) => ErrorKind::Query,
        _ => ErrorKind::Query,
    }
}

/// Quotes an identifier for a dialect, doubling embedded quote characters.
pub fn quote_ident(dialect: SqlDialect, ident: &str) -> String {
    match dialect {
        SqlDialect::Mysql => format!("`{}`", ident.replace('`', "``")),
        SqlDialect::Postgres | SqlDialect::Sqlite => format!("\"{}\"", ident.replace('"', "\"\"")),
    }
}

fn placeholder(dialect: SqlDialect, i: usize) -> String {
    match dialect {
        SqlDialect::Postgres => format!("${i}"),
        SqlDialect::Mysql | SqlDialect::Sqlite => "?".into(),
    }
}

/// `(c1, .., ck) > (v1, .., vk)` in the form each database optimises best.
/// Returns the predicate and, in bind order, the index of the cursor value
/// each placeholder takes. `n` counts placeholders used so far.
pub(crate) fn keyset_predicate(
    dialect: SqlDialect,
    cursor: &[String],
    n: &mut usize,
) -> (String, Vec<usize>) {
    match dialect {
        SqlDialect::Postgres | SqlDialect::Sqlite => {
            let phs: Vec<String> = (0..cursor.len())
                .map(|_| {
                    *n += 1;
                    placeholder(dialect, *n)
                })
                .collect();
            let binds = (0..cursor.len()).collect();
            if cursor.len() == 1 {
                (format!("{} > {}", cursor[0], phs[0]), binds)
            } else {
                (
                    format!("({}) > ({})", cursor.join(", "), phs.join(", ")),
                    binds,
                )
            }
        }
        // MySQL/MariaDB do not use an index range for row comparisons in
        // every version; `c1 >= v1 AND (c1 > v1 OR (...))` lets the leading
        // `>=` drive an index range scan.
        SqlDialect::Mysql => {
            fn expand(cursor: &[String], i: usize, binds: &mut Vec<usize>) -> String {
                let c = &cursor[i];
                if i + 1 == cursor.len() {
                    binds.push(i);
                    return format!("{c} > ?");
                }
                binds.push(i);
                binds.push(i);
                let inner = expand(cursor, i + 1, binds);
                format!("{c} >= ? AND ({c} > ? OR ({inner}))")
            }
            let mut binds = Vec::new();
            let pred = expand(cursor, 0, &mut binds);
            *n += binds.len();
            (format!("({pred})"), binds)
        }
    }
}

/// RFC 3339 in UTC with as many fractional digits as needed.
pub(crate) fn format_utc(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// A zone-less timestamp as stored: `YYYY-MM-DDTHH:MM:SS[.ffffff]`.
pub(crate) fn format_naive(t: &chrono::NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.f").to_string()
}

pub(crate) fn parse_utc(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

pub(crate) fn parse_naive(s: &str) -> Option<chrono::NaiveDateTime> {
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
        .ok()
}

/// An exact decimal rendered per the configured format. In `number` form a
/// value is emitted as a JSON number only when a double holds it exactly
/// (15 significant digits or fewer); longer values stay strings, so no digit
/// is ever lost.
pub(crate) fn decimal_value(text: String, format: DecimalFormat) -> Value {
    match format {
        DecimalFormat::String => Value::String(text),
        DecimalFormat::Number => {
            let digits = text.chars().filter(char::is_ascii_digit).count();
            let significant = text
                .trim_start_matches(['-', '+'])
                .trim_start_matches(['0', '.'])
                .chars()
                .filter(char::is_ascii_digit)
                .count();
            match text.parse::<f64>() {
                Ok(f) if significant <= 15 && digits <= 40 && f.is_finite() => {
                    serde_json::Number::from_f64(f).map_or(Value::String(text), Value::Number)
                }
                _ => Value::String(text),
            }
        }
    }
}

pub(crate) fn base64(bytes: &[u8]) -> Value {
    use base64::Engine as _;
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// One decoded row, columns in result order.
pub(crate) type Row = Map<String, Value>;

/// A row encoded as its record, with the values of the columns the engine
/// asked for (`pick`: the cursor's, the key field's), in that order.
#[derive(Debug)]
pub(crate) struct EncodedRow {
    pub data: Json,
    pub picked: Vec<Value>,
}

/// Whether the server reads ctid ranges without scanning the whole table
/// (TID range scans, PostgreSQL 14 and later): first loads then read in
/// parallel ranges.
async fn copy_ranges(pool: &PgPool) -> bool {
    sqlx::query_scalar::<_, i32>("SELECT current_setting('server_version_num')::int4")
        .fetch_one(pool)
        .await
        .is_ok_and(|v| v >= 140_000)
}

/// Rows decoded as maps, encoded (sources whose decoder builds values).
fn encode_rows(rows: Vec<Row>, pick: &[&str]) -> Vec<EncodedRow> {
    rows.into_iter()
        .map(|row| EncodedRow {
            data: Json::from_map(&row),
            picked: pick
                .iter()
                .map(|c| row.get(*c).cloned().unwrap_or(Value::Null))
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_with_escapes() {
        assert_eq!(quote_ident(SqlDialect::Postgres, "a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident(SqlDialect::Mysql, "a`b"), "`a``b`");
    }

    #[test]
    fn mysql_keyset_expands_with_repeated_binds() {
        let cursor = vec!["`t`".to_string(), "`id`".to_string()];
        let mut n = 0;
        let (pred, binds) = keyset_predicate(SqlDialect::Mysql, &cursor, &mut n);
        assert_eq!(pred, "(`t` >= ? AND (`t` > ? OR (`id` > ?)))");
        assert_eq!(binds, vec![0, 0, 1]);
        assert_eq!(n, 3);
    }

    #[test]
    fn postgres_keyset_is_a_row_comparison() {
        let cursor = vec!["\"t\"".to_string(), "\"id\"".to_string()];
        let mut n = 0;
        let (pred, binds) = keyset_predicate(SqlDialect::Postgres, &cursor, &mut n);
        assert_eq!(pred, "(\"t\", \"id\") > ($1, $2)");
        assert_eq!(binds, vec![0, 1]);
    }

    #[test]
    fn decimals_as_numbers_never_lose_digits() {
        assert_eq!(
            decimal_value("12.50".into(), DecimalFormat::Number),
            serde_json::json!(12.5)
        );
        assert_eq!(
            decimal_value("12345678901234567890.5".into(), DecimalFormat::Number),
            serde_json::json!("12345678901234567890.5")
        );
        assert_eq!(
            decimal_value("0.000001".into(), DecimalFormat::Number),
            serde_json::json!(0.000001)
        );
        assert_eq!(
            decimal_value("7".into(), DecimalFormat::String),
            serde_json::json!("7")
        );
    }
}

//! PostgreSQL change data capture: logical replication with `pgoutput`.
//!
//! A run first makes sure of what replication needs (wal_level, the
//! REPLICATION privilege, primary keys, the publication and the slot), then
//! reads the tables' existing rows in primary-key chunks from the snapshot
//! the slot exported, then streams changes from exactly the slot's start.
//! See [`reader`] for the position and acknowledgement rules.
//!
//! Records have one shape for every change:
//! `{op, table, key, before, after, unchanged, lsn, xid, commit_time, index}`
//! where `op` is `read` (snapshot), `insert`, `update`, `delete` or
//! `truncate`; `unchanged` lists the columns left out of `after` because
//! PostgreSQL did not send their (unchanged, TOASTed) value.

mod catalog;
mod chunk;
mod reader;

use std::sync::Arc;

use caudal_core::config::{CdcSnapshot, SqlSourceConfig};
use caudal_core::probe::Finding;
use caudal_core::record::{Position, format_lsn};
use caudal_core::status::{Replication, ReplicationSource, SlotReplication};
use caudal_core::{Error, ErrorKind, Result};
use pg_walstream::{PgReplicationConnection, ReplicationSlotOptions, SlotType};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use catalog::Slot;
pub use reader::{BACKFILL_PREFIX, HEARTBEAT_PREFIX};

use crate::sources::change::{
    BackfillRequests, CdcReader, ChangeCapture, Held, Released, SharedLag, read_lag, update_lag,
};
use catalog::{Table, query_error};
use reader::{SnapshotStart, Task, replication_error};

/// The slot part of a PostgreSQL source's figures.
pub(crate) fn slot_figures(r: &mut Replication) -> Option<&mut SlotReplication> {
    match &mut r.source {
        ReplicationSource::Postgres(slot) => Some(slot),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Empty figures of a slot.
fn figures(slot: &str) -> Replication {
    Replication::new(ReplicationSource::Postgres(SlotReplication {
        slot: slot.to_string(),
        ..SlotReplication::default()
    }))
}

/// A PostgreSQL CDC source of one pipeline. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PgCdcSource {
    name: String,
    config: SqlSourceConfig,
    pool: PgPool,
    slot: String,
    publication: String,
    lag: SharedLag,
    /// An interrupted snapshot starts over from a new slot (an exact
    /// snapshot at one consistent point) instead of reading on at the
    /// current state: what counts rows (live aggregates) needs it.
    exact_snapshot: bool,
}

/// The default name of a pipeline's slot and publication.
pub use caudal_core::config::default_cdc_name as default_name;

impl PgCdcSource {
    /// Prepares the source; nothing is queried until a run opens.
    pub async fn connect(pipeline: &str, name: &str, config: &SqlSourceConfig) -> Result<Self> {
        let url = config.url.expose();
        let pool = crate::sources::sql::postgres::connect_pool(url, 4)
            .await
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Connect,
                    format!(
                        "source {name:?}: cannot connect to postgres at {}",
                        caudal_core::units::redact_url(url)
                    ),
                    e,
                )
            })?;
        Ok(Self {
            name: name.to_string(),
            config: config.clone(),
            pool,
            slot: config
                .slot
                .clone()
                .unwrap_or_else(|| default_name(pipeline)),
            publication: config
                .publication
                .clone()
                .unwrap_or_else(|| default_name(pipeline)),
            lag: Arc::new(std::sync::Mutex::new(figures(
                &config
                    .slot
                    .clone()
                    .unwrap_or_else(|| default_name(pipeline)),
            ))),
            exact_snapshot: false,
        })
    }

    /// An interrupted snapshot starts over from a new slot (see
    /// `exact_snapshot`).
    pub fn with_exact_snapshot(mut self) -> Self {
        self.exact_snapshot = true;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn slot(&self) -> &str {
        &self.slot
    }

    pub fn publication(&self) -> &str {
        &self.publication
    }

    /// The publication of the tables whose inserts only can be captured.
    fn inserts_publication(&self) -> String {
        let mut name = format!("{}_inserts", self.publication);
        name.truncate(63);
        name
    }

    fn tables(&self) -> Vec<String> {
        match (&self.config.tables, &self.config.table) {
            (Some(t), _) => t.clone(),
            (None, Some(t)) => vec![t.clone()],
            (None, None) => Vec::new(),
        }
    }

    /// The libpq connection string of a replication connection.
    fn conninfo(&self) -> String {
        let url = self.config.url.expose();
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}replication=database&application_name=caudal")
    }

    /// The slot as the server shows it, if it exists.
    pub async fn slot_info(&self) -> Result<Option<Slot>> {
        catalog::slot(&self.pool, &self.name, &self.slot).await
    }

    /// What a run needs, checked without changing anything (`caudal
    /// doctor`): the server's prerequisites, each table (exists, readable,
    /// keyed, publishable), the publication, and the slot (its state, or
    /// room for it on the server).
    pub async fn probe(&self) -> Vec<Finding> {
        let fail = |check: &str, e: Error| {
            Finding::fail(
                check,
                e.report(),
                e.kind()
                    .hint()
                    .unwrap_or("check the source's settings and its server"),
            )
        };
        let mut out = match catalog::prerequisites(&self.pool, &self.name).await {
            Ok(found) => found,
            Err(e) => return vec![fail("prerequisites", e)],
        };
        for t in self.tables() {
            out.push(match catalog::table(&self.pool, &self.name, &t).await {
                Err(e) => table_finding(&t, &e),
                Ok(table) => match identity_problem(&table) {
                    Some(problem) => problem,
                    None if table.keyless() => Finding::warn(
                        format!("table {}", table.name),
                        format!("{} has no primary key", table.name),
                        "add a primary key: without one, changes are ordered against the whole \
                         table and backfills are refused",
                    ),
                    None => Finding::ok(
                        format!("table {}", table.name),
                        format!("{} is readable and keyed", table.name),
                    ),
                },
            });
        }
        out.push(
            match catalog::publication_exists(&self.pool, &self.name, &self.publication).await {
                Ok(true) => Finding::ok(
                    "publication",
                    format!("publication {:?} exists", self.publication),
                ),
                Ok(false) => Finding::ok(
                    "publication",
                    format!(
                        "publication {:?} does not exist yet: the first run creates it (the \
                         user must own the tables)",
                        self.publication
                    ),
                ),
                Err(e) => fail("publication", e),
            },
        );
        out.push(match self.slot_info().await {
            Err(e) => fail("slot", e),
            Ok(Some(slot)) => slot_finding(&self.slot, &slot),
            Ok(None) => match catalog::slot_capacity(&self.pool, &self.name).await {
                Err(e) => fail("slot", e),
                Ok((used, max)) if used >= max => Finding::fail(
                    "slot",
                    format!(
                        "slot {:?} does not exist yet, and the server has no free slot ({used} \
                         of max_replication_slots = {max} in use)",
                        self.slot
                    ),
                    format!(
                        "drop slots no longer used (SELECT pg_drop_replication_slot(name)), or \
                         ALTER SYSTEM SET max_replication_slots = {} and restart PostgreSQL",
                        max + 4
                    ),
                ),
                Ok((used, max)) => Finding::ok(
                    "slot",
                    format!(
                        "slot {:?} does not exist yet: the first run creates it ({used} of \
                         max_replication_slots = {max} in use)",
                        self.slot
                    ),
                ),
            },
        });
        out
    }

    /// Starts one run from `from` (the last durable position; `None` for a
    /// pipeline that has captured nothing yet). `follow`: stream until
    /// stopped; otherwise stop once the log as of now is read.
    async fn open(
        &self,
        from: Option<&Position>,
        follow: bool,
        backfills: Option<Arc<dyn BackfillRequests>>,
    ) -> Result<CdcReader> {
        catalog::preflight(&self.pool, &self.name).await?;
        let mut tables = Vec::new();
        for t in self.tables() {
            tables.push(catalog::table(&self.pool, &self.name, &t).await?);
        }
        for t in &tables {
            if t.keyless() {
                keyless_notice(&self.name, t);
            } else if let Some(problem) = identity_problem(t) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("source {:?}: {}", self.name, problem.message()),
                ));
            }
        }
        // Tables whose updates PostgreSQL cannot publish go in a
        // publication of inserts only (see `Table::updates_expressible`).
        let (full, inserts): (Vec<Table>, Vec<Table>) =
            tables.iter().cloned().partition(Table::updates_expressible);
        let created_publication =
            catalog::ensure_publication(&self.pool, &self.name, &self.publication, &full, false)
                .await?;
        let mut publications = vec![self.publication.clone()];
        if !inserts.is_empty() {
            catalog::ensure_publication(
                &self.pool,
                &self.name,
                &self.inserts_publication(),
                &inserts,
                true,
            )
            .await?;
            publications.push(self.inserts_publication());
        }
        let mut slot = self.slot_info().await?;
        let mut from = from;
        let interrupted = matches!(
            from,
            None | Some(Position::Snapshot { .. } | Position::SnapshotRow { .. })
        );
        if self.exact_snapshot
            && interrupted
            && slot.is_some()
            && self.config.snapshot == CdcSnapshot::Initial
        {
            tracing::warn!(source = %self.name, slot = %self.slot, "the snapshot was interrupted: it starts over from a new slot, at one consistent point (live aggregates count it)");
            self.drop_replication(false).await?;
            slot = None;
            from = None;
        }
        let (snapshot, stream_from, resume_from) = match (from, slot) {
            (None, None) => {
                let (conn, lsn, snapshot) = self.create_slot().await?;
                let start = (self.config.snapshot == CdcSnapshot::Initial).then(|| SnapshotStart {
                    exported: Some((std::sync::Mutex::new(conn), snapshot)),
                    resume: None,
                    lsn,
                });
                (start, lsn, None)
            }
            (None, Some(s)) => {
                let lsn = s.confirmed_flush.unwrap_or(0);
                let start =
                    (self.config.snapshot == CdcSnapshot::Initial).then_some(SnapshotStart {
                        exported: None,
                        resume: None,
                        lsn,
                    });
                (start, lsn, None)
            }
            (Some(p), None) => {
                return Err(Error::new(
                    ErrorKind::Resync,
                    format!(
                        "source {:?}: replication slot {:?} does not exist, but the pipeline has \
                         captured up to {}; the changes since are lost to caudal, so it stops \
                         rather than skip them. `caudal resync PIPELINE` reads the tables again \
                         and streams from a new slot",
                        self.name,
                        self.slot,
                        p.display()
                    ),
                ));
            }
            (
                Some(
                    p @ (Position::Snapshot { lsn, table, .. }
                    | Position::SnapshotRow { lsn, table, .. }),
                ),
                Some(_),
            ) => {
                let index = tables.iter().position(|t| t.name == *table).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "source {:?}: the snapshot stopped in table {table}, which is no longer \
                             configured; `caudal resync` starts over",
                            self.name
                        ),
                    )
                })?;
                // A position by primary key (an earlier version's) restarts
                // its table; one by ctid reads on after it.
                let after = match p {
                    Position::SnapshotRow { page, tuple, .. } => Some((*page, *tuple)),
                    _ => None,
                };
                let start = SnapshotStart {
                    exported: None,
                    resume: Some((index, after)),
                    lsn: *lsn,
                };
                (Some(start), *lsn, None)
            }
            (Some(Position::Lsn { lsn, index }), Some(_)) => (None, *lsn, Some((*lsn, *index))),
            (Some(Position::SnapshotDone { lsn }), Some(_)) => (None, *lsn, None),
            (Some(other), Some(_)) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "source {:?}: the checkpoint {} is not a PostgreSQL log position; the \
                         source changed since it was saved (see `caudal resync`)",
                        self.name,
                        other.display()
                    ),
                ));
            }
        };
        update_lag(&self.lag, |l| *l = figures(&self.slot));
        let (out, pages) = mpsc::channel(2);
        let out_guard = out.clone();
        let (durable_tx, durable) = watch::channel(from.cloned());
        let stop = CancellationToken::new();
        let task = Task {
            source: self.name.clone(),
            pool: self.pool.clone(),
            conninfo: self.conninfo(),
            slot: self.slot.clone(),
            publications,
            tables,
            decimals: self.config.decimals,
            page_size: self.config.page_size.max(1) as usize,
            heartbeat: Some(
                self.config
                    .heartbeat
                    .unwrap_or(caudal_core::config::DEFAULT_HEARTBEAT)
                    .as_std(),
            ),
            follow,
            snapshot,
            stream_from,
            from: resume_from,
            out,
            durable,
            lag: self.lag.clone(),
            stop: stop.clone(),
            page: Vec::new(),
            requests: backfills,
            backfills: reader::Backfills::default(),
            streamed: false,
        };
        crate::sources::change::spawn_reader(task.run(), out_guard);
        Ok(CdcReader::new(pages, durable_tx, stop, created_publication))
    }

    /// Creates the slot, exporting its snapshot; returns the connection
    /// (which must stay open until the snapshot is imported), the
    /// consistent point and the snapshot's name.
    async fn create_slot(&self) -> Result<(PgReplicationConnection, u64, String)> {
        let conninfo = self.conninfo();
        let slot = self.slot.clone();
        let name = self.name.clone();
        let created = tokio::task::spawn_blocking(move || {
            let mut conn = PgReplicationConnection::connect(&conninfo)?;
            let result = conn.create_replication_slot_with_options(
                &slot,
                SlotType::Logical,
                Some("pgoutput"),
                &ReplicationSlotOptions {
                    snapshot: Some("export".into()),
                    ..ReplicationSlotOptions::default()
                },
            )?;
            let lsn = result.get_value(0, 1).unwrap_or_default();
            let snapshot = result.get_value(0, 2).unwrap_or_default();
            Ok::<_, pg_walstream::ReplicationError>((conn, lsn, snapshot))
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Internal, "the slot task failed", e))?
        .map_err(|e| replication_error(&name, "cannot create the replication slot", &e))?;
        let (conn, lsn_text, snapshot) = created;
        let lsn = caudal_core::record::parse_lsn(&lsn_text).ok_or_else(|| {
            Error::new(
                ErrorKind::Internal,
                format!("the server gave an unreadable consistent point {lsn_text:?}"),
            )
        })?;
        tracing::info!(source = %self.name, slot = %self.slot, consistent_point = %format_lsn(lsn), "created the replication slot");
        Ok((conn, lsn, snapshot))
    }

    /// Asks the pipeline streaming from this source's slot to backfill the
    /// request saved under `id` (`caudal backfill`): a message in the log,
    /// read by the running pipeline at its place in the stream.
    pub async fn request_backfill(&self, id: &str) -> Result<()> {
        let content = serde_json::json!({"slot": self.slot, "id": id}).to_string();
        sqlx::query("SELECT pg_logical_emit_message(false, $1, $2)")
            .bind(BACKFILL_PREFIX)
            .bind(content)
            .execute(&self.pool)
            .await
            .map_err(|e| {
                query_error(
                    &self.name,
                    "cannot write the backfill request to the log",
                    e,
                )
            })?;
        Ok(())
    }

    /// Rows of `table` matching `filter`, to show a backfill's progress;
    /// also checks that the table and the filter are valid.
    pub async fn count_rows(&self, table: &str, filter: Option<&str>) -> Result<u64> {
        let t = catalog::table(&self.pool, &self.name, table).await?;
        if t.keyless() {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "source {:?}: table {} has no primary key (nor a replica identity index): a \
                     backfill reads a table in key order and leaves out rows changed meanwhile \
                     by their key, which it cannot do without one; `caudal resync` reads every \
                     table again",
                    self.name, t.name
                ),
            ));
        }
        let sql = match filter {
            Some(f) => format!("SELECT count(*)::int8 FROM {} WHERE ({f})", t.quoted),
            None => format!("SELECT count(*)::int8 FROM {}", t.quoted),
        };
        let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| {
                query_error(
                    &self.name,
                    &format!("cannot count the rows to backfill in {table}"),
                    e,
                )
            })?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Drops the pipeline's slot, and its publication when
    /// `drop_publication`. Returns what existed and was dropped.
    async fn drop_replication(&self, drop_publication: bool) -> Result<Dropped> {
        let mut dropped = Dropped::default();
        if let Some(slot) = self.slot_info().await? {
            if slot.active {
                // A walsender of a process that died may linger briefly.
                sqlx::query(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND active_pid IS NOT NULL",
                )
                .bind(&self.slot)
                .execute(&self.pool)
                .await
                .map_err(|e| query_error(&self.name, "cannot stop the slot's walsender", e))?;
            }
            let mut tries = 0;
            loop {
                match sqlx::query("SELECT pg_drop_replication_slot($1)")
                    .bind(&self.slot)
                    .execute(&self.pool)
                    .await
                {
                    Ok(_) => break,
                    Err(e) if tries < 50 && e.to_string().contains("is active") => {
                        tries += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        return Err(query_error(
                            &self.name,
                            "cannot drop the replication slot",
                            e,
                        ));
                    }
                }
            }
            dropped.slot = Some(self.slot.clone());
        }
        if drop_publication && self.drop_publication(&self.publication).await? {
            dropped.publication = Some(self.publication.clone());
        }
        Ok(dropped)
    }

    /// Drops publication `name` if it exists; true when it did.
    async fn drop_publication(&self, name: &str) -> Result<bool> {
        let exists: Option<(i64,)> =
            sqlx::query_as("SELECT 1::int8 FROM pg_publication WHERE pubname = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| query_error(&self.name, "cannot read pg_publication", e))?;
        if exists.is_none() {
            return Ok(false);
        }
        let sql = format!(
            "DROP PUBLICATION {}",
            crate::sources::sql::quote_ident(caudal_core::config::SqlDialect::Postgres, name)
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
            .map_err(|e| query_error(&self.name, "cannot drop the publication", e))?;
        Ok(true)
    }
}

/// What [`PgCdcSource::drop_replication`] removed.
#[derive(Clone, Debug, Default)]
struct Dropped {
    slot: Option<String>,
    publication: Option<String>,
}

#[async_trait::async_trait]
impl ChangeCapture for PgCdcSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn live(&self) -> Replication {
        read_lag(&self.lag)
    }

    async fn open_run(
        &self,
        from: Option<&Position>,
        follow: bool,
        backfills: Option<Arc<dyn BackfillRequests>>,
    ) -> Result<CdcReader> {
        self.open(from, follow, backfills).await
    }

    async fn server_status(
        &self,
        mut known: Replication,
        _checkpoint: Option<&Position>,
    ) -> Replication {
        if !matches!(known.source, ReplicationSource::Postgres(_)) {
            known.source = figures(&self.slot).source;
        }
        match self.slot_info().await {
            Err(e) => known.server_error = Some(format!("unreachable: {e}")),
            Ok(info) => {
                let lag_bytes = info
                    .as_ref()
                    .and_then(|i| i.lag_bytes)
                    .and_then(|b| u64::try_from(b).ok());
                if let Some(slot) = slot_figures(&mut known) {
                    slot.slot.clone_from(&self.slot);
                    slot.slot_exists = Some(info.is_some());
                    if let Some(i) = info {
                        slot.slot_active = Some(i.active);
                        slot.wal_status = i.wal_status;
                        slot.confirmed_lsn = i.confirmed_flush.map(format_lsn);
                    }
                }
                if let Some(b) = lag_bytes {
                    known.lag_bytes = Some(b);
                }
            }
        }
        known
    }

    fn held(&self, created_publication: bool) -> Option<Held> {
        Some(Held {
            source: self.name.clone(),
            slot: Some(self.slot.clone()),
            publication: Some(self.publication.clone()),
            publication_created: created_publication,
            extra_publications: vec![self.inserts_publication()],
        })
    }

    async fn release(&self, held: Option<&Held>) -> Result<Released> {
        let ours = held.is_some_and(|h| h.publication_created);
        let d = self.drop_replication(ours).await?;
        let mut out = Released::default();
        out.dropped
            .extend(d.slot.map(|s| format!("replication slot {s:?}")));
        out.dropped
            .extend(d.publication.map(|p| format!("publication {p:?}")));
        // The publication of inserts only is always caudal's.
        if self.drop_publication(&self.inserts_publication()).await? {
            out.dropped
                .push(format!("publication {:?}", self.inserts_publication()));
        }
        if !ours {
            out.kept.push(format!(
                "publication {:?} (not created by caudal)",
                self.publication
            ));
        }
        if out.dropped.is_empty() {
            out.note = Some(format!(
                "no slot {:?} nor publication {:?} to drop",
                self.slot, self.publication
            ));
        }
        Ok(out)
    }

    async fn restart(&self) -> Result<Released> {
        let d = self.drop_replication(false).await?;
        Ok(Released {
            dropped: d
                .slot
                .map(|s| format!("replication slot {s:?}"))
                .into_iter()
                .collect(),
            kept: Vec::new(),
            note: Some(format!(
                "the next run creates slot {:?}, reads the tables again and streams from there",
                self.slot
            )),
        })
    }

    async fn count_rows(&self, table: &str, filter: Option<&str>) -> Result<u64> {
        PgCdcSource::count_rows(self, table, filter).await
    }

    async fn request_backfill(&self, id: &str) -> Result<()> {
        PgCdcSource::request_backfill(self, id).await
    }
}

/// Says what is captured of a table without a key, and what to change to
/// capture more.
fn keyless_notice(source: &str, t: &Table) {
    if t.updates_expressible() {
        tracing::info!(
            source,
            table = %t.name,
            "table has no primary key: every change is captured, with the whole old row as the identity of updates and deletes (REPLICA IDENTITY FULL); its changes keep their order across the whole table"
        );
    } else {
        tracing::warn!(
            source,
            table = %t.name,
            "table has no primary key: its inserts and truncates are captured, its updates and deletes cannot be (PostgreSQL logs nothing that identifies the row); ALTER TABLE {} REPLICA IDENTITY FULL (or add a primary key) to capture them",
            t.quoted
        );
    }
}

/// A table PostgreSQL would refuse updates and deletes of once published.
fn identity_problem(t: &Table) -> Option<Finding> {
    (!t.keyless() && t.replica_identity == 'n').then(|| {
        Finding::fail(
            format!("table {}", t.name),
            format!(
                "table {} has REPLICA IDENTITY NOTHING, so PostgreSQL refuses its updates and \
                 deletes once published",
                t.name
            ),
            format!("ALTER TABLE {} REPLICA IDENTITY DEFAULT", t.quoted),
        )
    })
}

/// A table that cannot be captured: missing, unreadable, or keyed by a
/// type caudal cannot order.
fn table_finding(written: &str, e: &Error) -> Finding {
    let fix = match e.kind() {
        ErrorKind::Config if e.message().contains("does not exist") => {
            "create the table, or correct `tables` (schema-qualified: schema.table)".to_string()
        }
        _ if e.message().contains("GRANT SELECT") => {
            format!("GRANT SELECT ON {written} TO the source's user")
        }
        kind => kind
            .hint()
            .unwrap_or("check the table and the source's user")
            .to_string(),
    };
    Finding::fail(format!("table {written}"), e.report(), fix)
}

/// An existing slot: usable, or lost (the server dropped the WAL it held).
fn slot_finding(name: &str, slot: &Slot) -> Finding {
    if slot.wal_status.as_deref() == Some("lost") {
        return Finding::fail(
            "slot",
            format!("slot {name:?} is lost: the server removed WAL it still needed"),
            "`caudal resync PIPELINE` reads the tables again and streams from a new slot",
        );
    }
    if slot.plugin.as_deref().is_some_and(|p| p != "pgoutput") {
        return Finding::fail(
            "slot",
            format!(
                "slot {name:?} uses plugin {:?}; caudal reads pgoutput",
                slot.plugin.as_deref().unwrap_or_default()
            ),
            "give the source another `slot`, or drop this one if nothing else uses it",
        );
    }
    let lag = slot
        .lag_bytes
        .map_or_else(String::new, |b| format!(", {b} bytes of WAL held"));
    Finding::ok(
        "slot",
        format!(
            "slot {name:?} exists ({}{lag})",
            if slot.active {
                "in use by a running pipeline"
            } else {
                "not in use"
            }
        ),
    )
}

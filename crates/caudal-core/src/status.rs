//! What caudal shows of a pipeline: one typed shape, produced by the
//! engine, printed by `caudal status` and `caudal top`, answered by the
//! API and read back by its clients.
//!
//! Promises:
//! - One shape everywhere: the CLI, the API (and its OpenAPI schema) and
//!   the remote client all use these types, so a field cannot mean one
//!   thing in one place and another elsewhere.
//! - Replication figures are typed per source kind ([`ReplicationSource`]):
//!   a PostgreSQL pipeline has a slot, a MariaDB one a binary log position;
//!   the figures every kind has (phase, lag, snapshot rows, backfill) sit
//!   beside them.
//! - Figures a reader reports are kept as they are read: nothing here
//!   talks to a server.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A pipeline as `caudal status --json` and `GET /api/v1/pipelines` show
/// it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PipelineStatus {
    pub pipeline: String,
    /// The schedule in words (`every 1h`, `cron "0 * * * *" in UTC`,
    /// `continuous (cdc)`).
    pub schedule: String,
    /// When the last run started (RFC 3339).
    pub last_run: Option<String>,
    /// The last run's outcome: `running`, `succeeded`, `failed`,
    /// `cancelled` or `abandoned`.
    pub outcome: Option<String>,
    /// Rows the last run read.
    pub rows_read: Option<u64>,
    /// Rows of the last run delivered so far.
    pub rows_delivered: Option<u64>,
    /// Why the last run failed.
    pub error: Option<String>,
    /// A continuous pipeline: when it last polled and found nothing (such
    /// polls leave no run; RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_idle_poll: Option<String>,
    /// The checkpoint's position, as text.
    pub checkpoint: Option<String>,
    /// When the next run is due (RFC 3339).
    pub next_run: Option<String>,
    /// Batches waiting in the buffer (`None`: the buffer could not be read).
    pub buffered_batches: Option<u64>,
    /// Bytes of the buffer's files on disk.
    pub buffer_disk_bytes: Option<u64>,
    /// Why reading from the source waits, when it does (a full buffer, a
    /// full disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intake_blocked: Option<String>,
    /// The sink's circuit breaker: `closed`, `open` or `half_open`.
    pub circuit: Option<String>,
    pub circuit_updated_at: Option<String>,
    /// Change data capture: where the pipeline reads the log and how far
    /// behind it is.
    pub replication: Option<Replication>,
    /// A broker source: its consumer's connection and backlog (known to
    /// the process running the pipeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerStatus>,
    /// Whether a running daemon has the pipeline paused (known only to the
    /// API; `false` from the store).
    pub paused: bool,
    /// In a cluster: the node that owns the pipeline now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl PipelineStatus {
    /// How far behind the pipeline's source is, in words, for tables:
    /// a CDC pipeline's replication lag, a broker consumer's state.
    pub fn lag_text(&self) -> String {
        match (&self.replication, &self.broker) {
            (Some(r), _) => r.lag_text(),
            (None, Some(b)) => b.lag_text(),
            (None, None) => "-".into(),
        }
    }
}

impl BrokerStatus {
    /// The consumer in words: `disconnected`, or what waits in the broker
    /// and what is held unacknowledged.
    pub fn lag_text(&self) -> String {
        if !self.connected {
            return format!("{} disconnected", self.broker);
        }
        match self.lag {
            Some(lag) => format!("{} {lag} waiting / {} unacked", self.broker, self.unacked),
            None => format!("{} {} unacked", self.broker, self.unacked),
        }
    }
}

/// The consumer of a broker source (RabbitMQ, NATS JetStream, Kafka).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BrokerStatus {
    /// `rabbitmq`, `nats` or `kafka`.
    pub broker: String,
    /// Whether the consumer is connected and subscribed now.
    pub connected: bool,
    /// Times the connection was opened (more than 1: it reconnected).
    pub connects: u64,
    /// The last connection error, if any.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Messages consumed since the process started.
    pub consumed: u64,
    /// Messages consumed and not yet acknowledged to the broker.
    pub unacked: u64,
    /// Messages waiting in the broker for this consumer, where the broker
    /// reports it (JetStream: pending on the durable consumer).
    #[serde(default)]
    pub lag: Option<u64>,
}

/// The replication of a CDC pipeline: its reader's figures and where it
/// stands in the server's log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Replication {
    /// `snapshot`, `streaming` or `reconnecting`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Bytes of log between the server's end and caudal's position.
    #[serde(default)]
    pub lag_bytes: Option<u64>,
    /// Seconds between the commit of the last transaction read and when it
    /// was read; 0 once caught up.
    #[serde(default)]
    pub lag_seconds: Option<f64>,
    /// Commit time of the last transaction read (RFC 3339).
    #[serde(default)]
    pub last_commit_time: Option<String>,
    /// Rows read by the snapshot so far.
    #[serde(default)]
    pub snapshot_rows: u64,
    /// The latest on-demand backfill.
    #[serde(default)]
    pub backfill: Option<BackfillProgress>,
    /// Whether these figures come from the reader running in this process
    /// (else they are what it last reported, at `reported_at`).
    #[serde(default)]
    pub live: bool,
    /// When the reader reported these figures (RFC 3339).
    #[serde(default)]
    pub reported_at: Option<String>,
    /// Why the server could not be asked where the log ends.
    #[serde(default)]
    pub server_error: Option<String>,
    /// What depends on the kind of source.
    #[serde(flatten)]
    pub source: ReplicationSource,
}

/// The part of a pipeline's replication that depends on its source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReplicationSource {
    /// PostgreSQL logical replication.
    Postgres(SlotReplication),
    /// A MySQL/MariaDB binary log, read as a replica.
    Mysql(BinlogReplication),
}

/// Where a PostgreSQL pipeline's replication slot stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SlotReplication {
    /// The slot's name.
    pub slot: String,
    /// The last LSN confirmed to the server.
    #[serde(default)]
    pub confirmed_lsn: Option<String>,
    /// The latest WAL position the server reported.
    #[serde(default)]
    pub server_lsn: Option<String>,
    /// Whether the slot exists on the server (`None`: not asked).
    #[serde(default)]
    pub slot_exists: Option<bool>,
    /// Whether a walsender streams from the slot now.
    #[serde(default)]
    pub slot_active: Option<bool>,
    /// The slot's `wal_status` (`reserved`, `extended`, `unreserved`,
    /// `lost`).
    #[serde(default)]
    pub wal_status: Option<String>,
}

/// Where a MySQL/MariaDB pipeline reads the binary log.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BinlogReplication {
    /// The replica server id caudal reads the log as.
    #[serde(default)]
    pub server_id: Option<u32>,
    /// The log position read up to (`file:offset`).
    #[serde(default)]
    pub read_position: Option<String>,
    /// The end of the server's log (`file:offset`).
    #[serde(default)]
    pub server_position: Option<String>,
    /// The checkpoint's log position (`file:offset`).
    #[serde(default)]
    pub checkpoint_position: Option<String>,
    /// Whether the server no longer has the checkpoint's log file (purged
    /// or expired): the pipeline cannot continue without a resync.
    #[serde(default)]
    pub log_purged: Option<bool>,
}

impl Replication {
    /// Empty figures of a source of this kind.
    pub fn new(source: ReplicationSource) -> Self {
        Self {
            phase: None,
            lag_bytes: None,
            lag_seconds: None,
            last_commit_time: None,
            snapshot_rows: 0,
            backfill: None,
            live: false,
            reported_at: None,
            server_error: None,
            source,
        }
    }

    /// `12.3 KiB / 0.4s`, `slot missing` or `log purged`: the lag in a few
    /// words, for tables.
    pub fn lag_text(&self) -> String {
        match &self.source {
            ReplicationSource::Postgres(s) if s.slot_exists == Some(false) => {
                return "slot missing".into();
            }
            ReplicationSource::Mysql(b) if b.log_purged == Some(true) => {
                return "log purged".into();
            }
            _ => {}
        }
        let bytes = self
            .lag_bytes
            .map_or_else(|| "?".into(), |b| crate::units::ByteSize(b).to_string());
        let secs = self
            .lag_seconds
            .map_or_else(|| "?".into(), |s| format!("{s:.1}s"));
        format!("{bytes} / {secs}")
    }
}

/// How far an on-demand backfill got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackfillProgress {
    /// The request's id.
    pub id: String,
    /// The table being read again.
    pub table: String,
    /// Rows sent as `read` records so far.
    pub rows: u64,
    /// Whether the backfill ended (see `error`).
    pub done: bool,
    /// Why it stopped, if it failed.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_round_trips_with_its_kind_flattened() {
        let mut r = Replication::new(ReplicationSource::Postgres(SlotReplication {
            slot: "caudal_p".into(),
            confirmed_lsn: Some("0/16B3748".into()),
            ..SlotReplication::default()
        }));
        r.lag_bytes = Some(2048);
        r.lag_seconds = Some(0.5);
        let json = serde_json::to_value(&r).expect("encode");
        assert_eq!(json["kind"], "postgres");
        assert_eq!(json["slot"], "caudal_p");
        assert_eq!(json["lag_bytes"], 2048);
        let back: Replication = serde_json::from_value(json).expect("decode");
        assert_eq!(back, r);
        assert_eq!(r.lag_text(), "2KiB / 0.5s");
        let purged = Replication::new(ReplicationSource::Mysql(BinlogReplication {
            log_purged: Some(true),
            ..BinlogReplication::default()
        }));
        assert_eq!(purged.lag_text(), "log purged");
    }
}

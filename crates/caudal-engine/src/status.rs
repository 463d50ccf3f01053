//! What `caudal status` and the API show of a pipeline: schedule, last
//! run, checkpoint, next run, buffer, circuit and, for CDC, replication.

use caudal_connectors::sources::cdc::CdcSource;
use caudal_core::config::Config;
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::Store;

/// The status of pipeline `name` (which `config` defines) as JSON.
pub async fn pipeline_status(
    config: &Config,
    store: &Store,
    name: &str,
) -> Result<serde_json::Value> {
    let p = config.pipelines.get(name).ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!("no pipeline {name:?} in the configuration"),
        )
    })?;
    let cdc = config
        .sources
        .get(&p.source)
        .is_some_and(|s| s.sql().mode == caudal_core::config::SqlMode::Cdc);
    let schedule = if cdc {
        "continuous (cdc)".to_string()
    } else {
        crate::Schedule::from_config(&p.schedule)
            .map(|s| s.describe())
            .unwrap_or_else(|e| format!("invalid: {e}"))
    };
    let replication = if cdc {
        Some(replication_status(config, store, name).await)
    } else {
        None
    };
    status_row(config, store, name, schedule, replication).await
}

/// As [`pipeline_status`] for a pipeline running in this process: its
/// replication figures come from its reader, without asking the server.
pub async fn live_status(
    config: &Config,
    store: &Store,
    pipeline: &crate::Pipeline,
) -> Result<serde_json::Value> {
    let name = pipeline.name();
    let Some(lag) = pipeline.live_lag() else {
        return pipeline_status(config, store, name).await;
    };
    let mut replication = serde_json::to_value(lag).unwrap_or_default();
    replication["live"] = true.into();
    let schedule = "continuous (cdc)".to_string();
    status_row(config, store, name, schedule, Some(replication)).await
}

async fn status_row(
    config: &Config,
    store: &Store,
    name: &str,
    schedule: String,
    replication: Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    let last = match store.last_run(name).await {
        Ok(r) => r,
        Err(e) => return Err(e),
    };
    let checkpoint = match crate::load_checkpoint(store, name).await {
        Ok(c) => c.map(|p| p.display()),
        Err(e) => Some(format!("unreadable: {e}")),
    };
    let next = store.next_run(name).await.ok().flatten();
    let circuit = match store.circuit_state(name).await {
        Ok(c) => c,
        Err(e) => return Err(e),
    };
    let dir = config.buffer_dir(name);
    let buffer = dir
        .exists()
        .then(|| caudal_buffer::inspect(&dir))
        .transpose();
    let (buffered, buffer_bytes) = match buffer {
        Ok(Some(i)) => (Some(i.unacked_records()), Some(i.disk_bytes)),
        Ok(None) => (Some(0), Some(0)),
        Err(e) => {
            eprintln!("warning: {name}: cannot inspect the buffer: {e}");
            (None, None)
        }
    };
    Ok(serde_json::json!({
        "pipeline": name,
        "schedule": schedule,
        "last_run": last.as_ref().map(|r| r.started_at.to_string()),
        "outcome": last.as_ref().map(|r| r.outcome.as_str()),
        "rows_read": last.as_ref().map(|r| r.rows_read),
        "rows_delivered": last.as_ref().map(|r| r.rows_delivered),
        "error": last.as_ref().and_then(|r| r.error.clone()),
        "checkpoint": checkpoint,
        "next_run": next.map(|t| t.to_string()),
        "buffered_batches": buffered,
        "buffer_disk_bytes": buffer_bytes,
        "circuit": circuit.as_ref().map(|c| c.circuit.clone()),
        "circuit_updated_at": circuit.map(|c| c.updated_at.to_string()),
        "replication": replication,
    }))
}

/// A CDC pipeline's slot as the server shows it now, and the lag its
/// reader last reported.
pub async fn replication_status(config: &Config, store: &Store, name: &str) -> serde_json::Value {
    let p = &config.pipelines[name];
    let mut out = serde_json::Map::new();
    if let Ok(Some(state)) = store.source_state(name).await {
        for k in [
            "slot",
            "phase",
            "lag_seconds",
            "last_commit_time",
            "snapshot_rows",
            "confirmed_lsn",
            "server_id",
            "read_position",
            "backfill",
        ] {
            if let Some(v) = state.state.get(k) {
                out.insert(k.into(), v.clone());
            }
        }
        out.insert("reported_at".into(), state.updated_at.to_string().into());
    }
    let Some(source) = config.sources.get(&p.source) else {
        return out.into();
    };
    let connected = CdcSource::connect(name, &p.source, source).await;
    if let Ok(CdcSource::Mysql(s)) = &connected {
        let checkpoint = crate::load_checkpoint(store, name).await.ok().flatten();
        match s.binary_logs().await {
            Err(e) => {
                out.insert("server".into(), format!("unreachable: {e}").into());
            }
            Ok(logs) => {
                if let Some(end) = logs.last() {
                    out.insert(
                        "server_position".into(),
                        format!("{}:{}", end.name, end.size).into(),
                    );
                }
                if let Some((file, pos)) = checkpoint
                    .as_ref()
                    .and_then(caudal_connectors::sources::mysql_cdc::log_position)
                {
                    out.insert("checkpoint_position".into(), format!("{file}:{pos}").into());
                    match caudal_connectors::sources::mysql_cdc::distance(&logs, file, pos) {
                        Some(b) => {
                            out.insert("lag_bytes".into(), b.into());
                            out.insert("log_purged".into(), false.into());
                        }
                        None => {
                            out.insert("log_purged".into(), true.into());
                        }
                    }
                }
            }
        }
        return out.into();
    }
    match connected.and_then(|c| match c {
        CdcSource::Postgres(pg) => Ok(pg),
        CdcSource::Mysql(_) => Err(Error::new(ErrorKind::Internal, "not a PostgreSQL source")),
    }) {
        Err(e) => {
            out.insert("server".into(), format!("unreachable: {e}").into());
        }
        Ok(s) => {
            out.insert("slot".into(), s.slot().into());
            match s.slot_info().await {
                Err(e) => {
                    out.insert("server".into(), format!("unreachable: {e}").into());
                }
                Ok(None) => {
                    out.insert("slot_exists".into(), false.into());
                }
                Ok(Some(slot)) => {
                    out.insert("slot_exists".into(), true.into());
                    out.insert("slot_active".into(), slot.active.into());
                    out.insert("wal_status".into(), slot.wal_status.into());
                    out.insert("lag_bytes".into(), slot.lag_bytes.into());
                    out.insert(
                        "confirmed_lsn".into(),
                        slot.confirmed_flush
                            .map(caudal_core::record::format_lsn)
                            .into(),
                    );
                }
            }
        }
    }
    out.into()
}

//! The status of a pipeline ([`PipelineStatus`]): schedule, last run,
//! checkpoint, next run, buffer, circuit and, for CDC, replication. One
//! function builds it for `caudal status`, `caudal top` and the API.
//!
//! Promises:
//! - Reading a status changes nothing and takes no lease: it works beside
//!   a running daemon.
//! - A CDC pipeline's replication is what its reader reported (live, when
//!   the reader runs in this process) completed with what the server says
//!   now; an unreachable server is said, not an error.

use caudal_connectors::sources::cdc::CdcSource;
use caudal_core::config::{Config, SourceConfig};
use caudal_core::status::PipelineStatus;
use caudal_core::{Error, ErrorKind, Result};
use caudal_store::Store;

pub use caudal_core::status::{
    BackfillProgress, BinlogReplication, Replication, ReplicationSource, SlotReplication,
};

/// The status of pipeline `name` (which `config` defines). `running`: the
/// pipeline if this process runs it (its reader's figures are then live).
pub async fn pipeline_status(
    config: &Config,
    store: &Store,
    name: &str,
    running: Option<&crate::Pipeline>,
) -> Result<PipelineStatus> {
    let p = config.pipelines.get(name).ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!("no pipeline {name:?} in the configuration"),
        )
    })?;
    let source = config.sources.get(&p.source);
    let cdc = source.is_some_and(SourceConfig::is_cdc);
    let schedule = if cdc {
        "continuous (cdc)".to_string()
    } else if let Some(broker) = source.filter(|s| s.is_broker()) {
        format!("continuous ({})", broker.type_name())
    } else {
        crate::Schedule::from_config(&p.schedule)
            .map(|s| s.describe())
            .unwrap_or_else(|e| format!("invalid: {e}"))
    };
    let last = store.last_run(name).await?;
    let checkpoint = crate::load_checkpoint(store, name).await;
    let next = store.next_run(name).await.ok().flatten();
    let circuit = store.circuit_state(name).await?;
    let (buffered_batches, buffer_disk_bytes, disk_full) = match buffer_figures(config, name) {
        Ok((n, bytes, full)) => (Some(n), Some(bytes), full),
        Err(e) => {
            tracing::warn!(pipeline = name, error = %e.report(), "cannot inspect the buffer");
            (None, None, None)
        }
    };
    let replication = match (cdc, source) {
        (true, Some(source_cfg)) => {
            // A reader in this process has live figures: no need to ask
            // the server (a status request must not open connections).
            let live = running.and_then(crate::Pipeline::live_replication);
            let known = match live {
                Some(live) => Some(live),
                None => crate::maintenance::reported(store, name).await?,
            };
            let at = checkpoint.as_ref().ok().and_then(Option::as_ref);
            match known {
                Some(k) if k.live => Some(k),
                _ => match CdcSource::connect(name, &p.source, source_cfg).await {
                    Ok(s) => {
                        let known = known.unwrap_or_else(|| s.live());
                        Some(s.server_status(known, at).await)
                    }
                    Err(e) => known.map(|mut k| {
                        k.server_error = Some(format!("unreachable: {}", e.report()));
                        k
                    }),
                },
            }
        }
        _ => None,
    };
    Ok(PipelineStatus {
        pipeline: name.to_string(),
        schedule,
        last_run: last.as_ref().map(|r| r.started_at.to_string()),
        outcome: last.as_ref().map(|r| r.outcome.as_str().to_string()),
        rows_read: last.as_ref().map(|r| r.rows_read),
        rows_delivered: last.as_ref().map(|r| r.rows_delivered),
        error: last.as_ref().and_then(|r| r.error.clone()),
        last_idle_poll: store
            .last_idle_poll(name)
            .await
            .ok()
            .flatten()
            .map(|t| t.to_string()),
        checkpoint: match checkpoint {
            Ok(c) => c.map(|p| p.display()),
            Err(e) => Some(format!("unreadable: {e}")),
        },
        next_run: next.map(|t| t.to_string()),
        buffered_batches,
        buffer_disk_bytes,
        // The running pipeline knows why it waits; another process sees a
        // full disk by the marker the buffer leaves.
        intake_blocked: running
            .and_then(crate::Pipeline::intake_blocked)
            .or(disk_full),
        circuit: circuit.as_ref().map(|c| c.circuit.clone()),
        circuit_updated_at: circuit.map(|c| c.updated_at.to_string()),
        replication,
        broker: running.and_then(crate::Pipeline::broker_state),
        paused: false,
        owner: if config.cluster.is_some() {
            let lease = crate::cluster::owner_lease(name);
            store
                .leases(&lease)
                .await?
                .into_iter()
                .find(|l| l.held && l.name == lease)
                .map(|l| l.holder)
        } else {
            None
        },
    })
}

/// Batches waiting in a pipeline's buffer, the bytes of its files, and
/// why its intake waits when its disk is full.
fn buffer_figures(config: &Config, name: &str) -> Result<(u64, u64, Option<String>)> {
    let dir = config.buffer_dir(name);
    if !dir.exists() {
        return Ok((0, 0, None));
    }
    let i = caudal_buffer::inspect(&dir).map_err(|e| crate::buffered::buffer_error(name, e))?;
    let full = i.disk_full_since_unix_ms.map(|ms| {
        let since = jiff::Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX))
            .map_or_else(|_| format!("{ms} ms after the epoch"), |t| t.to_string());
        format!(
            "the disk of the buffer ({}) is full since {since}; reading waits for delivery \
             (or an operator) to free space",
            dir.display()
        )
    });
    Ok((i.unacked_records(), i.disk_bytes, full))
}

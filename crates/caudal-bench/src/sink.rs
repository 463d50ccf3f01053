//! `http-sink`: caudal's HTTP sink alone, against the receiver's own
//! ceiling.
//!
//! N records (`--rows`, default 2,000,000) of the `initial-sync` shape in
//! batches of `--batch`, prepared before the clock starts. caudal's
//! [`HttpSink`] (the sink `caudal run` uses, default settings) delivers
//! every batch, encoding each request body itself, with 1 and then 8
//! requests in flight, each delivery in a task of its own as the engine
//! runs them; each must be delivered. The ceiling: the same
//! bodies, encoded once beforehand, posted by a bare hyper client over 8
//! kept-alive connections as fast as the receiver answers (its own request
//! rate), and over 1 for scale. The receiver parses every body in each
//! case, and runs in this process, as do the sink and the client.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use caudal_connectors::sinks::http::HttpSink;
use caudal_core::config::HttpSinkConfig;
use caudal_core::sink::{Batch, Delivery, Sink as _};
use caudal_engine::buffered::Entry;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::receiver::{self, Receiver};
use crate::{Args, round};

/// Requests in flight in the two measured runs.
const CONCURRENCY: [usize; 2] = [1, 8];
/// Connections of the ceiling's client.
const CEILING_CONNECTIONS: usize = 8;

pub async fn run(args: &Args) -> anyhow::Result<Vec<Value>> {
    let records = args.rows.unwrap_or(2_000_000);
    let batch = usize::try_from(args.batch.max(1))?;
    let receiver = receiver::start().await?;
    let url = format!("http://{}/ingest", receiver.addr);
    let config: HttpSinkConfig =
        serde_json::from_value(json!({ "url": url })).context("the sink's configuration")?;
    let sink = Arc::new(HttpSink::new("recv", &config)?);
    eprintln!("http-sink: preparing {records} records in batches of {batch}");
    let batches = Arc::new(crate::buffer::batches(records, batch));
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        batches
            .iter()
            .map(|b| sink.encode("bench", &b.key, &b.events).map(Bytes::from))
            .collect::<Result<_, _>>()?,
    );
    let body_bytes: usize = bodies.iter().map(Bytes::len).sum();

    eprintln!("http-sink: ceiling, {CEILING_CONNECTIONS} connections");
    let ceiling = post_all(&receiver, &bodies, CEILING_CONNECTIONS, records)
        .await
        .context("the ceiling's client, 8 connections")?;
    eprintln!("http-sink: ceiling, 1 connection");
    let ceiling_1 = post_all(&receiver, &bodies, 1, records)
        .await
        .context("the ceiling's client, 1 connection")?;
    let ceiling_rate = records as f64 / ceiling;

    let mut out = Vec::new();
    for concurrency in CONCURRENCY {
        eprintln!("http-sink: caudal's sink, {concurrency} in flight");
        let before = receiver.records();
        let started = Instant::now();
        deliver_all(&sink, &batches, concurrency).await?;
        let secs = started.elapsed().as_secs_f64();
        let got = receiver.records() - before;
        if got != records {
            bail!("the receiver got {got} records, the sink sent {records}");
        }
        let rate = records as f64 / secs;
        out.push(json!({
            "scenario": "http_sink",
            "records": records,
            "batch": batch,
            "concurrency": concurrency,
            "body_mb": round(body_bytes as f64 / 1e6),
            "caudal_secs": round(secs),
            "caudal_records_per_s": round(rate),
            "caudal_requests_per_s": round(batches.len() as f64 / secs),
            "ceiling_connections": CEILING_CONNECTIONS,
            "ceiling_records_per_s": round(ceiling_rate),
            "ceiling_requests_per_s": round(bodies.len() as f64 / ceiling),
            "ceiling_1_records_per_s": round(records as f64 / ceiling_1),
            "caudal_over_ceiling": round(rate / ceiling_rate),
        }));
    }
    Ok(out)
}

/// Delivers every batch through the sink, `concurrency` at a time, each
/// delivery in a task of its own as the engine's deliverer runs them; every
/// batch must be delivered.
async fn deliver_all(
    sink: &Arc<HttpSink>,
    batches: &Arc<Vec<Entry>>,
    concurrency: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (sink, batches, next) = (sink.clone(), batches.clone(), next.clone());
        workers.spawn(async move {
            while let Some(b) = batches.get(next.fetch_add(1, Ordering::Relaxed)) {
                let delivery = sink
                    .deliver(Batch {
                        pipeline: "bench",
                        key: &b.key,
                        events: &b.events,
                    })
                    .await;
                if !matches!(delivery, Delivery::Delivered { .. }) {
                    bail!("batch {} was not delivered: {delivery:?}", b.key);
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(())
}

/// Posts every body once over `connections` kept-alive connections, each in
/// a task of its own that takes the next body as soon as its last answer
/// came; seconds until the last answer. The receiver must count `records`
/// more.
async fn post_all(
    receiver: &Receiver,
    bodies: &Arc<Vec<Bytes>>,
    connections: usize,
    records: u64,
) -> anyhow::Result<f64> {
    let before = receiver.records();
    let next = Arc::new(AtomicUsize::new(0));
    let addr = receiver.addr;
    let started = Instant::now();
    let mut clients = JoinSet::new();
    for _ in 0..connections {
        let (bodies, next) = (bodies.clone(), next.clone());
        clients.spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            while let Some(body) = bodies.get(next.fetch_add(1, Ordering::Relaxed)) {
                let request = hyper::Request::post("/ingest")
                    .header(hyper::header::HOST, addr.to_string())
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body.clone()))?;
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                if !response.status().is_success() {
                    bail!("the receiver answered {}", response.status());
                }
                http_body_util::BodyExt::collect(response.into_body()).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = clients.join_next().await {
        done??;
    }
    let secs = started.elapsed().as_secs_f64();
    let got = receiver.records() - before;
    if got != records {
        bail!("the receiver got {got} records, {records} were posted");
    }
    Ok(secs)
}

//! `http-sink`: caudal's HTTP sink alone, against the receiver's own
//! ceiling.
//!
//! N records (`--rows`, default 2,000,000) of the `initial-sync` shape in
//! batches of `--batch`, prepared before the clock starts. caudal's
//! [`HttpSink`] (the sink `caudal run` uses, default settings) delivers
//! every batch, encoding each request body itself, with 1 and then 8
//! requests in flight; each must be delivered. The ceiling: the same
//! bodies, encoded once beforehand, posted by a bare hyper client over 8
//! kept-alive connections as fast as the receiver answers (its own request
//! rate), and over 1 for scale. The receiver parses every body in each
//! case, and runs in this process, as do the sink and the client.

use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use caudal_connectors::sinks::http::HttpSink;
use caudal_core::config::HttpSinkConfig;
use caudal_core::sink::{Batch, Delivery, Sink as _};
use futures::StreamExt as _;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

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
    let sink = HttpSink::new("recv", &config)?;
    eprintln!("http-sink: preparing {records} records in batches of {batch}");
    let batches = crate::buffer::batches(records, batch);
    let bodies: Vec<Bytes> = batches
        .iter()
        .map(|b| sink.encode("bench", &b.key, &b.events).map(Bytes::from))
        .collect::<Result<_, _>>()?;
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
        let outcomes: Vec<Delivery> = futures::stream::iter(&batches)
            .map(|b| {
                sink.deliver(Batch {
                    pipeline: "bench",
                    key: &b.key,
                    events: &b.events,
                })
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let secs = started.elapsed().as_secs_f64();
        if let Some(failed) = outcomes
            .iter()
            .find(|d| !matches!(d, Delivery::Delivered { .. }))
        {
            bail!("a batch was not delivered: {failed:?}");
        }
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

/// Posts every body once over `connections` kept-alive connections (each
/// takes the next body as soon as its last answer came); seconds until the
/// last answer. The receiver must count `records` more.
async fn post_all(
    receiver: &Receiver,
    bodies: &[Bytes],
    connections: usize,
    records: u64,
) -> anyhow::Result<f64> {
    let before = receiver.records();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let clients = (0..connections).map(|_| async {
        let stream = tokio::net::TcpStream::connect(receiver.addr).await?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(body) = bodies.get(i) else {
                return anyhow::Ok(());
            };
            let request = hyper::Request::post("/ingest")
                .header(hyper::header::HOST, receiver.addr.to_string())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))?;
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            if !response.status().is_success() {
                bail!("the receiver answered {}", response.status());
            }
            http_body_util::BodyExt::collect(response.into_body()).await?;
        }
    });
    for result in futures::future::join_all(clients).await {
        result?;
    }
    let secs = started.elapsed().as_secs_f64();
    let got = receiver.records() - before;
    if got != records {
        bail!("the receiver got {got} records, {records} were posted");
    }
    Ok(secs)
}

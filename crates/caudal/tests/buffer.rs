//! The buffer as an operator sees it, through the real binary: `caudal
//! buffer inspect|fsck`, a torn tail left by a crash cut at the next start
//! with every complete batch delivered, a damaged record refused with an
//! error that names it, `caudal status` showing buffered batches and the
//! circuit breaker, and the daemon reading through a receiver outage.

mod support;

use std::io::Write as _;
use std::path::PathBuf;

use nix::sys::signal::Signal;
use serde_json::Value;
use support::{PIPELINE, World, each};

/// The only segment file of a small buffer.
fn segment(w: &World) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(w.buffer_dir())
        .expect("buffer directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 1, "one segment: {files:?}");
    files.remove(0)
}

/// A world whose receiver is down, with 30 rows read into the buffer by a
/// failed `once` (batches of 10).
async fn buffered_world() -> World {
    let mut w = World::sqlite().await;
    w.max_records = 10;
    w.insert(1..=30, 0).await;
    w.receiver.stop().await;
    let failed = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(failed.code, Some(1), "{failed}");
    w
}

async fn inspect(w: &World) -> Value {
    let out = w.caudal(&["buffer", "inspect", PIPELINE, "--json"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test]
async fn inspect_and_fsck_show_what_waits_and_name_a_damaged_record() {
    let w = buffered_world().await;
    let inspection = inspect(&w).await;
    let waiting = inspection["next_offset"].as_u64().expect("next_offset")
        - inspection["acked"].as_u64().unwrap_or(0);
    assert!(waiting >= 1, "{inspection}");
    assert_eq!(w.status().await["buffered_batches"], waiting);
    let text = w.caudal(&["buffer", "inspect", PIPELINE]).await;
    assert!(
        text.stdout
            .contains(&format!("unacknowledged {waiting} entries")),
        "{text}"
    );

    let clean = w.caudal(&["buffer", "fsck", PIPELINE]).await;
    assert_eq!(clean.code, Some(0), "{clean}");
    assert!(clean.stdout.contains("no problems found"), "{clean}");

    // Damage a byte inside the first record's payload.
    let file = segment(&w);
    let mut bytes = std::fs::read(&file).expect("segment");
    let at = usize::try_from(
        caudal_buffer::SEGMENT_HEADER_BYTES + caudal_buffer::RECORD_HEADER_BYTES + 20,
    )
    .expect("small");
    bytes[at] ^= 0x55;
    std::fs::write(&file, &bytes).expect("write segment");

    let damaged = w.caudal(&["buffer", "fsck", PIPELINE]).await;
    assert_eq!(damaged.code, Some(1), "{damaged}");
    let name = file.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(
        damaged.stdout.contains(&format!(
            "{name} byte {}: corrupt record at offset 0",
            caudal_buffer::SEGMENT_HEADER_BYTES
        )),
        "{damaged}"
    );

    // Delivery refuses to send it, and says where it is.
    w.receiver.restart().await;
    let refused = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(refused.code, Some(1), "{refused}");
    assert!(
        refused.stderr.contains("corrupt record in buffer segment"),
        "{refused}"
    );
    assert!(refused.stderr.contains("caudal buffer fsck"), "{refused}");
    assert_eq!(w.receiver.request_count(), 0, "nothing damaged was sent");

    // Resetting the checkpoint drops the buffer; the source is read again.
    let reset = w.caudal(&["checkpoint", "reset", PIPELINE]).await;
    assert_eq!(reset.code, Some(0), "{reset}");
    assert!(
        reset
            .stdout
            .contains(&format!("dropped {waiting} batches waiting in the buffer")),
        "{reset}"
    );
    let again = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(again.code, Some(0), "{again}");
    assert_eq!(w.delivery_counts(), each(1..=30, 1));
}

/// A crash in the middle of an append leaves an incomplete record at the
/// end of the segment. `fsck` reports it as a torn tail (not damage); the
/// next start cuts it, says so, and delivers every complete batch once.
#[tokio::test]
async fn a_torn_tail_is_cut_and_every_complete_batch_is_delivered_once() {
    let w = buffered_world().await;
    let waiting = w.status().await["buffered_batches"]
        .as_u64()
        .expect("count");
    // The frame of a record of 500 bytes, of which only 20 made it.
    let mut torn = Vec::new();
    torn.extend_from_slice(&500u32.to_le_bytes());
    torn.extend_from_slice(&0xdead_beef_u32.to_le_bytes());
    torn.extend_from_slice(&[b'x'; 20]);
    std::fs::OpenOptions::new()
        .append(true)
        .open(segment(&w))
        .and_then(|mut f| f.write_all(&torn))
        .expect("append a torn record");

    let fsck = w.caudal(&["buffer", "fsck", PIPELINE]).await;
    assert_eq!(fsck.code, Some(0), "a torn tail is not damage: {fsck}");
    assert!(fsck.stdout.contains("torn tail of 28 bytes"), "{fsck}");
    assert_eq!(inspect(&w).await["torn_bytes"], 28);

    w.receiver.restart().await;
    let ok = w.caudal(&["once", PIPELINE]).await;
    assert_eq!(ok.code, Some(0), "{ok}");
    assert!(ok.stderr.contains("cut off a torn tail"), "{ok}");
    assert!(
        ok.stdout
            .contains(&format!("{} rows read, 30 delivered", 30 - waiting * 10)),
        "{ok}"
    );
    assert_eq!(w.delivery_counts(), each(1..=30, 1));
    assert_eq!(inspect(&w).await["torn_bytes"], 0);
}

/// A daemon facing a receiver that answers 503: the breaker opens, and
/// `caudal status` (another process) shows it with the batches waiting.
#[tokio::test]
async fn status_shows_buffered_batches_and_the_open_circuit() {
    let mut w = World::sqlite().await;
    w.max_records = 5;
    w.every = "200ms".into();
    w.retry = r#"{ initial = "10ms", max_delay = "20ms" }"#.into();
    w.sink_extra = r#"delivery.circuit_breaker = { min_requests = 2, open_for = "1h" }"#.into();
    w.insert(1..=20, 0).await;
    w.receiver.set_status(503);
    let daemon = w.start_daemon(1);

    let status = w
        .wait_for_status(Some(&daemon), "an open circuit, 4 batches", |s| {
            s["circuit"] == "open" && s["buffered_batches"] == 4
        })
        .await;
    assert_eq!(
        status["checkpoint"], "(2025-05-14T12:00:00Z, 20)",
        "the rows are acknowledged once buffered: {status}"
    );
    let table = w.caudal(&["status"]).await;
    assert!(table.stdout.contains("CIRCUIT"), "{table}");
    assert!(table.stdout.contains("4 batches"), "{table}");
    assert!(table.stdout.contains("open"), "{table}");
    let seen = w.receiver.request_count();

    // Shutdown while the breaker holds requests back is prompt and clean.
    let (exit, log) = daemon.stop(Signal::SIGTERM).await;
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(seen >= 2, "the breaker opened after 2 failures");
    assert_eq!(w.receiver.request_count(), seen);
}

/// The real daemon through a receiver outage: runs keep succeeding and
/// reading new rows into the buffer while nothing can be delivered; once
/// the receiver is back, every row arrives exactly once and the buffer
/// empties.
#[tokio::test]
async fn the_daemon_keeps_reading_through_an_outage_and_catches_up() {
    let mut w = World::sqlite().await;
    w.max_records = 5;
    w.every = "200ms".into();
    w.retry = r#"{ initial = "10ms", max_delay = "100ms" }"#.into();
    w.sink_extra = r#"delivery.circuit_breaker = { min_requests = 3, open_for = "200ms" }"#.into();
    w.receiver.stop().await;
    w.insert(1..=10, 0).await;
    let daemon = w.start_daemon(1);

    let wait_for = |rows: u64, minute: u32| {
        let checkpoint = format!("(2025-05-14T12:{minute:02}:00Z, {rows})");
        let what = format!("rows 1..={rows} all buffered");
        let w = &w;
        let daemon = &daemon;
        async move {
            w.wait_for_status(Some(daemon), &what, |s| {
                s["checkpoint"] == checkpoint.as_str() && s["buffered_batches"] == rows / 5
            })
            .await
        }
    };
    wait_for(10, 0).await;
    // Still down: new rows are read too, and the run that read them ends
    // as a success (its checkpoint is committed before it ends, so wait
    // for the end too).
    w.insert(11..=20, 1).await;
    wait_for(20, 1).await;
    let status = w
        .wait_for_status(Some(&daemon), "the run that read rows 11..=20 ended", |s| {
            s["outcome"] != "running"
        })
        .await;
    assert_eq!(status["outcome"], "succeeded", "{status}");

    w.receiver.restart().await;
    w.wait_for_delivered(20).await;
    w.wait_for_status(Some(&daemon), "an empty buffer", |s| {
        s["buffered_batches"] == 0
    })
    .await;
    let (exit, log) = daemon.stop(Signal::SIGTERM).await;
    assert_eq!(exit.code(), Some(0), "{log}");
    assert_eq!(w.delivery_counts(), each(1..=20, 1));
}

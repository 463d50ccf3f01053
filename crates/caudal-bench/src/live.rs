//! `live-throughput` and `live-latency`: PostgreSQL CDC through a live
//! aggregate (`[aggregates.per_account]`: per `account`, per minute of the
//! change's commit time, `changes = "count"`, `total = "sum(amount)"`,
//! `p95 = "quantile(amount, 0.95)"`, `last = "max(id)"`), measured next to
//! caudal's plain CDC → HTTP in the same run.
//!
//! Both reuse the PostgreSQL CDC scenarios' database `caudal_bench`
//! ([`crate::cdc::postgres`]: its table `bench_changes`, publication,
//! slots and teardown, which drops the slots also after a failure), with
//! `REPLICA IDENTITY FULL` on the table: an update or delete takes its old
//! row back from the aggregate, which needs the old row's every column. Both
//! configurations read that same WAL.
//!
//! - `live-throughput`: two slots are created before the workload, the
//!   backlog of `cdc-throughput` is written (500,000 changes by default,
//!   `--rows`, 80% inserts, 10% updates, 10% deletes, 1,000 accounts), then
//!   `caudal once bench` drains it twice, each time from its own slot, state
//!   directory and receiver: once with the plain CDC → HTTP configuration
//!   (`cdc-throughput`'s), once with the same plus the aggregate. Which goes
//!   first alternates from one `--repeat` to the next. Each is timed from
//!   process start to exit (`*_exit_secs`; the aggregate's last windows are
//!   counted and committed before `once` exits) and to the receiver's last
//!   change (`*_secs`, what `cdc-throughput` reports); `aggregate_over_plain`
//!   is the plain drain's time to exit over the aggregate's. After the
//!   aggregate's drain its windows are read from the state store: their
//!   `rows` and `changes` must add up to the rows the table holds, their
//!   `total` to its `sum(amount)`, with nothing late or skipped, so a
//!   half-counted aggregate fails the scenario. CPU is caudal's user +
//!   system time for the drain (this process's reaped children,
//!   `/proc/self/stat`).
//! - `live-latency`: `caudal run` with the aggregate and `[server]` while a
//!   load generator commits `--rate` changes/s (default 5,000) as
//!   transactions of `--txn-rows` inserted rows (default 100) all of one
//!   account, the accounts cycling over 1,000. An SSE client follows
//!   `GET /api/v1/live/per_account/stream` with a viewer token; a
//!   transaction is visible when an event for its account shows `last` ≥
//!   its largest id. Latency is the event's arrival (when its chunk was
//!   read) less the instant just before the client sent COMMIT: it includes
//!   the commit's round trip. The reference, in the same run, is the HTTP
//!   delivery of the same changes by the same process: per record, the
//!   receiver's arrival less the record's `commit_time` (`cdc-latency`'s
//!   figure), and per transaction, the arrival of its last record less the
//!   same pre-COMMIT instant (transactions matched to records by their
//!   commit times, which are distinct and in commit order). Percentiles are
//!   nearest rank over the transactions (records) committed after 2 s of
//!   warm-up, for `--duration` seconds. At the end `GET
//!   /api/v1/live/per_account` must add up to every row committed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sqlx::{Connection as _, Executor as _, PgPool};

use crate::cdc::postgres::{
    connect_admin, create_slot, provision, source_fields, teardown, wait_streaming,
};
use crate::cdc::{
    DEFAULT_LATENCY_MAX_WAIT_MS, DEFAULT_THROUGHPUT_CHANGES, DEFAULT_THROUGHPUT_MAX_WAIT_MS,
    LATENCY_WARMUP, STALL_TIMEOUT, drain_once, percentile, scratch_dir, spawn_caudal, wait_exit,
    wait_for_records, write_backlog, write_config,
};
use crate::process::Measured;
use crate::receiver::{self, Stamp};
use crate::subject::{CAUDAL, Subject};
use crate::{Args, round};

/// The aggregate's name.
const AGGREGATE: &str = "per_account";
/// The plain configuration's slot (`live-throughput`).
const PLAIN_SLOT: &str = "caudal_bench_plain";
/// The slot of the configuration with the aggregate.
const LIVE_SLOT: &str = "caudal_bench_live";
/// Accounts the latency scenario's transactions cycle over.
const ACCOUNTS: i64 = 1000;
/// How long `live-latency` waits, once every change was delivered, for the
/// SSE client to see the last transactions.
const SEE_TIMEOUT: Duration = Duration::from_secs(10);
/// Changes per transaction of the backlog (`cdc-throughput`'s).
const BACKLOG_TXN_ROWS: u64 = 1000;

/// The aggregate under test, on the pipeline `bench` of
/// [`write_config`].
fn aggregate_toml() -> String {
    format!(
        r#"
[aggregates.{AGGREGATE}]
pipeline = "bench"
group_by = ["account"]
window = "1m"
[aggregates.{AGGREGATE}.metrics]
changes = "count"
total = "sum(amount)"
p95 = "quantile(amount, 0.95)"
last = "max(id)"
"#
    )
}

/// Appends `more` to the configuration file `config`.
fn append(config: &Path, more: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new().append(true).open(config)?;
    file.write_all(more.as_bytes())?;
    Ok(())
}

fn caudal(args: &Args) -> Subject<'_> {
    Subject {
        name: CAUDAL,
        binary: &args.caudal,
    }
}

/// CPU seconds (user + system) of this process, and of its children that
/// have been waited for (`/proc/self/stat`: utime, stime, cutime, cstime,
/// in clock ticks of 1/100 s).
fn cpu_secs() -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The fields after the command name, which is in parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unreadable /proc/self/stat")?;
    let fields: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse::<f64>().unwrap_or(0.0) / 100.0)
        .collect();
    if fields.len() < 4 {
        bail!("unreadable /proc/self/stat");
    }
    Ok((fields[0] + fields[1], fields[2] + fields[3]))
}

/// Runs `live-throughput`, then drops what it created.
pub async fn throughput(args: &Args) -> anyhow::Result<Value> {
    let admin = connect_admin(args).await?;
    let result = throughput_run(args, &admin).await;
    let cleaned = teardown(&admin).await;
    result.and_then(|report| cleaned.map(|()| report))
}

/// One configuration `live-throughput` drains the backlog with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    Aggregate,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Aggregate => "aggregate",
        }
    }

    fn slot(self) -> &'static str {
        match self {
            Self::Plain => PLAIN_SLOT,
            Self::Aggregate => LIVE_SLOT,
        }
    }
}

/// One drain of the backlog.
#[derive(Debug)]
struct Drain {
    /// Process start until the receiver had every change.
    secs: f64,
    /// Process start until it exited.
    exit_secs: f64,
    peak_rss_mib: f64,
    requests: u64,
    /// caudal's CPU, and this process's meanwhile (mostly the receiver).
    cpu_secs: f64,
    harness_cpu_secs: f64,
}

/// What the aggregate's windows add up to, in the state store.
#[derive(Debug)]
struct Counted {
    windows: i64,
    rows: i64,
    changes: i64,
    total: f64,
    late: i64,
    skipped: i64,
}

async fn throughput_run(args: &Args, admin: &PgPool) -> anyhow::Result<Value> {
    let changes = args.rows.unwrap_or(DEFAULT_THROUGHPUT_CHANGES);
    let max_wait_ms = args.max_wait_ms.unwrap_or(DEFAULT_THROUGHPUT_MAX_WAIT_MS);
    let (url, db) = provision(args, admin).await?;
    db.execute("ALTER TABLE bench_changes REPLICA IDENTITY FULL")
        .await?;
    // Both slots before the first change: the same backlog for each.
    let start_lsn = create_slot(&db, PLAIN_SLOT).await?;
    create_slot(&db, LIVE_SLOT).await?;

    eprintln!("live-throughput: writing {changes} changes while nothing consumes");
    let (written, workload_secs) = write_backlog(&db, changes).await?;
    let (wal_bytes,): (f64,) =
        sqlx::query_as("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8")
            .bind(&start_lsn)
            .fetch_one(&db)
            .await?;
    // What the aggregate must add up to: the table as the backlog left it.
    let (expected_rows, expected_total): (i64, f64) =
        sqlx::query_as("SELECT count(*), coalesce(sum(amount), 0)::float8 FROM bench_changes")
            .fetch_one(&db)
            .await?;
    db.close().await;

    let dir = scratch_dir("live-throughput")?;
    let order = if args.run.is_multiple_of(2) {
        [Kind::Aggregate, Kind::Plain]
    } else {
        [Kind::Plain, Kind::Aggregate]
    };
    let mut drains = Vec::new();
    let mut counted = None;
    for kind in order {
        let sub = dir.join(kind.name());
        std::fs::create_dir_all(&sub)?;
        let receiver = receiver::start().await?;
        let config = write_config(
            &sub,
            ("pg", &source_fields(&url, kind.slot())),
            receiver.addr,
            args,
            max_wait_ms,
        )?;
        if kind == Kind::Aggregate {
            append(&config, &aggregate_toml())?;
        }
        eprintln!(
            "live-throughput: {} once (log: {})",
            kind.name(),
            sub.join("caudal.log").display()
        );
        let (own_before, children_before) = cpu_secs()?;
        let drained = drain_once(caudal(args), &config, &sub, &receiver, changes).await?;
        let (own_after, children_after) = cpu_secs()?;
        if kind == Kind::Aggregate {
            counted = Some(count_windows(&sub.join("state.db")).await?);
        }
        drains.push((
            kind,
            Drain {
                secs: drained.caudal_secs,
                exit_secs: drained.ended.secs,
                peak_rss_mib: drained.ended.peak_rss_mib,
                requests: receiver.requests(),
                cpu_secs: children_after - children_before,
                harness_cpu_secs: own_after - own_before,
            },
        ));
    }
    let counted = counted.context("the aggregate was not measured")?;
    if counted.rows != expected_rows
        || counted.changes != expected_rows
        || (counted.total - expected_total).abs() > 0.5
        || counted.late != 0
        || counted.skipped != 0
    {
        bail!(
            "the aggregate's windows do not add up to the table: {counted:?}, \
             the table holds {expected_rows} rows totalling {expected_total} (state: {})",
            dir.join("aggregate/state.db").display()
        );
    }
    let of = |k: Kind| {
        drains
            .iter()
            .find(|(kind, _)| *kind == k)
            .map(|(_, d)| d)
            .context("a drain is missing")
    };
    let (plain, agg) = (of(Kind::Plain)?, of(Kind::Aggregate)?);
    let n = changes as f64;
    let report = json!({
        "scenario": "live_throughput",
        "changes": changes,
        "inserts": written.inserts,
        "updates": written.updates,
        "deletes": written.deletes,
        "txn_rows": BACKLOG_TXN_ROWS,
        "wal_mib": round(wal_bytes / (1024.0 * 1024.0)),
        "workload_secs": round(workload_secs),
        "batch": args.batch,
        "max_wait_ms": max_wait_ms,
        "concurrency": args.concurrency,
        "page_size": args.page_size,
        "first": order[0].name(),
        "plain_secs": round(plain.secs),
        "plain_exit_secs": round(plain.exit_secs),
        "plain_changes_per_s": round(n / plain.exit_secs),
        "plain_delivered_changes_per_s": round(n / plain.secs),
        "plain_cpu_secs": round(plain.cpu_secs),
        "plain_harness_cpu_secs": round(plain.harness_cpu_secs),
        "plain_requests": plain.requests,
        "plain_peak_rss_mib": round(plain.peak_rss_mib),
        "aggregate_secs": round(agg.secs),
        "aggregate_exit_secs": round(agg.exit_secs),
        "aggregate_changes_per_s": round(n / agg.exit_secs),
        "aggregate_delivered_changes_per_s": round(n / agg.secs),
        "aggregate_cpu_secs": round(agg.cpu_secs),
        "aggregate_harness_cpu_secs": round(agg.harness_cpu_secs),
        "aggregate_requests": agg.requests,
        "aggregate_peak_rss_mib": round(agg.peak_rss_mib),
        "aggregate_over_plain": round(plain.exit_secs / agg.exit_secs),
        "aggregate_over_plain_delivered": round(plain.secs / agg.secs),
        "aggregate_over_plain_cpu": round(plain.cpu_secs / agg.cpu_secs),
        "windows": counted.windows,
        "counted_rows": counted.rows,
        "expected_rows": expected_rows,
        "counted_total": round(counted.total),
        "expected_total": round(expected_total),
    });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// Adds up the aggregate's windows in the SQLite state store at `state`.
async fn count_windows(state: &Path) -> anyhow::Result<Counted> {
    let url = format!("sqlite://{}?mode=ro", state.display());
    let mut conn = sqlx::SqliteConnection::connect(&url)
        .await
        .with_context(|| format!("cannot open the state store {}", state.display()))?;
    let head: Option<(i64, i64)> =
        sqlx::query_as("SELECT late, skipped FROM aggregates WHERE name = $1")
            .bind(AGGREGATE)
            .fetch_optional(&mut conn)
            .await?;
    let (late, skipped) = head.context("the aggregate has no head in the state store")?;
    let windows: Vec<(i64, i64, String)> =
        sqlx::query_as("SELECT rows, late, figures FROM aggregate_windows WHERE aggregate = $1")
            .bind(AGGREGATE)
            .fetch_all(&mut conn)
            .await?;
    conn.close().await?;
    let mut counted = Counted {
        windows: i64::try_from(windows.len())?,
        rows: 0,
        changes: 0,
        total: 0.0,
        late,
        skipped,
    };
    for (rows, window_late, figures) in windows {
        let figures: Value = serde_json::from_str(&figures)?;
        counted.rows += rows;
        counted.late += window_late;
        counted.changes += figures["changes"].as_i64().unwrap_or(0);
        counted.total += figures["total"].as_f64().unwrap_or(0.0);
    }
    Ok(counted)
}

/// Runs `live-latency`, then drops what it created.
pub async fn latency(args: &Args) -> anyhow::Result<Value> {
    let admin = connect_admin(args).await?;
    let result = latency_run(args, &admin).await;
    let cleaned = teardown(&admin).await;
    result.and_then(|report| cleaned.map(|()| report))
}

/// One SSE event of a window.
#[derive(Clone, Copy, Debug)]
struct Seen {
    account: i64,
    last: i64,
    arrived_us: i64,
}

/// What the SSE client read.
#[derive(Debug, Default)]
struct Stream {
    /// Window events with an account and a `last`, in arrival order.
    events: Vec<Seen>,
    /// `event: lagged` (the server dropped updates for this client).
    lagged: u64,
    /// The largest `last` seen per account.
    last: HashMap<i64, i64>,
    /// Why the stream ended, if it did.
    ended: Option<String>,
}

/// One committed transaction of the latency load.
#[derive(Clone, Copy, Debug)]
struct Txn {
    account: i64,
    last_id: i64,
    /// Just before COMMIT was sent, µs since the epoch.
    before_commit_us: i64,
    commit_rtt_us: i64,
}

/// What the latency load committed.
#[derive(Debug)]
struct Load {
    txns: Vec<Txn>,
    rows: u64,
    /// Changes per second committed after the warm-up.
    achieved: f64,
    /// Transactions whose COMMIT was sent from this time on are timed.
    measure_from_us: i64,
}

const INSERT_ONE_ACCOUNT: &str = "INSERT INTO bench_changes (id, account, amount, note)
    SELECT g, $3::int, (g % 100000) / 100.0, 'payment ' || md5(g::text)
    FROM generate_series($1::int8, $2::int8) g";

async fn latency_run(args: &Args, admin: &PgPool) -> anyhow::Result<Value> {
    let max_wait_ms = args.max_wait_ms.unwrap_or(DEFAULT_LATENCY_MAX_WAIT_MS);
    if args.rate == 0 || args.txn_rows == 0 {
        bail!("--rate and --txn-rows must be above 0");
    }
    let (url, db) = provision(args, admin).await?;
    db.execute("ALTER TABLE bench_changes REPLICA IDENTITY FULL")
        .await?;
    create_slot(&db, LIVE_SLOT).await?;

    let receiver = receiver::start_with_latency(Stamp::CommitTime).await?;
    let dir = scratch_dir("live-latency")?;
    let config = write_config(
        &dir,
        ("pg", &source_fields(&url, LIVE_SLOT)),
        receiver.addr,
        args,
        max_wait_ms,
    )?;
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?
    };
    append(
        &config,
        &format!(
            "\n[server]\nlisten = \"{addr}\"\nrequests_per_second = 10000\n{}",
            aggregate_toml()
        ),
    )?;
    let token = create_token(args, &config)?;
    eprintln!(
        "live-latency: caudal run, the API on {addr} (log: {})",
        dir.join("caudal.log").display()
    );
    let (_, children_before) = cpu_secs()?;
    let caudal_run = spawn_caudal(caudal(args), &config, &dir, &["run"])?;
    wait_streaming(admin, LIVE_SLOT, &caudal_run, &dir).await?;
    wait_ready(&caudal_run, addr, &dir).await?;
    let stream = Arc::new(Mutex::new(Stream::default()));
    let reader = {
        let body = open_stream(addr, &token).await?;
        let stream = stream.clone();
        tokio::spawn(async move { read_stream(body, &stream).await })
    };

    let outcome = async {
        let (load, caudal_run) = steady_inserts(args, &db, caudal_run, &dir).await?;
        wait_for_records(&receiver, load.rows, &caudal_run, &dir).await?;
        wait_seen(&stream, &load).await;
        let live_rows = live_rows(addr, &token).await?;
        if live_rows != i64::try_from(load.rows)? {
            bail!(
                "GET /api/v1/live/{AGGREGATE} adds up to {live_rows} rows, {} were committed",
                load.rows
            );
        }
        anyhow::Ok((load, caudal_run))
    }
    .await;
    reader.abort();
    db.close().await;
    let (load, caudal_run) = outcome?;
    caudal_run.terminate()?;
    let ended = wait_exit(caudal_run, &dir, "caudal run").await?;
    let (_, children_after) = cpu_secs()?;
    let stream = std::mem::take(&mut *stream.lock().unwrap_or_else(PoisonError::into_inner));

    let timed: Vec<&Txn> = load
        .txns
        .iter()
        .filter(|t| t.before_commit_us >= load.measure_from_us)
        .collect();
    let (mut visible_us, unseen) = visibility(&stream, &timed);
    visible_us.sort_unstable();
    if visible_us.is_empty() {
        bail!(
            "no transaction committed after the warm-up was seen on the stream ({} events, {:?})",
            stream.events.len(),
            stream.ended
        );
    }
    let arrivals = receiver.arrivals();
    let mut delivery_us: Vec<i64> = arrivals
        .iter()
        .filter(|a| a.commit_us >= load.measure_from_us)
        .map(|a| a.arrived_us - a.commit_us)
        .collect();
    delivery_us.sort_unstable();
    let by_txn = delivered_txns(&arrivals, &load, args.txn_rows);
    let mut commit_rtt_us: Vec<i64> = timed.iter().map(|t| t.commit_rtt_us).collect();
    commit_rtt_us.sort_unstable();

    let ms = |sorted: &[i64], p: f64| {
        if sorted.is_empty() {
            Value::Null
        } else {
            json!(round(percentile(sorted, p) as f64 / 1000.0))
        }
    };
    let (mut txn_delivery_us, mut commit_lag_us) = match &by_txn {
        Some((d, l)) => (d.clone(), l.clone()),
        None => (Vec::new(), Vec::new()),
    };
    txn_delivery_us.sort_unstable();
    commit_lag_us.sort_unstable();
    let ratio = |reference: &[i64], p: f64| {
        if reference.is_empty() {
            return Value::Null;
        }
        let (r, v) = (percentile(reference, p), percentile(&visible_us, p));
        if v > 0 {
            json!(round(r as f64 / v as f64))
        } else {
            Value::Null
        }
    };
    let report = json!({
        "scenario": "live_latency",
        "target_changes_per_s": args.rate,
        "txn_rows": args.txn_rows,
        "accounts": ACCOUNTS,
        "warmup_secs": LATENCY_WARMUP.as_secs(),
        "duration_secs": args.duration,
        "achieved_changes_per_s": round(load.achieved),
        "committed": load.rows,
        "transactions": load.txns.len(),
        "timed": visible_us.len(),
        "unseen": unseen,
        "sse_events": stream.events.len(),
        "sse_lagged": stream.lagged,
        "batch": args.batch,
        "max_wait_ms": max_wait_ms,
        "requests": receiver.requests(),
        "visible_p50_ms": ms(&visible_us, 0.50),
        "visible_p95_ms": ms(&visible_us, 0.95),
        "visible_p99_ms": ms(&visible_us, 0.99),
        "visible_max_ms": ms(&visible_us, 1.0),
        "delivered_txn_p50_ms": ms(&txn_delivery_us, 0.50),
        "delivered_txn_p95_ms": ms(&txn_delivery_us, 0.95),
        "delivered_txn_p99_ms": ms(&txn_delivery_us, 0.99),
        "delivered_txn_max_ms": ms(&txn_delivery_us, 1.0),
        "delivery_timed": delivery_us.len(),
        "delivery_p50_ms": ms(&delivery_us, 0.50),
        "delivery_p95_ms": ms(&delivery_us, 0.95),
        "delivery_p99_ms": ms(&delivery_us, 0.99),
        "delivery_max_ms": ms(&delivery_us, 1.0),
        "visible_over_delivered": ratio(&txn_delivery_us, 0.50),
        "visible_over_delivered_p99": ratio(&txn_delivery_us, 0.99),
        "commit_rtt_p50_ms": ms(&commit_rtt_us, 0.50),
        "commit_rtt_p99_ms": ms(&commit_rtt_us, 0.99),
        "commit_time_lag_p50_ms": ms(&commit_lag_us, 0.50),
        "caudal_cpu_secs": round(children_after - children_before),
        "caudal_peak_rss_mib": round(ended.peak_rss_mib),
    });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// Creates a viewer token in caudal's state; returns it.
fn create_token(args: &Args, config: &Path) -> anyhow::Result<String> {
    let out = Command::new(&args.caudal)
        .arg("-c")
        .arg(config)
        .args(["token", "create", "--name", "bench", "--role", "viewer"])
        .env("CAUDAL_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args.caudal.display()))?;
    if !out.status.success() {
        bail!(
            "caudal token create failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .context("caudal token create printed no token")
}

/// Sends `GET path` with `token` on a new connection; the response.
async fn get(
    addr: SocketAddr,
    path: &str,
    token: &str,
) -> anyhow::Result<hyper::Response<Incoming>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(request).await?)
}

/// Waits until `caudal run` answers `/readyz` with 200.
async fn wait_ready(caudal: &Measured, addr: SocketAddr, dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(r) = get(addr, "/readyz", "").await
            && r.status().is_success()
        {
            return Ok(());
        }
        if caudal.has_exited() || started.elapsed() > STALL_TIMEOUT {
            bail!(
                "caudal run was not ready within {} s (log: {})",
                STALL_TIMEOUT.as_secs(),
                dir.join("caudal.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens the aggregate's SSE stream; its body.
async fn open_stream(addr: SocketAddr, token: &str) -> anyhow::Result<Incoming> {
    let path = format!("/api/v1/live/{AGGREGATE}/stream");
    let response = get(addr, &path, token).await?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        bail!("GET {path}: {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(response.into_body())
}

/// Reads SSE events from `body` into `stream` until it ends; each chunk
/// is stamped when it is read.
async fn read_stream(mut body: Incoming, stream: &Mutex<Stream>) {
    let mut pending = String::new();
    let ended = loop {
        let frame = match body.frame().await {
            None => break "the stream ended".to_string(),
            Some(Err(e)) => break format!("the stream failed: {e}"),
            Some(Ok(frame)) => frame,
        };
        let arrived_us = receiver::now_us();
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(data));
        let mut seen = Vec::new();
        let mut lagged = 0;
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let (mut event, mut data) = ("", String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            match event {
                "window" => {
                    let Ok(w) = serde_json::from_str::<Value>(&data) else {
                        continue;
                    };
                    let account = w["group"]["account"].as_i64();
                    let last = w["metrics"]["last"].as_f64();
                    if let (Some(account), Some(last)) = (account, last) {
                        seen.push(Seen {
                            account,
                            last: last as i64,
                            arrived_us,
                        });
                    }
                }
                "lagged" => lagged += 1,
                _ => {}
            }
        }
        let mut s = stream.lock().unwrap_or_else(PoisonError::into_inner);
        s.lagged += lagged;
        for e in seen {
            let top = s.last.entry(e.account).or_insert(i64::MIN);
            *top = (*top).max(e.last);
            s.events.push(e);
        }
    };
    stream.lock().unwrap_or_else(PoisonError::into_inner).ended = Some(ended);
}

/// Commits one transaction of `args.txn_rows` inserted rows, all of one
/// account (cycling over [`ACCOUNTS`]), every `txn_rows / rate` seconds (a
/// tokio interval, which catches up when a commit is late) for
/// [`LATENCY_WARMUP`] plus `args.duration` seconds; hands caudal back.
/// Fails when caudal exits meanwhile.
async fn steady_inserts(
    args: &Args,
    db: &PgPool,
    caudal: Measured,
    dir: &Path,
) -> anyhow::Result<(Load, Measured)> {
    let period = Duration::from_secs_f64(args.txn_rows as f64 / args.rate as f64);
    let duration = Duration::from_secs(args.duration);
    eprintln!(
        "live-latency: {} changes/s ({} transactions/s of {} rows of one account) for {} s \
         after {} s of warm-up",
        args.rate,
        round(1.0 / period.as_secs_f64()),
        args.txn_rows,
        args.duration,
        LATENCY_WARMUP.as_secs()
    );
    let txn_rows = i64::try_from(args.txn_rows)?;
    let mut txns = Vec::new();
    let mut tick = tokio::time::interval(period);
    let started = Instant::now();
    let measure_from_us = receiver::now_us() + i64::try_from(LATENCY_WARMUP.as_micros())?;
    let mut measured_from = None;
    let mut k: i64 = 0;
    while started.elapsed() < LATENCY_WARMUP + duration {
        tick.tick().await;
        if measured_from.is_none() && started.elapsed() >= LATENCY_WARMUP {
            measured_from = Some((Instant::now(), txns.len()));
        }
        let account = k % ACCOUNTS;
        let (lo, hi) = (k * txn_rows + 1, (k + 1) * txn_rows);
        let mut tx = db.begin().await?;
        let done = sqlx::query(INSERT_ONE_ACCOUNT)
            .bind(lo)
            .bind(hi)
            .bind(i32::try_from(account)?)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != args.txn_rows {
            bail!(
                "transaction {k} inserted {} rows, expected {}",
                done.rows_affected(),
                args.txn_rows
            );
        }
        let before_commit_us = receiver::now_us();
        let sent = Instant::now();
        tx.commit().await?;
        txns.push(Txn {
            account,
            last_id: hi,
            before_commit_us,
            commit_rtt_us: i64::try_from(sent.elapsed().as_micros())?,
        });
        k += 1;
        if caudal.has_exited() {
            let ended = caudal.wait().await?;
            bail!(
                "caudal run exited ({}) while the load ran (log: {})",
                ended.status,
                dir.join("caudal.log").display()
            );
        }
    }
    let (window_start, before_window) = measured_from.unwrap_or((started, 0));
    let window_secs = window_start.elapsed().as_secs_f64();
    let rows = txns.len() as u64 * args.txn_rows;
    let achieved = (txns.len() - before_window) as f64 * args.txn_rows as f64 / window_secs;
    let load = Load {
        txns,
        rows,
        achieved,
        measure_from_us,
    };
    Ok((load, caudal))
}

/// Waits (at most [`SEE_TIMEOUT`]) until the stream has shown every
/// account's last transaction.
async fn wait_seen(stream: &Mutex<Stream>, load: &Load) {
    let mut last_of: HashMap<i64, i64> = HashMap::new();
    for t in &load.txns {
        let top = last_of.entry(t.account).or_insert(i64::MIN);
        *top = (*top).max(t.last_id);
    }
    let started = Instant::now();
    while started.elapsed() < SEE_TIMEOUT {
        {
            let s = stream.lock().unwrap_or_else(PoisonError::into_inner);
            let all = last_of
                .iter()
                .all(|(a, id)| s.last.get(a).is_some_and(|seen| seen >= id));
            if all || s.ended.is_some() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Per timed transaction, from just before its COMMIT until the first
/// event of its account with `last` ≥ its largest id, in µs; and how many
/// were never seen.
fn visibility(stream: &Stream, timed: &[&Txn]) -> (Vec<i64>, usize) {
    let mut by_account: HashMap<i64, Vec<Seen>> = HashMap::new();
    for e in &stream.events {
        by_account.entry(e.account).or_default().push(*e);
    }
    let mut txns_of: HashMap<i64, Vec<&Txn>> = HashMap::new();
    for t in timed {
        txns_of.entry(t.account).or_default().push(*t);
    }
    let mut latencies = Vec::new();
    let mut unseen = 0;
    for (account, mut txns) in txns_of {
        txns.sort_by_key(|t| t.last_id);
        let events = by_account.get(&account).map_or(&[][..], Vec::as_slice);
        // The first event showing a transaction can only come at or after
        // the first one showing an earlier transaction of the account.
        let mut at = 0;
        for t in txns {
            while at < events.len() && events[at].last < t.last_id {
                at += 1;
            }
            match events.get(at) {
                Some(e) => latencies.push(e.arrived_us - t.before_commit_us),
                None => unseen += 1,
            }
        }
    }
    (latencies, unseen)
}

/// Per timed transaction, from just before its COMMIT until its last
/// record reached the receiver, and until the server's commit time, in
/// µs; `None` when the records' commit times do not match the
/// transactions one to one.
fn delivered_txns(
    arrivals: &[receiver::Arrival],
    load: &Load,
    txn_rows: u64,
) -> Option<(Vec<i64>, Vec<i64>)> {
    let mut by_commit: HashMap<i64, (u64, i64)> = HashMap::new();
    for a in arrivals {
        let e = by_commit.entry(a.commit_us).or_insert((0, i64::MIN));
        e.0 += 1;
        e.1 = e.1.max(a.arrived_us);
    }
    let mut commits: Vec<(i64, (u64, i64))> = by_commit.into_iter().collect();
    commits.sort_unstable_by_key(|(c, _)| *c);
    if commits.len() != load.txns.len() || commits.iter().any(|(_, (n, _))| *n != txn_rows) {
        return None;
    }
    let mut delivered = Vec::new();
    let mut lag = Vec::new();
    for (t, (commit_us, (_, arrived_us))) in load.txns.iter().zip(commits) {
        if t.before_commit_us >= load.measure_from_us {
            delivered.push(arrived_us - t.before_commit_us);
            lag.push(commit_us - t.before_commit_us);
        }
    }
    Some((delivered, lag))
}

/// The rows `GET /api/v1/live/NAME` adds up to over its windows.
async fn live_rows(addr: SocketAddr, token: &str) -> anyhow::Result<i64> {
    let path = format!("/api/v1/live/{AGGREGATE}");
    let response = get(addr, &path, token).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("GET {path}: {status}: {}", String::from_utf8_lossy(&body));
    }
    let live: Value = serde_json::from_slice(&body)?;
    if live["truncated"].as_bool() == Some(true) {
        bail!("GET {path} answered a truncated list of windows");
    }
    Ok(live["windows"]
        .as_array()
        .map_or(0, |w| w.iter().filter_map(|w| w["rows"].as_i64()).sum()))
}

#[cfg(test)]
mod tests {
    use super::{Load, Seen, Stream, Txn, delivered_txns, visibility};
    use crate::receiver::Arrival;

    fn txn(account: i64, last_id: i64, before_commit_us: i64) -> Txn {
        Txn {
            account,
            last_id,
            before_commit_us,
            commit_rtt_us: 0,
        }
    }

    #[test]
    fn a_transaction_is_visible_at_the_first_event_of_its_account_showing_its_last_id() {
        let seen = |account, last, arrived_us| Seen {
            account,
            last,
            arrived_us,
        };
        let stream = Stream {
            events: vec![
                seen(1, 100, 1_010),
                // Another account's event, then a closed window's older
                // figure: neither shows account 1's second transaction.
                seen(2, 200, 1_020),
                seen(1, 100, 1_030),
                seen(1, 300, 1_050),
            ],
            ..Stream::default()
        };
        let txns = [
            txn(1, 100, 1_000),
            txn(2, 200, 1_001),
            txn(1, 300, 1_002),
            txn(3, 400, 1_003),
        ];
        let timed: Vec<&Txn> = txns.iter().collect();
        let (mut latencies, unseen) = visibility(&stream, &timed);
        latencies.sort_unstable();
        assert_eq!(latencies, [10, 19, 48]);
        assert_eq!(unseen, 1);
    }

    #[test]
    fn deliveries_are_matched_to_transactions_by_commit_time() {
        let load = Load {
            txns: vec![txn(1, 2, 900), txn(2, 4, 1_000), txn(3, 6, 1_100)],
            rows: 6,
            achieved: 0.0,
            measure_from_us: 1_000,
        };
        let arrival = |commit_us, arrived_us| Arrival {
            commit_us,
            arrived_us,
        };
        // Two records per transaction, the second one's split over two
        // requests.
        let arrivals = [
            arrival(905, 950),
            arrival(905, 950),
            arrival(1_003, 1_030),
            arrival(1_102, 1_140),
            arrival(1_102, 1_140),
            arrival(1_003, 1_060),
        ];
        let (delivered, lag) = delivered_txns(&arrivals, &load, 2).expect("matched");
        assert_eq!(delivered, [60, 40]);
        assert_eq!(lag, [3, 2]);
        // A missing record: no match rather than a wrong one.
        assert!(delivered_txns(&arrivals[..5], &load, 2).is_none());
    }
}

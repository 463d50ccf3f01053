//! The always-200 HTTP receiver the scenarios deliver to. It runs inside
//! the harness process, parses every request body (a JSON array of
//! records) to count its records, and answers 200 with an empty body.
//!
//! With latency recording on, it also reads each record's commit time
//! ([`Stamp`]: the record's `commit_time`, or a stamp the load generator
//! wrote into the row) and keeps, per record, the commit time and how long
//! after it the request carrying the record had been read whole. The
//! database and the harness run on the same machine, so both times come
//! from the same clock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// One delivered record: when its transaction committed and when it
/// arrived, in microseconds since the Unix epoch.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub commit_us: i64,
    pub arrived_us: i64,
}

/// Where a record's commit time is read from.
#[derive(Clone, Copy, Debug)]
pub enum Stamp {
    /// The record's `commit_time`, RFC 3339 (PostgreSQL CDC: the commit
    /// record's time, in microseconds).
    CommitTime,
    /// The row's own [`ROW_STAMP_COLUMN`] in `after`: microseconds since
    /// the Unix epoch, written by the load generator's statement (MariaDB
    /// CDC, whose `commit_time` is the binlog event's whole second). A
    /// record without `after` (a delete) is counted but not timed.
    Row,
}

/// The column [`Stamp::Row`] reads (the field of [`RowStamp`]).
pub const ROW_STAMP_COLUMN: &str = "stamp_us";

/// A running receiver; it serves until the harness exits.
#[derive(Debug)]
pub struct Receiver {
    pub addr: SocketAddr,
    records: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    recording: Option<Arc<Recording>>,
}

/// What latency recording keeps.
#[derive(Debug)]
struct Recording {
    stamp: Stamp,
    arrivals: Mutex<Vec<Arrival>>,
}

impl Receiver {
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The arrivals recorded so far (empty unless started with
    /// [`start_with_latency`]).
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.recording.as_ref().map_or_else(Vec::new, |r| {
            r.arrivals
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }
}

/// Starts a receiver that only counts records.
pub async fn start() -> anyhow::Result<Receiver> {
    serve(None).await
}

/// Starts a receiver that also records every record's commit-to-arrival
/// latency, reading commit times from `stamp`.
pub async fn start_with_latency(stamp: Stamp) -> anyhow::Result<Receiver> {
    serve(Some(Arc::new(Recording {
        stamp,
        arrivals: Mutex::new(Vec::new()),
    })))
    .await
}

/// The one field [`Stamp::CommitTime`] reads; the others are skipped
/// unparsed.
#[derive(serde::Deserialize)]
struct Committed<'a> {
    #[serde(borrow)]
    commit_time: Option<std::borrow::Cow<'a, str>>,
}

/// The one field [`Stamp::Row`] reads.
#[derive(serde::Deserialize)]
struct RowStamped {
    after: Option<RowStamp>,
}

#[derive(serde::Deserialize)]
struct RowStamp {
    /// [`ROW_STAMP_COLUMN`].
    stamp_us: Option<i64>,
}

async fn serve(recording: Option<Arc<Recording>>) -> anyhow::Result<Receiver> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let records = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let (r, q, a) = (records.clone(), requests.clone(), recording.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (r, q, a) = (r.clone(), q.clone(), a.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (r, q, a) = (r.clone(), q.clone(), a.clone());
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        let n = match &a {
                            None => count_records(&body),
                            Some(a) => record_arrivals(&body, a),
                        };
                        r.fetch_add(n as u64, Ordering::Relaxed);
                        q.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, hyper::Error>(Response::new(http_body_util::Full::new(
                            bytes::Bytes::new(),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Receiver {
        addr,
        records,
        requests,
        recording,
    })
}

/// An object body: the seed 001 shape `{"requests": [records]}`, or one
/// record (seed 000) when it has no `requests` array.
#[derive(serde::Deserialize)]
struct Wrapped {
    requests: Option<Vec<serde::de::IgnoredAny>>,
}

/// How many records `body` holds: caudal's JSON array of records, the seed
/// 001 shape or one record (0 when it is not JSON). Parsed without building
/// values, so the receiver costs the senders little CPU.
fn count_records(body: &[u8]) -> usize {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => {
            serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(body).map_or(0, |v| v.len())
        }
        Some(b'{') => {
            serde_json::from_slice::<Wrapped>(body).map_or(0, |w| w.requests.map_or(1, |r| r.len()))
        }
        _ => 0,
    }
}

/// Records the arrival of every record of `body`; returns how many records
/// it holds. A record without a readable commit time is counted but not
/// timed.
fn record_arrivals(body: &[u8], recording: &Recording) -> usize {
    let arrived_us = now_us();
    let (n, commits): (usize, Vec<i64>) = match recording.stamp {
        Stamp::CommitTime => {
            let Ok(batch) = serde_json::from_slice::<Vec<Committed<'_>>>(body) else {
                return 0;
            };
            let commits = batch
                .iter()
                .filter_map(|r| parse_utc_us(r.commit_time.as_deref()?))
                .collect();
            (batch.len(), commits)
        }
        Stamp::Row => {
            let Ok(batch) = serde_json::from_slice::<Vec<RowStamped>>(body) else {
                return 0;
            };
            let commits = batch
                .iter()
                .filter_map(|r| r.after.as_ref()?.stamp_us)
                .collect();
            (batch.len(), commits)
        }
    };
    recording
        .arrivals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(commits.into_iter().map(|commit_us| Arrival {
            commit_us,
            arrived_us,
        }));
    n
}

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Microseconds since the Unix epoch of a UTC RFC 3339 time as CDC records
/// carry it (`2026-12-03T10:11:12.123456Z`, the fraction optional).
fn parse_utc_us(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut hms = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (hms.next()??, hms.next()??, hms.next()??);
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // The first six digits are microseconds; further ones are dropped.
    let micros = format!("{fraction:0<6}")[..6].parse::<i64>().ok()?;
    let secs = days_from_civil(y, m, d) * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(secs * 1_000_000 + micros)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::{Recording, Stamp, count_records, parse_utc_us, record_arrivals};

    #[test]
    fn bodies_are_counted_in_every_senders_shape() {
        assert_eq!(count_records(br#"[{"a":1},{"a":2}]"#), 2);
        assert_eq!(
            count_records(br#"{"requests":[{"a":1},{"a":2},{"a":3}]}"#),
            3
        );
        assert_eq!(count_records(br#"{"service_id":"SRV-1"}"#), 1);
        assert_eq!(count_records(b"not json"), 0);
    }

    fn commits(stamp: Stamp, body: &str) -> (usize, Vec<i64>) {
        let recording = Recording {
            stamp,
            arrivals: Mutex::new(Vec::new()),
        };
        let n = record_arrivals(body.as_bytes(), &recording);
        let arrivals = recording.arrivals.into_inner().unwrap_or_default();
        (n, arrivals.iter().map(|a| a.commit_us).collect())
    }

    #[test]
    fn commit_times_come_from_the_record_or_the_row() {
        let body = r#"[
            {"op":"insert","after":{"id":1,"stamp_us":1000},"commit_time":"1970-01-01T00:00:01Z"},
            {"op":"update","before":{"id":2},"after":{"id":2,"stamp_us":2000},"commit_time":null},
            {"op":"delete","before":{"id":3,"stamp_us":3000},"after":null,"commit_time":"1970-01-01T00:00:03.5Z"}
        ]"#;
        assert_eq!(
            commits(Stamp::CommitTime, body),
            (3, vec![1_000_000, 3_500_000])
        );
        // A delete has no `after`: counted, not timed.
        assert_eq!(commits(Stamp::Row, body), (3, vec![1000, 2000]));
        assert_eq!(commits(Stamp::Row, "not json"), (0, vec![]));
    }

    #[test]
    fn commit_times_parse_to_epoch_microseconds() {
        assert_eq!(parse_utc_us("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_utc_us("2000-01-01T00:00:00.5Z"),
            Some(946_684_800_500_000)
        );
        // `date -u -d 2026-12-03T10:11:12Z +%s` = 1796292672
        assert_eq!(
            parse_utc_us("2026-12-03T10:11:12.123456Z"),
            Some(1_796_292_672_123_456)
        );
        assert_eq!(
            parse_utc_us("2024-02-29T23:59:59.999999Z"),
            Some(1_709_251_199_999_999)
        );
        assert_eq!(parse_utc_us("2026-12-03T10:11:12+01:00"), None);
    }
}

//! The datasets' query API: `/api/v1/datasets`, a dataset's partitions, and
//! its rows, filtered, projected and paged, as JSON or CSV, with a result
//! cache.
//!
//! Promises:
//! - **Pruned before opened.** Partitions come from the state store (no
//!   listing of storage); a partition is read only if its values can meet
//!   the filters, and a file only if its min/max can.
//! - **Never stale.** A cached result remembers the generation of every
//!   partition it could have read; it is served only while the dataset's
//!   partitions matching the query are exactly those, at those
//!   generations. A rewrite of one of them (in this process or another)
//!   drops it; a rewrite elsewhere in the dataset does not.
//! - Bad parameters are 400 with the parameter named; a cursor from before
//!   a rewrite is 409 (start again without it).
//! - The in-process cache holds at most `cache.max_bytes` (least recently
//!   used out first) for at most `cache.ttl`; with `cache.url` results live
//!   in Redis instead, shared by every process, with the same checks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use caudal_connectors::sinks::files::{self, Filter, Location, Resume, RowQuery};
use caudal_core::config::{CacheConfig, FilesSinkConfig};
use caudal_core::dataset::{Manifest, parse_partition};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::api::{Api, ApiError, ApiResult, bad_request, ok};

/// Rows per page by default, and at most.
const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 50_000;

/// A cached answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    /// Partitions the query could read, with their generations.
    parts: Vec<(String, i64)>,
    content_type: String,
    next_cursor: Option<String>,
    /// Shared, not copied, by every hit.
    #[serde(with = "serde_bytes_b64")]
    body: bytes::Bytes,
}

mod serde_bytes_b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bytes::Bytes, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(bytes::Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

/// A dataset's partitions: path and generation, by path.
type Parts = Arc<Vec<(String, i64)>>;

struct Local {
    entries: HashMap<String, (Entry, Instant, u64)>,
    bytes: usize,
    tick: u64,
}

/// The query results cache, in process or in Redis.
pub struct Cache {
    config: CacheConfig,
    local: Mutex<Local>,
    redis: Option<redis::Client>,
    /// Manifests by (dataset, partition, generation): they never change.
    manifests: Mutex<HashMap<(String, String, i64), Arc<Manifest>>>,
    /// Each dataset's partitions (path, generation) as of a version.
    partitions: Mutex<HashMap<String, (i64, Parts)>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").finish_non_exhaustive()
    }
}

impl Cache {
    pub fn new(config: &CacheConfig) -> caudal_core::Result<Self> {
        let redis = config
            .url
            .as_ref()
            .map(|url| {
                redis::Client::open(url.expose()).map_err(|e| {
                    caudal_core::Error::new(
                        caudal_core::ErrorKind::Config,
                        format!("cache.url: {e}"),
                    )
                })
            })
            .transpose()?;
        Ok(Self {
            config: config.clone(),
            local: Mutex::new(Local {
                entries: HashMap::new(),
                bytes: 0,
                tick: 0,
            }),
            redis,
            manifests: Mutex::new(HashMap::new()),
            partitions: Mutex::new(HashMap::new()),
        })
    }

    fn max_entry(&self) -> usize {
        let max = self.config.max_bytes.0 as usize;
        self.config
            .max_entry_bytes
            .map_or(max / 16, |b| b.0 as usize)
            .min(max)
    }

    async fn get(&self, key: &str) -> Option<Entry> {
        if let Some(client) = &self.redis {
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let text: Option<String> = redis::cmd("GET")
                .arg(redis_key(key))
                .query_async(&mut conn)
                .await
                .ok()?;
            return text.and_then(|t| serde_json::from_str(&t).ok());
        }
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        local.tick += 1;
        let tick = local.tick;
        let ttl = self.config.ttl.0;
        let expired = local
            .entries
            .get(key)
            .is_some_and(|(_, at, _)| at.elapsed() > ttl);
        if expired {
            if let Some((e, _, _)) = local.entries.remove(key) {
                local.bytes -= e.body.len();
            }
            self.gauges(&local);
            return None;
        }
        let (entry, _, used) = local.entries.get_mut(key)?;
        *used = tick;
        Some(entry.clone())
    }

    async fn put(&self, key: String, entry: Entry) {
        if entry.body.len() > self.max_entry() {
            return;
        }
        if let Some(client) = &self.redis {
            let Ok(text) = serde_json::to_string(&entry) else {
                return;
            };
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let _: Result<(), _> = redis::cmd("SET")
                    .arg(redis_key(&key))
                    .arg(text)
                    .arg("PX")
                    .arg(self.config.ttl.0.as_millis() as u64)
                    .query_async(&mut conn)
                    .await;
            }
            return;
        }
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        local.tick += 1;
        let tick = local.tick;
        local.bytes += entry.body.len();
        if let Some((old, _, _)) = local.entries.insert(key, (entry, Instant::now(), tick)) {
            local.bytes -= old.body.len();
        }
        let max = self.config.max_bytes.0 as usize;
        while local.bytes > max {
            let Some(oldest) = local
                .entries
                .iter()
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((e, _, _)) = local.entries.remove(&oldest) {
                local.bytes -= e.body.len();
            }
        }
        self.gauges(&local);
    }

    async fn remove(&self, key: &str) {
        if let Some(client) = &self.redis {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let _: Result<(), _> = redis::cmd("DEL")
                    .arg(redis_key(key))
                    .query_async(&mut conn)
                    .await;
            }
            return;
        }
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((e, _, _)) = local.entries.remove(key) {
            local.bytes -= e.body.len();
        }
        self.gauges(&local);
    }

    fn gauges(&self, local: &Local) {
        metrics::gauge!("caudal_dataset_cache_entries").set(local.entries.len() as f64);
        metrics::gauge!("caudal_dataset_cache_bytes").set(local.bytes as f64);
    }

    fn manifest(&self, dataset: &str, part: &str, generation: i64) -> Option<Arc<Manifest>> {
        self.manifests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(dataset.to_string(), part.to_string(), generation))
            .cloned()
    }

    fn keep_manifest(&self, dataset: &str, part: &str, generation: i64, m: Arc<Manifest>) {
        let mut all = self
            .manifests
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if all.len() > 100_000 {
            all.clear();
        }
        all.insert((dataset.to_string(), part.to_string(), generation), m);
    }
}

/// The partitions of `dataset` with their generations: from memory while
/// the dataset's version is unchanged, else from the store.
async fn partitions_of(api: &Api, dataset: &str) -> Result<Parts, ApiError> {
    let store = api.store();
    let version = store
        .dataset_version(dataset)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    let cache = api.cache();
    if let Some((v, parts)) = cache
        .partitions
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(dataset)
        && *v == version
    {
        return Ok(parts.clone());
    }
    let parts: Parts = Arc::new(
        store
            .dataset_partitions(dataset)
            .await
            .map_err(|e| ApiError::from_error(&e))?
            .into_iter()
            .map(|p| (p.part, p.generation))
            .collect(),
    );
    // Stored under the version read first: a commit in between makes the
    // next request read again.
    cache
        .partitions
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(dataset.to_string(), (version, parts.clone()));
    Ok(parts)
}

fn redis_key(key: &str) -> String {
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("caudal:dataset-cache:{hex}")
}

/// A dataset of the configuration.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DatasetInfo {
    pub name: String,
    /// `parquet` or `jsonl`.
    pub format: String,
    /// Where its files are (no credentials).
    pub location: String,
    pub partition_by: Vec<String>,
    /// The report pipeline that writes it, if any.
    pub pipeline: Option<String>,
    pub partitions: i64,
    pub dates: i64,
    pub rows: i64,
    pub bytes: i64,
    pub first_date: Option<String>,
    pub last_date: Option<String>,
    /// When a date was last committed (RFC 3339).
    pub committed_at: Option<String>,
}

/// Every dataset.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DatasetList {
    pub datasets: Vec<DatasetInfo>,
}

/// A partition of a dataset.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PartitionInfo {
    /// Its path, e.g. `provider_id=7/date=2025-05-14`.
    pub path: String,
    /// Its column values.
    pub values: HashMap<String, Option<String>>,
    /// Bumped by every commit.
    pub generation: i64,
    pub rows: i64,
    pub bytes: i64,
    pub files: i64,
    pub first_date: String,
    pub last_date: String,
    pub committed_at: String,
}

/// A dataset's partitions.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PartitionList {
    pub dataset: String,
    pub partitions: Vec<PartitionInfo>,
}

fn files_sink<'a>(api: &'a Api, name: &str) -> Result<&'a FilesSinkConfig, ApiError> {
    api.config()
        .sinks
        .get(name)
        .and_then(|s| s.files())
        .ok_or_else(|| ApiError::not_found(format!("no dataset {name:?}")))
}

#[utoipa::path(get, path = "/api/v1/datasets", tag = "datasets", responses((status = 200, description = "every dataset (files sink)", body = DatasetList), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn datasets(State(api): State<Api>) -> ApiResult {
    let summaries = api
        .store()
        .dataset_summaries()
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    let config = api.config();
    let mut out = Vec::new();
    for (name, sink) in &config.sinks {
        let Some(files) = sink.files() else { continue };
        let s = summaries.iter().find(|s| s.dataset == *name);
        out.push(DatasetInfo {
            name: name.clone(),
            format: files.format.as_str().into(),
            location: caudal_core::units::redact_url(&files.url),
            partition_by: files.partition_by.clone(),
            pipeline: config
                .pipelines
                .iter()
                .find(|(_, p)| p.sink == *name)
                .map(|(n, _)| n.clone()),
            partitions: s.map_or(0, |s| s.partitions),
            dates: s.map_or(0, |s| s.dates),
            rows: s.map_or(0, |s| s.rows),
            bytes: s.map_or(0, |s| s.bytes),
            first_date: s.and_then(|s| s.first_date.clone()),
            last_date: s.and_then(|s| s.last_date.clone()),
            committed_at: s.and_then(|s| s.committed_at.map(|t| t.to_string())),
        });
    }
    ok(&DatasetList { datasets: out })
}

#[utoipa::path(get, path = "/api/v1/datasets/{name}/partitions", tag = "datasets", params(("name" = String, Path, description = "the dataset (its sink's name)")), responses((status = 200, description = "the dataset's partitions, by path", body = PartitionList), (status = 404, description = "no such dataset", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn partitions(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    files_sink(&api, &name)?;
    let parts = api
        .store()
        .dataset_partitions(&name)
        .await
        .map_err(|e| ApiError::from_error(&e))?;
    ok(&PartitionList {
        dataset: name,
        partitions: parts
            .into_iter()
            .map(|p| PartitionInfo {
                values: parse_partition(&p.part)
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
                path: p.part,
                generation: p.generation,
                rows: p.rows,
                bytes: p.bytes,
                files: p.files,
                first_date: p.first_date,
                last_date: p.last_date,
                committed_at: p.committed_at.to_string(),
            })
            .collect(),
    })
}

/// Where a page resumes, and the partitions it was cut from.
#[derive(Serialize, Deserialize)]
struct Cursor {
    /// A hash of the matching partitions and their generations.
    v: String,
    f: usize,
    r: u64,
}

fn fingerprint(parts: &[(String, i64)]) -> String {
    let mut h = sha2::Sha256::new();
    for (p, g) in parts {
        h.update(p.as_bytes());
        h.update(b"\0");
        h.update(g.to_le_bytes());
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn encode_cursor(c: &Cursor) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(c).unwrap_or_default())
}

fn decode_cursor(text: &str) -> Result<Cursor, ApiError> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad_request("parameter cursor: not a cursor this API gave".into()))
}

/// The parsed query string of `/rows`.
struct RowParams {
    filters: Vec<Filter>,
    columns: Option<Vec<String>>,
    limit: usize,
    cursor: Option<Cursor>,
    /// Normalised, for the cache key.
    key: String,
}

fn parse_params(
    pairs: &[(String, String)],
    files: &FilesSinkConfig,
) -> Result<RowParams, ApiError> {
    let mut filters = Vec::new();
    let mut columns = None;
    let mut limit = DEFAULT_LIMIT;
    let mut cursor = None;
    let mut ranges: HashMap<String, (Option<String>, Option<String>)> = HashMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for (k, v) in pairs {
        if !seen.insert(k.clone()) {
            return Err(bad_request(format!("parameter {k}: given twice")));
        }
        match k.as_str() {
            "columns" => {
                let list: Vec<String> = v
                    .split(',')
                    .map(|c| c.trim().to_string())
                    .filter(|c| !c.is_empty())
                    .collect();
                if list.is_empty() {
                    return Err(bad_request(
                        "parameter columns: name at least one column".into(),
                    ));
                }
                columns = Some(list);
            }
            "limit" => {
                limit = crate::api::parse_limit(v, MAX_LIMIT)?;
            }
            "cursor" => cursor = Some(decode_cursor(v)?),
            _ => {
                if let Some(col) = k.strip_suffix("_from") {
                    ranges.entry(col.to_string()).or_default().0 = Some(v.clone());
                } else if let Some(col) = k.strip_suffix("_to") {
                    ranges.entry(col.to_string()).or_default().1 = Some(v.clone());
                } else {
                    filters.push(Filter::Eq {
                        column: k.clone(),
                        value: v.clone(),
                    });
                }
            }
        }
    }
    for (column, (from, to)) in ranges {
        filters.push(Filter::Range { column, from, to });
    }
    filters.sort_by(|a, b| a.column().cmp(b.column()));
    // Dates of the date column are checked here: partition values compare
    // as text.
    for f in &filters {
        if f.column() == files.date_column {
            let values: Vec<(&str, &String)> = match f {
                Filter::Eq { value, .. } => vec![("", value)],
                Filter::Range { from, to, .. } => from
                    .iter()
                    .map(|v| ("_from", v))
                    .chain(to.iter().map(|v| ("_to", v)))
                    .collect(),
            };
            for (suffix, v) in values {
                if v.parse::<jiff::civil::Date>().is_err() {
                    return Err(bad_request(format!(
                        "parameter {}{suffix}: {v:?} is not a date like 2025-05-14",
                        f.column()
                    )));
                }
            }
        }
    }
    let mut normalised: Vec<&(String, String)> =
        pairs.iter().filter(|(k, _)| k != "cursor").collect();
    normalised.sort();
    let key = serde_json::to_string(&normalised).unwrap_or_default();
    Ok(RowParams {
        filters,
        columns,
        limit,
        cursor,
        key,
    })
}

fn wants_csv(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/csv"))
}

#[utoipa::path(get, path = "/api/v1/datasets/{name}/rows", tag = "datasets", params(("name" = String, Path, description = "the dataset (its sink's name)"), ("COLUMN" = Option<String>, Query, description = "rows whose COLUMN equals this value (any partition or data column), e.g. `provider_id=7`"), ("COLUMN_from" = Option<String>, Query, description = "rows whose COLUMN is at least this, e.g. `date_from=2025-05-01`"), ("COLUMN_to" = Option<String>, Query, description = "rows whose COLUMN is at most this (included)"), ("columns" = Option<String>, Query, description = "the columns to return, comma-separated (default all)"), ("limit" = Option<usize>, Query, description = "rows per page (default 1000, at most 50000)"), ("cursor" = Option<String>, Query, description = "the next_cursor of the previous page")), responses((status = 200, description = "a page of rows as JSON (`rows`, `next_cursor`), or CSV with `Accept: text/csv` (next cursor in `X-Next-Cursor`); `X-Cache: hit|miss`", body = crate::openapi::RowPage), (status = 400, description = "a bad parameter, named", body = crate::openapi::ErrorBody), (status = 404, description = "no such dataset", body = crate::openapi::ErrorBody), (status = 409, description = "the dataset changed since the cursor was given", body = crate::openapi::ErrorBody), (status = 401, description = "no live token", body = crate::openapi::ErrorBody), (status = 429, description = "rate limited; see Retry-After", body = crate::openapi::ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn rows(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> ApiResult {
    let started = Instant::now();
    let files = files_sink(&api, &name)?.clone();
    let params = parse_params(&pairs, &files)?;
    let csv = wants_csv(&headers);
    // The partitions that may match, with their generations (the store
    // lists them; storage is not listed).
    let all = partitions_of(&api, &name).await?;
    let partition_filters: Vec<Filter> = params
        .filters
        .iter()
        .filter(|f| files.partition_by.iter().any(|c| c == f.column()))
        .cloned()
        .collect();
    let parts: Vec<(String, i64)> = all
        .iter()
        .filter(|(part, _)| {
            let values = parse_partition(part).unwrap_or_default();
            let m = Manifest {
                version: 0,
                dataset: String::new(),
                partition: part.clone(),
                values: values
                    .into_iter()
                    .map(|(c, v)| {
                        (
                            c,
                            v.unwrap_or_else(|| caudal_core::dataset::NULL_PARTITION.into()),
                        )
                    })
                    .collect(),
                generation: 0,
                committed_at: String::new(),
                format: String::new(),
                columns: Vec::new(),
                rows: 0,
                bytes: 0,
                files: Vec::new(),
            };
            files::partition_may_match(&m, &partition_filters)
        })
        .cloned()
        .collect();
    let version = fingerprint(&parts);
    let start = match &params.cursor {
        Some(c) if c.v != version => {
            return Err(ApiError::conflict(
                "parameter cursor: the dataset changed since this cursor was given; start again without it".into(),
            ));
        }
        Some(c) => Resume {
            file: c.f,
            row: c.r,
        },
        None => Resume::default(),
    };
    let cache = api.cache();
    let key = format!(
        "{name}\u{0}{}\u{0}{}\u{0}{}\u{0}{}:{}",
        // The dataset's place too: a Redis cache may be shared by
        // deployments whose datasets have the same name.
        files.url,
        params.key,
        if csv { "csv" } else { "json" },
        start.file,
        start.row
    );
    if let Some(entry) = cache.get(&key).await {
        if entry.parts == parts {
            metrics::counter!("caudal_dataset_cache_hits_total", "dataset" => name.clone())
                .increment(1);
            metrics::histogram!("caudal_dataset_query_seconds", "dataset" => name.clone(), "cache" => "hit")
                .record(started.elapsed().as_secs_f64());
            return Ok(respond(entry, "hit"));
        }
        cache.remove(&key).await;
        metrics::counter!("caudal_dataset_cache_invalidations_total", "dataset" => name.clone())
            .increment(1);
    }
    metrics::counter!("caudal_dataset_cache_misses_total", "dataset" => name.clone()).increment(1);
    let (location, _) = caudal_engine::report::dataset_location(api.config(), &name)
        .ok_or_else(|| ApiError::not_found(format!("no dataset {name:?}")))?
        .map_err(|e| ApiError::from_error(&e))?;
    let mut manifests = Vec::with_capacity(parts.len());
    for (part, generation) in &parts {
        if let Some(m) = cache.manifest(&name, part, *generation) {
            manifests.push(m);
            continue;
        }
        if let Some(m) = files::read_manifest(&location, part)
            .await
            .map_err(|e| ApiError::from_error(&e))?
        {
            let m = Arc::new(m);
            // Keep it under the generation the store knows it by only when
            // they agree (a commit may sit between the two).
            if m.generation as i64 == *generation {
                cache.keep_manifest(&name, part, *generation, m.clone());
            }
            manifests.push(m);
        }
    }
    check_columns(&params, &files, &manifests)?;
    let query = RowQuery {
        filters: params.filters.clone(),
        columns: params.columns.clone(),
        limit: params.limit,
        start,
    };
    let page = read(&location, &manifests, &query).await?;
    let next_cursor = page.next.map(|n| {
        encode_cursor(&Cursor {
            v: version,
            f: n.file,
            r: n.row,
        })
    });
    let (content_type, body) = if csv {
        (
            "text/csv; charset=utf-8",
            encode_csv(&page.rows, &params, &files, &manifests)?,
        )
    } else {
        let body = serde_json::to_vec(&serde_json::json!({
            "dataset": name,
            "rows": page.rows,
            "next_cursor": next_cursor,
        }))
        .map_err(|e| ApiError::internal(e.to_string()))?;
        ("application/json", body)
    };
    let entry = Entry {
        parts,
        content_type: content_type.into(),
        next_cursor,
        body: body.into(),
    };
    cache.put(key, entry.clone()).await;
    metrics::histogram!("caudal_dataset_query_seconds", "dataset" => name.clone(), "cache" => "miss")
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("caudal_dataset_files_read_total", "dataset" => name.clone())
        .increment(page.files_read as u64);
    metrics::counter!("caudal_dataset_files_pruned_total", "dataset" => name)
        .increment(page.files_pruned as u64);
    Ok(respond(entry, "miss"))
}

async fn read(
    location: &Location,
    manifests: &[Arc<Manifest>],
    query: &RowQuery,
) -> Result<files::Page, ApiError> {
    files::read_rows(location, manifests, query)
        .await
        .map_err(|e| {
            if e.kind() == caudal_core::ErrorKind::Config {
                bad_request(format!("parameter {}", e.report()))
            } else {
                ApiError::from_error(&e)
            }
        })
}

/// Every filter and requested column names a column of the dataset.
fn check_columns(
    params: &RowParams,
    files: &FilesSinkConfig,
    manifests: &[Arc<Manifest>],
) -> Result<(), ApiError> {
    let Some(first) = manifests.first() else {
        return Ok(());
    };
    let known = |c: &str| {
        files.partition_by.iter().any(|p| p == c) || first.columns.iter().any(|k| k.name == c)
    };
    let names = || {
        files
            .partition_by
            .iter()
            .map(String::as_str)
            .chain(first.columns.iter().map(|c| c.name.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for f in &params.filters {
        if !known(f.column()) {
            let param = match f {
                Filter::Eq { column, .. } => column.clone(),
                Filter::Range { column, from, .. } => {
                    format!("{column}{}", if from.is_some() { "_from" } else { "_to" })
                }
            };
            return Err(bad_request(format!(
                "parameter {param}: the dataset has no column {:?}; columns: {}",
                f.column(),
                names()
            )));
        }
    }
    for c in params.columns.iter().flatten() {
        if !known(c) {
            return Err(bad_request(format!(
                "parameter columns: the dataset has no column {c:?}; columns: {}",
                names()
            )));
        }
    }
    Ok(())
}

fn encode_csv(
    rows: &[serde_json::Map<String, serde_json::Value>],
    params: &RowParams,
    files: &FilesSinkConfig,
    manifests: &[Arc<Manifest>],
) -> Result<Vec<u8>, ApiError> {
    let header: Vec<String> = match (&params.columns, rows.first()) {
        (_, Some(row)) => row.keys().cloned().collect(),
        (Some(cols), None) => cols.clone(),
        (None, None) => files
            .partition_by
            .iter()
            .cloned()
            .chain(
                manifests
                    .first()
                    .into_iter()
                    .flat_map(|m| m.columns.iter().map(|c| c.name.clone())),
            )
            .collect(),
    };
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(&header)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    for row in rows {
        let record: Vec<String> = header
            .iter()
            .map(|h| match row.get(h) {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            })
            .collect();
        w.write_record(&record)
            .map_err(|e| ApiError::internal(e.to_string()))?;
    }
    w.into_inner()
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn respond(entry: Entry, cache: &'static str) -> Response {
    let mut r = (StatusCode::OK, entry.body).into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&entry.content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert("x-cache", HeaderValue::from_static(cache));
    if let Some(next) = entry.next_cursor
        && let Ok(v) = HeaderValue::from_str(&next)
    {
        h.insert("x-next-cursor", v);
    }
    r
}

//! The delivery policy of a sink: retries with backoff, what each answer
//! means (status classes), the circuit breaker, rate limits and
//! concurrency. One `delivery` section, the same for every kind of sink;
//! the engine's sender applies it.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::path::{FieldPath, Problem};
use crate::units::Duration;

/// How a sink delivers batches, whatever its kind. Every setting has a
/// default; the whole section may be left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Backoff between attempts of a batch that failed temporarily.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Which answers mean success, retry later, reject or split (for HTTP,
    /// response statuses).
    #[serde(default)]
    pub status: StatusConfig,
    /// Stops sending for a while when most recent requests failed, so a
    /// struggling receiver gets room to recover. On by default.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Caps on requests and records per second (default: no cap).
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// Batches in flight at once: a number (default 1), `"adaptive"`, or
    /// `{ adaptive = { min = 1, max = 32 } }`. Records with the same
    /// pipeline `key` keep their source order at any concurrency; batches
    /// sharing no key may overtake each other.
    #[serde(default)]
    pub concurrency: ConcurrencyConfig,
}

impl DeliveryConfig {
    /// Most batches in flight at once (the adaptive maximum, or the fixed
    /// number), at least 1.
    pub fn max_in_flight(&self) -> u32 {
        match self.concurrency {
            ConcurrencyConfig::Fixed(n) => n,
            ConcurrencyConfig::Adaptive { max, .. } => max,
        }
        .max(1)
    }
}

/// Delivery settings written directly in a sink, as before the `delivery`
/// section existed.
#[derive(Debug, Default)]
pub(super) struct Legacy {
    pub retry: Option<RetryConfig>,
    pub status: Option<StatusConfig>,
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    pub rate_limit: Option<RateLimitConfig>,
    pub concurrency: Option<ConcurrencyConfig>,
}

impl Legacy {
    /// Moves each setting into `delivery`. Returns the warnings (one per
    /// setting moved) and the errors (a setting also written in
    /// `delivery`, which would make the file ambiguous).
    pub(super) fn move_into(
        mut self,
        delivery: &mut DeliveryConfig,
        path: &FieldPath,
    ) -> (Vec<Problem>, Vec<Problem>) {
        let (mut warnings, mut errors) = (Vec::new(), Vec::new());
        let defaults = DeliveryConfig::default();
        let mut note = |field: &str, both: bool| {
            let at = path.key(field.to_string());
            if both {
                errors.push(Problem::at_key(
                    at,
                    format!(
                        "set either `{field}` or `delivery.{field}`, not both: `{field}` directly \
                         in a sink is the old spelling of `delivery.{field}`"
                    ),
                ));
            } else {
                warnings.push(Problem::at_key(
                    at,
                    format!(
                        "`{field}` directly in a sink is deprecated: move it into the sink's \
                         `delivery` section (`delivery.{field}`); it still works for now"
                    ),
                ));
            }
        };
        if let Some(v) = self.retry.take() {
            note("retry", delivery.retry != defaults.retry);
            delivery.retry = v;
        }
        if let Some(v) = self.status.take() {
            note("status", delivery.status != defaults.status);
            delivery.status = v;
        }
        if let Some(v) = self.circuit_breaker.take() {
            note(
                "circuit_breaker",
                delivery.circuit_breaker != defaults.circuit_breaker,
            );
            delivery.circuit_breaker = v;
        }
        if let Some(v) = self.rate_limit.take() {
            note("rate_limit", delivery.rate_limit != defaults.rate_limit);
            delivery.rate_limit = v;
        }
        if let Some(v) = self.concurrency.take() {
            note("concurrency", delivery.concurrency != defaults.concurrency);
            delivery.concurrency = v;
        }
        (warnings, errors)
    }
}

/// Checks a sink's delivery section.
pub(super) fn check_delivery(path: &FieldPath, d: &DeliveryConfig, out: &mut Vec<Problem>) {
    check_retry(&path.key("retry"), &d.retry, out);
    check_status(&path.key("status"), &d.status, out);
    check_circuit_breaker(&path.key("circuit_breaker"), &d.circuit_breaker, out);
    check_rate_limit(&path.key("rate_limit"), &d.rate_limit, out);
    check_concurrency(&path.key("concurrency"), d.concurrency, out);
}

/// Default wait before the first retry of a batch (before jitter).
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_millis(500);

/// Default growth of the wait from one retry to the next.
pub const DEFAULT_RETRY_MULTIPLIER: f64 = 2.0;

/// Default longest wait between two attempts (before jitter).
pub const DEFAULT_RETRY_MAX_DELAY: Duration = Duration::from_secs(60);

/// Default attempts per batch before it goes to dead letters; 0 means no
/// limit.
pub const DEFAULT_RETRY_MAX_ATTEMPTS: u32 = 0;

/// Default time after a batch's first attempt when it goes to dead letters;
/// 0s means never.
pub const DEFAULT_RETRY_GIVE_UP_AFTER: Duration = Duration::from_secs(0);

/// Default share of failed requests in the window that opens the breaker.
pub const DEFAULT_BREAKER_FAILURE_RATIO: f64 = 0.5;

/// Default requests the window must hold before the breaker may open.
pub const DEFAULT_BREAKER_MIN_REQUESTS: u32 = 10;

/// Default length of the breaker's rolling window.
pub const DEFAULT_BREAKER_WINDOW: Duration = Duration::from_secs(30);

/// Default time an open breaker stays open before probing.
pub const DEFAULT_BREAKER_OPEN_FOR: Duration = Duration::from_secs(30);

/// Default concurrent probe requests of a half-open breaker.
pub const DEFAULT_BREAKER_HALF_OPEN_PROBES: u32 = 1;

/// Default requests in flight per sink.
pub const DEFAULT_CONCURRENCY: u32 = 1;

/// Default lower bound of adaptive concurrency.
pub const DEFAULT_ADAPTIVE_MIN: u32 = 1;

/// Default upper bound of adaptive concurrency.
pub const DEFAULT_ADAPTIVE_MAX: u32 = 32;

/// Backoff between attempts of a batch that failed temporarily: the wait
/// before retry `n` is random between 0 and
/// `min(max_delay, initial × multiplier^n)` ("full jitter", so many
/// senders do not retry in step), and never shorter than a `Retry-After`
/// the receiver sent.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Longest wait before the first retry (default `"500ms"`).
    #[serde(default = "default_retry_initial")]
    #[schemars(extend("default" = DEFAULT_RETRY_INITIAL))]
    pub initial: Duration,
    /// Growth of the longest wait from one retry to the next, 1 or more
    /// (default 2).
    #[serde(default = "default_retry_multiplier")]
    #[schemars(extend("default" = DEFAULT_RETRY_MULTIPLIER))]
    pub multiplier: f64,
    /// Upper bound of the wait between two attempts (default `"60s"`; also
    /// accepted as `max`).
    #[serde(default = "default_retry_max_delay", alias = "max")]
    #[schemars(extend("default" = DEFAULT_RETRY_MAX_DELAY))]
    pub max_delay: Duration,
    /// Attempts of one batch, the first included, before delivery gives up
    /// on it for now (default 0: no limit). The batch stays in the buffer:
    /// `caudal once` fails, the daemon pauses and tries again.
    #[serde(default)]
    #[schemars(extend("default" = DEFAULT_RETRY_MAX_ATTEMPTS))]
    pub max_attempts: u32,
    /// Time after a batch's first attempt when delivery gives up on it for
    /// now, as with `max_attempts` (default `"0s"`: never).
    #[serde(default = "default_retry_give_up_after")]
    #[schemars(extend("default" = DEFAULT_RETRY_GIVE_UP_AFTER))]
    pub give_up_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial: DEFAULT_RETRY_INITIAL,
            multiplier: DEFAULT_RETRY_MULTIPLIER,
            max_delay: DEFAULT_RETRY_MAX_DELAY,
            max_attempts: DEFAULT_RETRY_MAX_ATTEMPTS,
            give_up_after: DEFAULT_RETRY_GIVE_UP_AFTER,
        }
    }
}

fn default_retry_initial() -> Duration {
    DEFAULT_RETRY_INITIAL
}

fn default_retry_multiplier() -> f64 {
    DEFAULT_RETRY_MULTIPLIER
}

fn default_retry_max_delay() -> Duration {
    DEFAULT_RETRY_MAX_DELAY
}

fn default_retry_give_up_after() -> Duration {
    DEFAULT_RETRY_GIVE_UP_AFTER
}

/// Response statuses that override the defaults. By default 2xx is
/// success; 408, 429 and 5xx except 501 are retried later; 413 splits the
/// batch in two (a single record that is still too large goes to dead
/// letters); every other status rejects the batch to dead letters. A code
/// may appear in one list only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Codes that also mean success, e.g. `[409]` for a receiver that
    /// answers 409 to a duplicate it already has.
    #[serde(default)]
    pub success: Vec<u16>,
    /// Codes to retry later, e.g. `[425]`.
    #[serde(default)]
    pub retry: Vec<u16>,
    /// Codes that reject the batch to dead letters, e.g. `[503]` for a
    /// receiver that uses it for permanent refusals.
    #[serde(default)]
    pub reject: Vec<u16>,
    /// Codes meaning "too large": the batch is split in two and each half
    /// sent again (413 always does this unless listed elsewhere).
    #[serde(default)]
    pub split: Vec<u16>,
}

/// A circuit breaker per sink: when, within the rolling `window`, at least
/// `min_requests` requests were made and the share of them that failed
/// temporarily (5xx, 429, timeouts, connection errors; not rejections) is
/// `failure_ratio` or more, the breaker opens and nothing is sent for
/// `open_for`. Then `half_open_probes` requests test the receiver: a
/// success closes the breaker, a failure opens it again.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// `false` turns the breaker off (default `true`).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Share of failed requests that opens the breaker, above 0 and at
    /// most 1 (default 0.5).
    #[serde(default = "default_breaker_failure_ratio")]
    #[schemars(extend("default" = DEFAULT_BREAKER_FAILURE_RATIO))]
    pub failure_ratio: f64,
    /// Requests the window must hold before the breaker may open
    /// (default 10).
    #[serde(default = "default_breaker_min_requests")]
    #[schemars(extend("default" = DEFAULT_BREAKER_MIN_REQUESTS))]
    pub min_requests: u32,
    /// Length of the rolling window of recent requests (default `"30s"`).
    #[serde(default = "default_breaker_window")]
    #[schemars(extend("default" = DEFAULT_BREAKER_WINDOW))]
    pub window: Duration,
    /// How long the breaker stays open before probing (default `"30s"`).
    #[serde(default = "default_breaker_open_for")]
    #[schemars(extend("default" = DEFAULT_BREAKER_OPEN_FOR))]
    pub open_for: Duration,
    /// Probe requests allowed at once while half-open (default 1).
    #[serde(default = "default_breaker_half_open_probes")]
    #[schemars(extend("default" = DEFAULT_BREAKER_HALF_OPEN_PROBES))]
    pub half_open_probes: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_ratio: DEFAULT_BREAKER_FAILURE_RATIO,
            min_requests: DEFAULT_BREAKER_MIN_REQUESTS,
            window: DEFAULT_BREAKER_WINDOW,
            open_for: DEFAULT_BREAKER_OPEN_FOR,
            half_open_probes: DEFAULT_BREAKER_HALF_OPEN_PROBES,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_breaker_failure_ratio() -> f64 {
    DEFAULT_BREAKER_FAILURE_RATIO
}

fn default_breaker_min_requests() -> u32 {
    DEFAULT_BREAKER_MIN_REQUESTS
}

fn default_breaker_window() -> Duration {
    DEFAULT_BREAKER_WINDOW
}

fn default_breaker_open_for() -> Duration {
    DEFAULT_BREAKER_OPEN_FOR
}

fn default_breaker_half_open_probes() -> u32 {
    DEFAULT_BREAKER_HALF_OPEN_PROBES
}

/// Caps on the pace of a sink; each is off when left out. Short bursts of
/// up to one second's worth are allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per second, e.g. `10` or `0.5` (one every two seconds).
    #[serde(default)]
    pub requests_per_second: Option<f64>,
    /// Records per second, across all requests.
    #[serde(default)]
    pub records_per_second: Option<f64>,
}

/// How many requests a sink keeps in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConcurrencyConfig {
    /// Exactly this many (1 or more).
    Fixed(u32),
    /// Adjusted between `min` and `max` by how the receiver copes: one
    /// more after a round of quick successes, half as many on 429, 503 or
    /// a sharp rise in latency.
    Adaptive { min: u32, max: u32 },
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        Self::Fixed(DEFAULT_CONCURRENCY)
    }
}

/// The bounds of adaptive concurrency, as written in
/// `concurrency = { adaptive = { min = 1, max = 32 } }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConcurrencyConfig {
    /// Fewest requests in flight, and where it starts (default 1).
    #[serde(default = "default_adaptive_min")]
    #[schemars(extend("default" = DEFAULT_ADAPTIVE_MIN))]
    pub min: u32,
    /// Most requests in flight (default 32).
    #[serde(default = "default_adaptive_max")]
    #[schemars(extend("default" = DEFAULT_ADAPTIVE_MAX))]
    pub max: u32,
}

impl Default for AdaptiveConcurrencyConfig {
    fn default() -> Self {
        Self {
            min: DEFAULT_ADAPTIVE_MIN,
            max: DEFAULT_ADAPTIVE_MAX,
        }
    }
}

fn default_adaptive_min() -> u32 {
    DEFAULT_ADAPTIVE_MIN
}

fn default_adaptive_max() -> u32 {
    DEFAULT_ADAPTIVE_MAX
}

/// The word that selects adaptive concurrency with default bounds.
const ADAPTIVE: &str = "adaptive";

/// Written as a number, `"adaptive"`, or `{ adaptive = { ... } }`. A
/// hand-written visitor (not `#[serde(untagged)]`) so errors inside the
/// table keep their field path and say what was expected.
impl<'de> Deserialize<'de> for ConcurrencyConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ConcurrencyConfig;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a number of requests (1 or more), \"adaptive\", or a table whose \
                     \"adaptive\" entry holds min and max",
                )
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
                u32::try_from(n).map(ConcurrencyConfig::Fixed).map_err(|_| {
                    E::invalid_value(serde::de::Unexpected::Unsigned(n), &"at most 4294967295")
                })
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(n), &self)),
                }
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                if s == ADAPTIVE {
                    let AdaptiveConcurrencyConfig { min, max } = Default::default();
                    return Ok(ConcurrencyConfig::Adaptive { min, max });
                }
                Err(E::invalid_value(serde::de::Unexpected::Str(s), &self))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                // A field identifier, like derived structs use, so an
                // unknown key is reported at its own path.
                #[derive(Deserialize)]
                #[serde(field_identifier, rename_all = "snake_case")]
                enum Key {
                    Adaptive,
                }

                let mut bounds: Option<AdaptiveConcurrencyConfig> = None;
                while let Some(Key::Adaptive) = map.next_key::<Key>()? {
                    if bounds.is_some() {
                        return Err(serde::de::Error::duplicate_field(ADAPTIVE));
                    }
                    bounds = Some(map.next_value()?);
                }
                let AdaptiveConcurrencyConfig { min, max } =
                    bounds.ok_or_else(|| serde::de::Error::missing_field(ADAPTIVE))?;
                Ok(ConcurrencyConfig::Adaptive { min, max })
            }
        }

        d.deserialize_any(Visitor)
    }
}

impl Serialize for ConcurrencyConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Self::Fixed(n) => s.serialize_u32(n),
            Self::Adaptive { min, max } => {
                use serde::ser::SerializeMap;
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry(ADAPTIVE, &AdaptiveConcurrencyConfig { min, max })?;
                map.end()
            }
        }
    }
}

impl JsonSchema for ConcurrencyConfig {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ConcurrencyConfig".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let bounds = generator.subschema_for::<AdaptiveConcurrencyConfig>();
        schemars::json_schema!({
            "description": "Requests in flight: a number (default 1), \"adaptive\" (between 1 and 32), or { adaptive = { min, max } }.",
            "default": DEFAULT_CONCURRENCY,
            "oneOf": [
                { "type": "integer", "minimum": 1, "description": "Exactly this many requests in flight." },
                { "const": ADAPTIVE, "description": "Adaptive, between 1 and 32 requests in flight." },
                {
                    "type": "object",
                    "properties": { "adaptive": bounds },
                    "required": [ADAPTIVE],
                    "additionalProperties": false,
                    "description": "Adaptive, between min and max requests in flight.",
                },
            ],
        })
    }
}

fn check_retry(path: &FieldPath, retry: &RetryConfig, out: &mut Vec<Problem>) {
    if retry.initial.as_std().is_zero() {
        out.push(Problem::at(path.key("initial"), "must be greater than 0s"));
    } else if retry.initial > retry.max_delay && !retry.max_delay.as_std().is_zero() {
        out.push(Problem::at(
            path.key("initial"),
            format!("must not exceed max_delay ({})", retry.max_delay),
        ));
    }
    if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
        out.push(Problem::at(
            path.key("multiplier"),
            "must be 1 or more (1 keeps the longest wait the same for every retry)",
        ));
    }
    if retry.max_delay.as_std().is_zero() {
        out.push(Problem::at(
            path.key("max_delay"),
            "must be greater than 0s",
        ));
    }
}

/// The names of the status lists, in the order they are checked.
const STATUS_LISTS: [&str; 4] = ["success", "retry", "reject", "split"];

fn check_status(path: &FieldPath, status: &StatusConfig, out: &mut Vec<Problem>) {
    let lists: [&[u16]; 4] = [
        &status.success,
        &status.retry,
        &status.reject,
        &status.split,
    ];
    let mut seen: BTreeMap<u16, &str> = BTreeMap::new();
    for (name, codes) in STATUS_LISTS.into_iter().zip(lists) {
        for (i, &code) in codes.iter().enumerate() {
            let at = path.key(name).index(i);
            if !(100..=599).contains(&code) {
                out.push(Problem::at(
                    at,
                    format!("{code} is not an HTTP status; use a code from 100 to 599"),
                ));
            } else if let Some(first) = seen.insert(code, name) {
                let message = if first == name {
                    format!("{code} is listed twice")
                } else {
                    format!("{code} is already listed in \"{first}\"; a code belongs to one list")
                };
                out.push(Problem::at(at, message));
            }
        }
    }
}

fn check_circuit_breaker(path: &FieldPath, breaker: &CircuitBreakerConfig, out: &mut Vec<Problem>) {
    let ratio = breaker.failure_ratio;
    if !(ratio > 0.0 && ratio <= 1.0) {
        out.push(Problem::at(
            path.key("failure_ratio"),
            "must be above 0 and at most 1, e.g. 0.5 for half of the requests",
        ));
    }
    for (name, value) in [
        ("min_requests", breaker.min_requests),
        ("half_open_probes", breaker.half_open_probes),
    ] {
        if value == 0 {
            out.push(Problem::at(path.key(name), "must be 1 or more"));
        }
    }
    for (name, value) in [("window", breaker.window), ("open_for", breaker.open_for)] {
        if value.as_std().is_zero() {
            out.push(Problem::at(path.key(name), "must be greater than 0s"));
        }
    }
}

fn check_rate_limit(path: &FieldPath, limit: &RateLimitConfig, out: &mut Vec<Problem>) {
    for (name, value) in [
        ("requests_per_second", limit.requests_per_second),
        ("records_per_second", limit.records_per_second),
    ] {
        if let Some(rate) = value
            && !(rate.is_finite() && rate > 0.0)
        {
            out.push(Problem::at(
                path.key(name),
                "must be greater than 0; leave it out for no limit",
            ));
        }
    }
}

fn check_concurrency(path: &FieldPath, concurrency: ConcurrencyConfig, out: &mut Vec<Problem>) {
    match concurrency {
        ConcurrencyConfig::Fixed(0) => out.push(Problem::at(path.clone(), "must be 1 or more")),
        ConcurrencyConfig::Fixed(_) => {}
        ConcurrencyConfig::Adaptive { min, max } => {
            let path = path.key("adaptive");
            if min == 0 {
                out.push(Problem::at(path.key("min"), "must be 1 or more"));
            }
            if max < min {
                out.push(Problem::at(
                    path.key("max"),
                    format!("must be at least min ({min})"),
                ));
            }
        }
    }
}

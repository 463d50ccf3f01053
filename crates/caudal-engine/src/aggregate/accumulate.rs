//! The figures of one window and group, kept so that a row can be added
//! and taken back (a CDC update retracts its old row): no accumulator here
//! forgets what it needs to undo an addition.
//!
//! - `count`, `count(f)`: net counts.
//! - `sum`, `avg`: exact decimals (the values' own digits, up to 28
//!   decimals; past `i128` they fall back to floating point, said by
//!   [`Total::exact`]).
//! - `min`, `max`: a multiset of values with their counts, so removing the
//!   current minimum finds the next one.
//! - `count_distinct`: a count per 64-bit hash of each value: exact up to
//!   hash collisions (about n²/2⁶⁵ for n values), and retractable, which a
//!   HyperLogLog is not.
//! - `quantile`: a DDSketch-style sketch of logarithmic buckets with counts
//!   (retractable): the value returned is within the relative error `α` of
//!   a value of the requested rank, `percentile_disc`'s rank.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use caudal_core::config::{Metric, MetricKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An exact decimal: `mantissa × 10^-scale`, normalised (no trailing zero
/// digit in the mantissa when the scale is above 0), so equal values are
/// equal here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dec {
    mantissa: i128,
    scale: u32,
}

const MAX_SCALE: u32 = 28;

impl Dec {
    pub const ZERO: Self = Self {
        mantissa: 0,
        scale: 0,
    };

    fn new(mut mantissa: i128, mut scale: u32) -> Self {
        while scale > 0 && mantissa % 10 == 0 {
            mantissa /= 10;
            scale -= 1;
        }
        if mantissa == 0 {
            scale = 0;
        }
        Self { mantissa, scale }
    }

    /// Parses decimal text: `-12.50`, `3`, `1e-7`, `2.5E3`.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let (number, exponent) = match text.find(['e', 'E']) {
            Some(i) => (&text[..i], text[i + 1..].parse::<i32>().ok()?),
            None => (text, 0),
        };
        let (negative, digits) = match number.as_bytes().first()? {
            b'-' => (true, &number[1..]),
            b'+' => (false, &number[1..]),
            _ => (false, number),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let mut mantissa: i128 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            if !b.is_ascii_digit() {
                return None;
            }
            mantissa = mantissa
                .checked_mul(10)?
                .checked_add(i128::from(b - b'0'))?;
        }
        let mut scale = i64::try_from(frac.len()).ok()? - i64::from(exponent);
        while scale < 0 {
            mantissa = mantissa.checked_mul(10)?;
            scale += 1;
        }
        let mut scale = u32::try_from(scale).ok()?;
        // Trailing zeros past the largest scale are dropped; other digits
        // there cannot be kept exactly.
        while scale > MAX_SCALE {
            if mantissa % 10 != 0 {
                return None;
            }
            mantissa /= 10;
            scale -= 1;
        }
        if negative {
            mantissa = -mantissa;
        }
        Some(Self::new(mantissa, scale))
    }

    /// A JSON value as a decimal: a number, or a string holding one (how
    /// `numeric` columns arrive).
    pub fn of(value: &Value) -> Option<Self> {
        match value {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Some(Self::new(i128::from(i), 0))
                } else if let Some(u) = n.as_u64() {
                    Some(Self::new(i128::from(u), 0))
                } else {
                    // The shortest text that reads back as the same
                    // double: the digits the source wrote.
                    Self::parse(&n.as_f64()?.to_string())
                }
            }
            Value::String(s) => Self::parse(s),
            _ => None,
        }
    }

    fn rescaled(self, scale: u32) -> Option<i128> {
        let by = 10i128.checked_pow(scale.checked_sub(self.scale)?)?;
        self.mantissa.checked_mul(by)
    }

    pub fn checked_add(self, other: Self) -> Option<Self> {
        let scale = self.scale.max(other.scale);
        let sum = self.rescaled(scale)?.checked_add(other.rescaled(scale)?)?;
        Some(Self::new(sum, scale))
    }

    pub fn negated(self) -> Self {
        Self {
            mantissa: -self.mantissa,
            scale: self.scale,
        }
    }

    pub fn to_f64(self) -> f64 {
        self.to_string().parse().unwrap_or(f64::NAN)
    }
}

impl Ord for Dec {
    fn cmp(&self, other: &Self) -> Ordering {
        let scale = self.scale.max(other.scale);
        match (self.rescaled(scale), other.rescaled(scale)) {
            (Some(a), Some(b)) => a.cmp(&b),
            _ => self.to_f64().total_cmp(&other.to_f64()),
        }
    }
}

impl PartialOrd for Dec {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for Dec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digits = self.mantissa.unsigned_abs().to_string();
        let sign = if self.mantissa < 0 { "-" } else { "" };
        let scale = self.scale as usize;
        if scale == 0 {
            return write!(f, "{sign}{digits}");
        }
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (int, frac) = padded.split_at(padded.len() - scale);
        write!(f, "{sign}{int}.{frac}")
    }
}

impl Serialize for Dec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).ok_or_else(|| serde::de::Error::custom("not a decimal"))
    }
}

/// A value `min` and `max` order: numbers (as decimals) before text.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Ordered {
    Num(Dec),
    Text(String),
}

impl Ordered {
    fn of(value: &Value) -> Option<Self> {
        match value {
            Value::Null => None,
            Value::Number(_) => Dec::of(value).map(Self::Num),
            Value::String(s) => {
                Some(Dec::parse(s).map_or_else(|| Self::Text(s.clone()), Self::Num))
            }
            other => Some(Self::Text(other.to_string())),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::Num(d) => number(*d),
            Self::Text(s) => Value::String(s.clone()),
        }
    }
}

/// A decimal as a JSON number (the nearest double; the digits of a value
/// of up to 15 significant digits print as they are).
fn number(d: Dec) -> Value {
    if d.scale == 0
        && let Ok(i) = i64::try_from(d.mantissa)
    {
        return Value::from(i);
    }
    serde_json::Number::from_f64(d.to_f64()).map_or(Value::Null, Value::Number)
}

/// A sum that stays exact while it can.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Total {
    /// The exact sum, `None` once it could not be kept exactly.
    pub exact: Option<Dec>,
    /// The same sum in floating point (used once `exact` is gone).
    pub float: f64,
    /// Values summed (net).
    pub n: i64,
}

impl Total {
    fn new() -> Self {
        Self {
            exact: Some(Dec::ZERO),
            float: 0.0,
            n: 0,
        }
    }

    fn add(&mut self, value: Dec, sign: i64) {
        let signed = if sign < 0 { value.negated() } else { value };
        self.exact = self.exact.and_then(|e| e.checked_add(signed));
        self.float += signed.to_f64();
        self.n += sign;
    }

    fn value(&self) -> Value {
        match self.exact {
            Some(d) => number(d),
            None => serde_json::Number::from_f64(self.float).map_or(Value::Null, Value::Number),
        }
    }
}

/// A retractable quantile sketch: counts per logarithmic bucket
/// (`γ = (1+α)/(1-α)`), for positive and negative values, and zeros.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sketch {
    #[serde(with = "pairs")]
    positive: BTreeMap<i32, i64>,
    #[serde(with = "pairs")]
    negative: BTreeMap<i32, i64>,
    zero: i64,
}

impl Sketch {
    fn new() -> Self {
        Self {
            positive: BTreeMap::new(),
            negative: BTreeMap::new(),
            zero: 0,
        }
    }

    fn index(ln_gamma: f64, magnitude: f64) -> i32 {
        // Clamped: bucket indices of finite doubles fit easily.
        (magnitude.ln() / ln_gamma).ceil().clamp(-1e6, 1e6) as i32
    }

    fn add(&mut self, ln_gamma: f64, x: f64, sign: i64) {
        if !x.is_finite() {
            return;
        }
        let (store, index) = if x > 0.0 {
            (&mut self.positive, Self::index(ln_gamma, x))
        } else if x < 0.0 {
            (&mut self.negative, Self::index(ln_gamma, -x))
        } else {
            self.zero += sign;
            return;
        };
        let count = store.entry(index).or_default();
        *count += sign;
        if *count == 0 {
            store.remove(&index);
        }
    }

    /// The value of rank `ceil(q × n)` (at least 1), within the relative
    /// error; `None` when the sketch holds no value.
    fn quantile(&self, ln_gamma: f64, q: f64) -> Option<f64> {
        let count = |c: &i64| (*c).max(0);
        let n: i64 = self.positive.values().map(count).sum::<i64>()
            + self.negative.values().map(count).sum::<i64>()
            + self.zero.max(0);
        if n <= 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as i64).clamp(1, n);
        let gamma = ln_gamma.exp();
        let estimate = |i: i32| 2.0 * gamma.powi(i) / (gamma + 1.0);
        let mut seen = 0;
        for (&i, c) in self.negative.iter().rev() {
            seen += count(c);
            if seen >= rank {
                return Some(-estimate(i));
            }
        }
        seen += self.zero.max(0);
        if seen >= rank {
            return Some(0.0);
        }
        for (&i, c) in &self.positive {
            seen += count(c);
            if seen >= rank {
                return Some(estimate(i));
            }
        }
        None
    }
}

/// One metric's accumulator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Acc {
    Count(i64),
    Total(Total),
    Extremes(#[serde(with = "pairs")] BTreeMap<Ordered, i64>),
    Distinct(#[serde(with = "pairs")] HashMap<u64, i64>),
    Sketch(Sketch),
}

impl Acc {
    pub fn new(metric: &Metric) -> Self {
        match metric.kind {
            MetricKind::Count | MetricKind::CountField => Self::Count(0),
            MetricKind::Sum | MetricKind::Avg => Self::Total(Total::new()),
            MetricKind::Min | MetricKind::Max => Self::Extremes(BTreeMap::new()),
            MetricKind::CountDistinct => Self::Distinct(HashMap::new()),
            MetricKind::Quantile(_) => Self::Sketch(Sketch::new()),
        }
    }

    /// Adds (`sign` 1) or takes back (`sign` -1) one row's value (`None`
    /// for `count`). Returns false when the value cannot be counted by
    /// this metric (text summed): the row is still counted by the others.
    pub fn apply(
        &mut self,
        metric: &Metric,
        ln_gamma: f64,
        value: Option<&Value>,
        sign: i64,
    ) -> bool {
        let value = match (metric.kind == MetricKind::Count, value) {
            (true, _) => {
                if let Self::Count(n) = self {
                    *n += sign;
                }
                return true;
            }
            (false, None | Some(Value::Null)) => return true,
            (false, Some(v)) => v,
        };
        match self {
            Self::Count(n) => *n += sign,
            Self::Total(t) => match Dec::of(value) {
                Some(d) => t.add(d, sign),
                None => return false,
            },
            Self::Extremes(values) => {
                let Some(key) = Ordered::of(value) else {
                    return true;
                };
                let c = values.entry(key.clone()).or_default();
                *c += sign;
                if *c == 0 {
                    values.remove(&key);
                }
            }
            Self::Distinct(hashes) => {
                let h = hash(value);
                let c = hashes.entry(h).or_default();
                *c += sign;
                if *c == 0 {
                    hashes.remove(&h);
                }
            }
            Self::Sketch(s) => match Dec::of(value) {
                Some(d) => s.add(ln_gamma, d.to_f64(), sign),
                None => return false,
            },
        }
        true
    }

    /// The metric's figure.
    pub fn figure(&self, metric: &Metric, ln_gamma: f64) -> Value {
        match (self, &metric.kind) {
            (Self::Count(n), _) => Value::from(*n),
            (Self::Total(t), MetricKind::Avg) => {
                if t.n <= 0 {
                    return Value::Null;
                }
                let sum = t.exact.map_or(t.float, Dec::to_f64);
                serde_json::Number::from_f64(sum / t.n as f64).map_or(Value::Null, Value::Number)
            }
            (Self::Total(t), _) => {
                if t.n <= 0 && t.exact == Some(Dec::ZERO) {
                    Value::Null
                } else {
                    t.value()
                }
            }
            (Self::Extremes(values), MetricKind::Max) => values
                .iter()
                .rev()
                .find(|(_, c)| **c > 0)
                .map_or(Value::Null, |(v, _)| v.to_json()),
            (Self::Extremes(values), _) => values
                .iter()
                .find(|(_, c)| **c > 0)
                .map_or(Value::Null, |(v, _)| v.to_json()),
            (Self::Distinct(hashes), _) => Value::from(hashes.values().filter(|c| **c > 0).count()),
            (Self::Sketch(s), MetricKind::Quantile(q)) => s
                .quantile(ln_gamma, *q)
                .and_then(serde_json::Number::from_f64)
                .map_or(Value::Null, Value::Number),
            (Self::Sketch(_), _) => Value::Null,
        }
    }
}

/// A stable 64-bit hash of a value's canonical text (numbers by their
/// decimal value, so `1` and `1.0` are one value): the first 8 bytes of its
/// SHA-256, the same in every version, as the stored state needs.
fn hash(value: &Value) -> u64 {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    match Dec::of(value).filter(|_| value.is_number()) {
        Some(d) => {
            h.update([0u8]);
            h.update(d.to_string().as_bytes());
        }
        None => {
            h.update([1u8]);
            match value {
                Value::String(s) => h.update(s.as_bytes()),
                other => h.update(other.to_string().as_bytes()),
            }
        }
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// Maps kept as lists of pairs in JSON (their keys are not strings).
mod pairs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<'a, M, K, V, S>(map: &'a M, s: S) -> Result<S::Ok, S::Error>
    where
        &'a M: IntoIterator<Item = (&'a K, &'a V)>,
        K: Serialize + 'a,
        V: Serialize + 'a,
        S: Serializer,
    {
        s.collect_seq(map)
    }

    pub fn deserialize<'de, M, K, V, D>(d: D) -> Result<M, D::Error>
    where
        M: FromIterator<(K, V)>,
        K: Deserialize<'de>,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metric(spec: &str) -> Metric {
        Metric::parse(spec).unwrap()
    }

    #[test]
    fn decimals_parse_add_and_print_exactly() {
        let d = |s| Dec::parse(s).unwrap();
        assert_eq!(d("12.50").to_string(), "12.5");
        assert_eq!(d("-0.07").to_string(), "-0.07");
        assert_eq!(d("1e-7").to_string(), "0.0000001");
        assert_eq!(d("2.5E3").to_string(), "2500");
        assert_eq!(d("0.1").checked_add(d("0.2")).unwrap(), d("0.3"));
        assert_eq!(Dec::of(&json!(0.1)).unwrap(), d("0.1"));
        assert_eq!(
            Dec::of(&json!("123456789012345678.99"))
                .unwrap()
                .to_string(),
            "123456789012345678.99"
        );
        assert!(
            Dec::parse("abc").is_none() && Dec::parse("").is_none() && Dec::parse("-").is_none()
        );
        assert!(d("2") > d("1.99") && d("-3") < d("0"));
    }

    #[test]
    fn sums_and_extremes_take_rows_back() {
        let (sum, max) = (metric("sum(a)"), metric("max(a)"));
        let mut s = Acc::new(&sum);
        let mut m = Acc::new(&max);
        for v in ["10.10", "20.20", "5"] {
            s.apply(&sum, 0.0, Some(&json!(v)), 1);
            m.apply(&max, 0.0, Some(&json!(v)), 1);
        }
        s.apply(&sum, 0.0, Some(&json!("20.20")), -1);
        m.apply(&max, 0.0, Some(&json!("20.20")), -1);
        assert_eq!(s.figure(&sum, 0.0), json!(15.1));
        assert_eq!(m.figure(&max, 0.0), json!(10.1));
        assert!(!s.apply(&sum, 0.0, Some(&json!("ten")), 1));
    }

    #[test]
    fn distinct_counts_values_not_spellings_and_forgets_the_last_one() {
        let dc = metric("count_distinct(c)");
        let mut a = Acc::new(&dc);
        for v in [json!(1), json!(1.0), json!("x"), json!("x"), json!(2)] {
            a.apply(&dc, 0.0, Some(&v), 1);
        }
        assert_eq!(a.figure(&dc, 0.0), json!(3));
        a.apply(&dc, 0.0, Some(&json!(2)), -1);
        assert_eq!(a.figure(&dc, 0.0), json!(2));
    }

    #[test]
    fn quantiles_are_within_the_relative_error_after_retractions() {
        let alpha: f64 = 0.01;
        let ln_gamma: f64 = ((1.0 + alpha) / (1.0 - alpha)).ln();
        let p95 = metric("quantile(a, 0.95)");
        let mut a = Acc::new(&p95);
        let mut kept = Vec::new();
        for i in 1..=2000 {
            let v = f64::from(i) * 0.37;
            a.apply(&p95, ln_gamma, Some(&json!(v)), 1);
            if i % 3 == 0 {
                a.apply(&p95, ln_gamma, Some(&json!(v)), -1);
            } else {
                kept.push(v);
            }
        }
        kept.sort_by(f64::total_cmp);
        let rank = ((0.95 * kept.len() as f64).ceil() as usize).max(1);
        let truth = kept[rank - 1];
        let got = a.figure(&p95, ln_gamma).as_f64().unwrap();
        assert!((got - truth).abs() <= alpha * truth, "{got} vs {truth}");
    }

    #[test]
    fn state_survives_json() {
        let dc = metric("count_distinct(c)");
        let mut a = Acc::new(&dc);
        a.apply(&dc, 0.0, Some(&json!("k")), 1);
        let text = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Acc>(&text).unwrap(), a);
    }
}

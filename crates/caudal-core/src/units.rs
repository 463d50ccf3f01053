//! Durations and byte sizes written as strings in configuration files
//! (`"90s"`, `"1h30m"`, `"64MiB"`), with a schema for editors.

use std::fmt;
use std::str::FromStr;
use std::time::Duration as StdDuration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A span of time written as a string: a sequence of `<number><unit>` with
/// units `ms`, `s`, `m`, `h`, `d` (e.g. `"500ms"`, `"90s"`, `"1h30m"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub const fn from_secs(s: u64) -> Self {
        Self(StdDuration::from_secs(s))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Self(StdDuration::from_millis(ms))
    }
    pub fn as_std(self) -> StdDuration {
        self.0
    }
}

impl From<Duration> for StdDuration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text.is_empty() {
            return Err("empty duration; write e.g. \"90s\", \"5m\" or \"1h\"".into());
        }
        if text == "0" {
            return Ok(Self(StdDuration::ZERO));
        }
        let mut total = StdDuration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(format!(
                    "invalid duration {s:?}: expected a number before {rest:?} (units: ms, s, m, h, d)"
                ));
            }
            let n: u64 = rest[..digits]
                .parse()
                .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let part = match unit {
                "ms" => StdDuration::from_millis(n),
                "s" => StdDuration::from_secs(n),
                "m" => StdDuration::from_secs(n.saturating_mul(60)),
                "h" => StdDuration::from_secs(n.saturating_mul(3600)),
                "d" => StdDuration::from_secs(n.saturating_mul(86_400)),
                "" => {
                    return Err(format!(
                        "invalid duration {s:?}: missing unit after {n} (units: ms, s, m, h, d)"
                    ));
                }
                other => {
                    return Err(format!(
                        "invalid duration {s:?}: unknown unit {other:?} (units: ms, s, m, h, d)"
                    ));
                }
            };
            total = total.saturating_add(part);
        }
        Ok(Self(total))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let mut secs = self.0.as_secs();
        for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
            if secs >= size {
                write!(f, "{}{unit}", secs / size)?;
                secs %= size;
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(ms|s|m|h|d))+$|^0$",
            "description": "A duration such as \"500ms\", \"90s\", \"5m\", \"1h30m\" or \"1d\".",
        })
    }
}

/// A number of bytes written as a string: `"512"`, `"64KiB"`, `"1MiB"`,
/// `"10MB"` (binary units are powers of 1024, decimal units powers of 1000).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        if digits == 0 {
            return Err(format!(
                "invalid size {s:?}: expected a number such as \"64KiB\" or \"1MiB\""
            ));
        }
        let n: u64 = text[..digits]
            .parse()
            .map_err(|_| format!("invalid size {s:?}: number too large"))?;
        let mult: u64 = match text[digits..].trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1000,
            "MB" => 1000_u64.pow(2),
            "GB" => 1000_u64.pow(3),
            "KiB" => 1024,
            "MiB" => 1024_u64.pow(2),
            "GiB" => 1024_u64.pow(3),
            other => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {other:?} (units: B, KB, MB, GB, KiB, MiB, GiB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Self)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^[0-9]+\\s*(B|KB|kB|MB|GB|KiB|MiB|GiB)?$",
            "description": "A size such as \"512KiB\", \"1MiB\" or \"10MB\".",
        })
    }
}

/// A configuration string that must never be shown: connection strings with
/// passwords, tokens in headers. `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret value itself; call only where it is handed to a client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl JsonSchema for Secret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A secret value; write it as ${ENV_VAR} to keep it out of the file.",
        })
    }
}

/// Redacts the password of a URL such as `postgres://user:pw@host/db` for
/// display in logs, status output and errors.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let redacted = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!("{}://{}@{}", &url[..scheme_end], redacted, &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        let d: Duration = "1h30m".parse().unwrap();
        assert_eq!(d.0, StdDuration::from_secs(5400));
        assert_eq!(d.to_string(), "1h30m");
        assert_eq!("500ms".parse::<Duration>().unwrap().0.as_millis(), 500);
        assert_eq!("0".parse::<Duration>().unwrap().0, StdDuration::ZERO);
        assert!(
            "90".parse::<Duration>()
                .unwrap_err()
                .contains("missing unit")
        );
        assert!(
            "5x".parse::<Duration>()
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!("".parse::<Duration>().is_err());
        assert!("h".parse::<Duration>().is_err());
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("64MiB".parse::<ByteSize>().unwrap().0, 64 << 20);
        assert_eq!("10MB".parse::<ByteSize>().unwrap().0, 10_000_000);
        assert_eq!("512".parse::<ByteSize>().unwrap().0, 512);
        assert_eq!(ByteSize(1 << 20).to_string(), "1MiB");
        assert!("1XB".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("sqlite://caudal.db"), "sqlite://caudal.db");
        assert_eq!(
            redact_url("mysql://root@127.0.0.1/t"),
            "mysql://root@127.0.0.1/t"
        );
    }
}

//! Field paths (`pipelines.sync.schedule.every`, `sources.db.cursor[1]`) and
//! the problems attached to them.
//!
//! Every stage of loading (interpolation, deserialization, validation)
//! reports a [`Problem`] against a [`FieldPath`]; the loader turns the path
//! into a file location at the end. Paths are compared as segments, never as
//! strings, so a name containing a dot cannot be confused with two keys.

use std::fmt;

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Segment {
    /// A table key or struct field.
    Key(String),
    /// An array element.
    Index(usize),
}

/// Where a value sits in the configuration, from the top-level table.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct FieldPath(Vec<Segment>);

impl FieldPath {
    /// The top-level table.
    pub(crate) fn root() -> Self {
        Self::default()
    }

    /// This path extended by a key.
    pub(crate) fn key(&self, key: impl Into<String>) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Key(key.into()));
        next
    }

    /// This path extended by an array index.
    pub(crate) fn index(&self, index: usize) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Index(index));
        next
    }

    /// This path followed by `other`.
    pub(crate) fn join(&self, other: &FieldPath) -> Self {
        let mut next = self.clone();
        next.0.extend(other.0.iter().cloned());
        next
    }

    /// The path without its last segment (the root stays the root).
    pub(crate) fn parent(&self) -> Self {
        let mut parent = self.clone();
        parent.0.pop();
        parent
    }

    pub(crate) fn segments(&self) -> &[Segment] {
        &self.0
    }

    pub(crate) fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `self` is `other` or lies inside it.
    pub(crate) fn starts_with(&self, other: &FieldPath) -> bool {
        self.0.starts_with(&other.0)
    }

    /// Converts the path reported by `serde_path_to_error`.
    pub(crate) fn from_serde(path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment as S;
        let segments = path
            .iter()
            .map(|segment| match segment {
                S::Seq { index } => Segment::Index(*index),
                S::Map { key } => Segment::Key(key.clone()),
                S::Enum { variant } => Segment::Key(variant.clone()),
                S::Unknown => Segment::Key("?".into()),
            })
            .collect();
        Self(segments)
    }
}

/// Keys are written bare when they are plain identifiers and quoted
/// otherwise, so `headers."X.Trace"` stays readable and unambiguous.
impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    if is_bare_key(key) {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn is_bare_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Which part of an entry a problem points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Anchor {
    /// The value (most problems: a bad duration, an unknown sink name).
    Value,
    /// The key itself (an unknown field: the key is what is wrong).
    Key,
}

/// One problem found while loading, before it is given a file location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) path: FieldPath,
    pub(crate) anchor: Anchor,
    pub(crate) message: String,
}

impl Problem {
    /// A problem with the value at `path`.
    pub(crate) fn at(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            path,
            anchor: Anchor::Value,
            message: message.into(),
        }
    }

    /// A problem with the key at `path` (the last segment of the path).
    pub(crate) fn at_key(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            path,
            anchor: Anchor::Key,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_print_as_dotted_keys_with_indices() {
        let path = FieldPath::root()
            .key("sources")
            .key("db")
            .key("cursor")
            .index(1);
        assert_eq!(path.to_string(), "sources.db.cursor[1]");
        let quoted = FieldPath::root().key("headers").key("X.Trace");
        assert_eq!(quoted.to_string(), "headers.\"X.Trace\"");
        assert_eq!(FieldPath::root().to_string(), "");
    }

    #[test]
    fn prefixes_compare_by_segment() {
        let a = FieldPath::root().key("a.b");
        let b = FieldPath::root().key("a").key("b");
        assert!(!b.starts_with(&a));
        assert!(b.starts_with(&FieldPath::root().key("a")));
        assert_eq!(b.parent(), FieldPath::root().key("a"));
    }
}

//! A format-neutral document tree that remembers where every key and value
//! was written.
//!
//! TOML and YAML are both parsed into a [`Node`] first. Interpolation works
//! on this tree (so an environment value can never inject syntax), the model
//! is deserialized from its JSON form, and [`Positions`] maps any field path
//! back to a 1-based line and column (counted in characters) for errors.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::MessageFormatter as _;

use super::path::{Anchor, FieldPath};

/// A 1-based line and column, counted in characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub(crate) line: u32,
    pub(crate) column: u32,
}

impl Pos {
    const START: Pos = Pos { line: 1, column: 1 };
}

/// A value and where it starts.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Node {
    pub(crate) pos: Pos,
    pub(crate) kind: Kind,
}

/// What a value is. Numbers are kept as JSON numbers (always finite).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Kind {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Node>),
    Table(Vec<Entry>),
}

/// One key of a table, where the key was written, and its value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) key_pos: Pos,
    pub(crate) value: Node,
}

/// A document that could not be parsed at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub(crate) pos: Option<Pos>,
    pub(crate) message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Node {
    /// The JSON value the model is deserialized from.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.kind {
            Kind::Null => Value::Null,
            Kind::Bool(b) => Value::Bool(*b),
            Kind::Number(n) => Value::Number(n.clone()),
            Kind::String(s) => Value::String(s.clone()),
            Kind::Array(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Kind::Table(entries) => Value::Object(
                entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.to_json()))
                    .collect(),
            ),
        }
    }

    /// Where every key and value of the tree was written.
    pub(crate) fn positions(&self) -> Positions {
        let mut map = BTreeMap::new();
        collect_positions(self, FieldPath::root(), None, &mut map);
        Positions(map)
    }
}

fn collect_positions(
    node: &Node,
    path: FieldPath,
    key: Option<Pos>,
    out: &mut BTreeMap<FieldPath, Spot>,
) {
    match &node.kind {
        Kind::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                collect_positions(item, path.index(i), None, out);
            }
        }
        Kind::Table(entries) => {
            for entry in entries {
                collect_positions(
                    &entry.value,
                    path.key(entry.key.clone()),
                    Some(entry.key_pos),
                    out,
                );
            }
        }
        Kind::Null | Kind::Bool(_) | Kind::Number(_) | Kind::String(_) => {}
    }
    out.insert(
        path,
        Spot {
            key,
            value: node.pos,
        },
    );
}

/// Where a key and its value were written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Spot {
    key: Option<Pos>,
    value: Pos,
}

/// Field path → position index of a parsed document.
#[derive(Clone, Debug, Default)]
pub(crate) struct Positions(BTreeMap<FieldPath, Spot>);

impl Positions {
    /// The position for a problem at `path`. A path that is not in the file
    /// (a missing field, a default) falls back to its closest written
    /// ancestor, e.g. the table that lacks the field.
    pub(crate) fn locate(&self, path: &FieldPath, anchor: Anchor) -> Pos {
        if let Some(spot) = self.0.get(path) {
            return match anchor {
                Anchor::Key => spot.key.unwrap_or(spot.value),
                Anchor::Value => spot.value,
            };
        }
        let mut ancestor = path.clone();
        while !ancestor.is_root() {
            ancestor = ancestor.parent();
            if let Some(spot) = self.0.get(&ancestor) {
                return spot.value;
            }
        }
        Pos::START
    }
}

// ---------------------------------------------------------------- TOML

/// Parses TOML text into a tree.
pub(crate) fn parse_toml(text: &str) -> Result<Node, SyntaxError> {
    let lines = LineIndex::new(text);
    let table = toml::de::DeTable::parse(text).map_err(|e| {
        let span = e.span();
        let mut message = e.message().to_string();
        // "duplicate key" alone leaves the reader searching; name the key.
        if message == "duplicate key"
            && let Some(key) = span.clone().and_then(|s| text.get(s))
            && !key.is_empty()
        {
            message = format!("duplicate key {key}");
        }
        SyntaxError {
            pos: span.map(|s| lines.pos(s.start)),
            message,
        }
    })?;
    let pos = lines.pos(table.span().start);
    let entries = toml_entries(table.get_ref(), &lines)?;
    Ok(Node {
        pos,
        kind: Kind::Table(entries),
    })
}

fn toml_entries(
    table: &toml::de::DeTable<'_>,
    lines: &LineIndex<'_>,
) -> Result<Vec<Entry>, SyntaxError> {
    table
        .iter()
        .map(|(key, value)| {
            Ok(Entry {
                key: key.get_ref().to_string(),
                key_pos: lines.pos(key.span().start),
                value: toml_node(value, lines)?,
            })
        })
        .collect()
}

fn toml_node(
    value: &toml::Spanned<toml::de::DeValue<'_>>,
    lines: &LineIndex<'_>,
) -> Result<Node, SyntaxError> {
    use toml::de::DeValue;
    let pos = lines.pos(value.span().start);
    let kind = match value.get_ref() {
        DeValue::String(s) => Kind::String(s.to_string()),
        DeValue::Integer(i) => {
            let n = i64::from_str_radix(i.as_str(), i.radix()).map_err(|_| SyntaxError {
                pos: Some(pos),
                message: format!("integer {i} is out of range"),
            })?;
            Kind::Number(n.into())
        }
        DeValue::Float(f) => {
            let n = f
                .as_str()
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .ok_or_else(|| SyntaxError {
                    pos: Some(pos),
                    message: format!("{f}: inf and nan are not supported"),
                })?;
            Kind::Number(n)
        }
        DeValue::Boolean(b) => Kind::Bool(*b),
        // No field takes a TOML datetime; as a string it gets the field's
        // usual "expected ..." message instead of a special case.
        DeValue::Datetime(d) => Kind::String(d.to_string()),
        DeValue::Array(items) => Kind::Array(
            items
                .iter()
                .map(|item| toml_node(item, lines))
                .collect::<Result<_, _>>()?,
        ),
        DeValue::Table(table) => Kind::Table(toml_entries(table, lines)?),
    };
    Ok(Node { pos, kind })
}

/// Turns byte offsets into 1-based lines and character columns.
struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset where each line starts.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { text, starts }
    }

    fn pos(&self, offset: usize) -> Pos {
        let offset = offset.min(self.text.len());
        // `starts[0]` is 0, so at least one line starts at or before `offset`.
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts.get(line - 1).copied().unwrap_or(0);
        let column = self.text[start..]
            .char_indices()
            .take_while(|(i, _)| start + i < offset)
            .count()
            + 1;
        Pos {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
        }
    }
}

// ---------------------------------------------------------------- YAML

/// Parses YAML text into a tree. An empty document is an empty table.
pub(crate) fn parse_yaml(text: &str) -> Result<Node, SyntaxError> {
    let root: serde_saphyr::Spanned<YamlKind> = serde_saphyr::from_str(text).map_err(|e| {
        let message = serde_saphyr::DefaultMessageFormatter.format_message(e.without_snippet());
        SyntaxError {
            pos: e.location().map(|l| yaml_pos(&l)),
            message: yaml_message(&message),
        }
    })?;
    let kind = match root.value.0 {
        Kind::Null => Kind::Table(Vec::new()),
        other => other,
    };
    Ok(Node {
        pos: yaml_pos(&root.referenced),
        kind,
    })
}

/// The parser's message, reworded where it speaks to library users rather
/// than to people editing a file.
fn yaml_message(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(rest);
        return format!("duplicate key {key}");
    }
    if message.starts_with("multiple YAML documents detected") {
        return "a second YAML document starts here (---); a configuration file holds one"
            .to_string();
    }
    if message == "alias references unknown anchor" {
        // Almost always an unquoted cron expression such as */5 * * * *.
        return format!("{message}; quote values that start with *, e.g. '*/5 * * * *'");
    }
    message.to_string()
}

fn yaml_pos(location: &serde_saphyr::Location) -> Pos {
    Pos {
        line: u32::try_from(location.line()).unwrap_or(u32::MAX).max(1),
        column: u32::try_from(location.column()).unwrap_or(u32::MAX).max(1),
    }
}

fn yaml_node(spanned: serde_saphyr::Spanned<YamlKind>) -> Node {
    Node {
        pos: yaml_pos(&spanned.referenced),
        kind: spanned.value.0,
    }
}

/// A YAML value whose children are deserialized with their spans: every
/// element and value as `Spanned<YamlKind>`, every key as `Spanned<String>`.
struct YamlKind(Kind);

impl<'de> Deserialize<'de> for YamlKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(YamlVisitor).map(YamlKind)
    }
}

struct YamlVisitor;

impl<'de> Visitor<'de> for YamlVisitor {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Kind, E> {
        Ok(Kind::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Kind, E> {
        Ok(Kind::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Kind, E> {
        Ok(Kind::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Kind, E> {
        serde_json::Number::from_f64(v)
            .map(Kind::Number)
            .ok_or_else(|| E::custom("inf and nan are not supported"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
        Ok(Kind::String(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Kind, E> {
        Ok(Kind::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<serde_saphyr::Spanned<YamlKind>>()? {
            items.push(yaml_node(item));
        }
        Ok(Kind::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<serde_saphyr::Spanned<String>>()? {
            let value = map.next_value::<serde_saphyr::Spanned<YamlKind>>()?;
            entries.push(Entry {
                key: key.value,
                key_pos: yaml_pos(&key.referenced),
                value: yaml_node(value),
            });
        }
        Ok(Kind::Table(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: u32, column: u32) -> Pos {
        Pos { line, column }
    }

    fn path(keys: &[&str]) -> FieldPath {
        keys.iter().fold(FieldPath::root(), |p, k| p.key(*k))
    }

    #[test]
    fn line_index_counts_characters_not_bytes() {
        let lines = LineIndex::new("ab\néé = 1\n\nx");
        assert_eq!(lines.pos(0), at(1, 1));
        assert_eq!(lines.pos(2), at(1, 3));
        assert_eq!(lines.pos(3), at(2, 1));
        // "éé" is four bytes: the space after it is the third character.
        assert_eq!(lines.pos(7), at(2, 3));
        assert_eq!(lines.pos(12), at(3, 1));
        assert_eq!(lines.pos(13), at(4, 1));
        assert_eq!(lines.pos(999), at(4, 2));
    }

    #[test]
    fn toml_keys_and_values_have_positions() {
        let text = "\
[pipelines.sync]
sink = \"partner\"
schedule = { every = \"1h\" }

[sinks.partner.headers]
\"é\" = \"x\"
Authorization = \"Bearer\"
";
        let positions = parse_toml(text).expect("parses").positions();
        let sink = path(&["pipelines", "sync", "sink"]);
        assert_eq!(positions.locate(&sink, Anchor::Value), at(2, 8));
        assert_eq!(positions.locate(&sink, Anchor::Key), at(2, 1));
        let every = path(&["pipelines", "sync", "schedule", "every"]);
        assert_eq!(positions.locate(&every, Anchor::Value), at(3, 22));
        let auth = path(&["sinks", "partner", "headers", "Authorization"]);
        assert_eq!(positions.locate(&auth, Anchor::Key), at(7, 1));
        assert_eq!(positions.locate(&auth, Anchor::Value), at(7, 17));
        let accented = path(&["sinks", "partner", "headers", "é"]);
        assert_eq!(positions.locate(&accented, Anchor::Value), at(6, 7));
        // A field that is not written points at its table (the header).
        let missing = path(&["pipelines", "sync", "source"]);
        assert_eq!(positions.locate(&missing, Anchor::Value), at(1, 1));
    }

    #[test]
    fn yaml_keys_and_values_have_positions() {
        let text = "\
pipelines:
  sync:
    sink: partner
    schedule: { every: 1h }
sinks:
  partner:
    headers:
      Authorization: Bearer x
    cursor: [a, b]
";
        let positions = parse_yaml(text).expect("parses").positions();
        let sink = path(&["pipelines", "sync", "sink"]);
        assert_eq!(positions.locate(&sink, Anchor::Value), at(3, 11));
        assert_eq!(positions.locate(&sink, Anchor::Key), at(3, 5));
        let every = path(&["pipelines", "sync", "schedule", "every"]);
        assert_eq!(positions.locate(&every, Anchor::Value), at(4, 24));
        let auth = path(&["sinks", "partner", "headers", "Authorization"]);
        assert_eq!(positions.locate(&auth, Anchor::Key), at(8, 7));
        assert_eq!(positions.locate(&auth, Anchor::Value), at(8, 22));
        let second = path(&["sinks", "partner", "cursor"]).index(1);
        assert_eq!(positions.locate(&second, Anchor::Value), at(9, 17));
    }

    #[test]
    fn both_formats_give_the_same_json() {
        let toml = parse_toml("a = 1\nb = [true, \"x\", 2.5]\n[c]\nd = \"e\"\n").expect("toml");
        let yaml = parse_yaml("a: 1\nb: [true, x, 2.5]\nc:\n  d: e\n").expect("yaml");
        assert_eq!(toml.to_json(), yaml.to_json());
    }

    #[test]
    fn empty_documents_are_empty_tables() {
        assert_eq!(
            parse_toml("").expect("toml").to_json(),
            serde_json::json!({})
        );
        assert_eq!(
            parse_yaml("").expect("yaml").to_json(),
            serde_json::json!({})
        );
        assert_eq!(
            parse_yaml("# only a comment\n").expect("yaml").to_json(),
            serde_json::json!({})
        );
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse_toml("a = 1\nb = \n").expect_err("bad toml");
        assert_eq!(e.pos, Some(at(2, 5)));
        let e = parse_toml("a = 1\na = 2\n").expect_err("duplicate");
        assert_eq!(e.pos, Some(at(2, 1)));
        assert_eq!(e.message, "duplicate key a");
        let e = parse_yaml("a: [1, 2\n").expect_err("bad yaml");
        assert_eq!(e.pos, Some(at(1, 4)));
        let e = parse_yaml("a: 1\na: 2\n").expect_err("duplicate");
        assert_eq!(e.pos, Some(at(2, 1)));
        assert_eq!(e.message, "duplicate key a");
        let e = parse_yaml("a: 1\n---\nb: 2\n").expect_err("two documents");
        assert_eq!(e.pos, Some(at(3, 1)));
        assert!(e.message.contains("second YAML document"), "{}", e.message);
    }

    #[test]
    fn odd_yaml_does_not_panic() {
        for text in [
            "? [a]\n: 1\n",
            "a: !!binary aGVsbG8=\n",
            "a: 1\n---\nb: 2\n",
            "\tb: 1\n",
            "a: 1e400\n",
            "a: &x [*x]\n",
            "- 1\n- 2\n",
            "a: .nan\n",
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        ] {
            let _ = parse_yaml(text);
        }
    }
}

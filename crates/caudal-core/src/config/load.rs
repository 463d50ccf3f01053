//! Loading a configuration file: parse, interpolate, deserialize, validate,
//! and report every problem as `file:line:col: field.path: message`.
//!
//! The stages, each in its own module:
//! 1. `tree`: TOML or YAML becomes one tree that remembers the line and
//!    column of every key and value. A syntax error stops here.
//! 2. `interpolate`: `${VAR}` / `${VAR:-default}` in string values.
//! 3. `deserialize`: the tree becomes the model, entry by entry, with a
//!    field path on every error.
//! 4. [`super::validate`]: cross-field checks on the model.
//!
//! Problems from stages 2 to 4 are collected together, given locations
//! from the tree, and sorted by location, so one run shows them all.

mod deserialize;
mod interpolate;
pub(crate) mod path;
mod tree;

use std::fmt;
use std::path::Path;

use self::path::{Anchor, FieldPath, Problem};
use self::tree::{Pos, Positions};
use super::{Config, validate};

/// File formats with the same model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    Yaml,
}

/// A place in a configuration file (1-based line and column).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub file: String,
    pub line: u32,
    pub column: u32,
}

/// One configuration problem: where, which field, what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub location: Option<Located>,
    /// Dotted field path, e.g. `pipelines.sync.schedule.every`.
    pub path: String,
    pub message: String,
}

/// Every problem found in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = &self.location {
            write!(f, "{}:{}:{}: ", l.file, l.line, l.column)?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Loads a file; the format follows the extension (`.toml`, `.yaml`, `.yml`).
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            location: None,
            path: String::new(),
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })?;
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => Format::Yaml,
        _ => Format::Toml,
    };
    let mut config = load_str(&text, format, &path.display().to_string(), &|k| {
        std::env::var(k).ok()
    })?;
    config.base_dir = Some(
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| std::path::PathBuf::from("."), Path::to_path_buf),
    );
    Ok(config)
}

/// Loads configuration text. `file` names the text in error messages;
/// `env` resolves `${VAR}` references (pass a closure over a map in tests).
///
/// On failure every problem found is returned, sorted by location. A
/// syntax error is reported alone, since nothing after it can be trusted.
pub fn load_str(
    text: &str,
    format: Format,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let parsed = match format {
        Format::Toml => tree::parse_toml(text),
        Format::Yaml => tree::parse_yaml(text),
    };
    let mut tree = parsed.map_err(|e| {
        ConfigErrors(vec![ConfigError {
            location: e.pos.map(|pos| located(file, pos)),
            path: String::new(),
            message: e.message,
        }])
    })?;

    let mut problems = Vec::new();
    interpolate::interpolate_tree(&mut tree, &FieldPath::root(), env, &mut problems);
    // A value with a bad `${...}` is left as written; later complaints about
    // that value would only echo the first problem.
    let unresolved: Vec<FieldPath> = problems.iter().map(|p| p.path.clone()).collect();

    let mut later = Vec::new();
    let mut warnings = Vec::new();
    let mut config = deserialize::config(tree.to_json(), &mut later);
    if let Some(config) = &mut config {
        // Checked first where the file says it; then settings written the
        // old way move to their new place.
        later.extend(validate::check(config));
        for (name, sink) in &mut config.sinks {
            let (w, e) = sink.upgrade(&FieldPath::root().key("sinks").key(name.clone()));
            warnings.extend(w);
            later.extend(e);
        }
    }
    problems.extend(
        later.into_iter().filter(|p| {
            p.anchor == Anchor::Key || !unresolved.iter().any(|u| p.path.starts_with(u))
        }),
    );

    match config {
        Some(mut config) if problems.is_empty() => {
            config.warnings = locate(warnings, &tree.positions(), file);
            Ok(config)
        }
        _ => Err(located_errors(problems, &tree.positions(), file)),
    }
}

/// One step of a field path, for problems found after loading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathPart {
    Key(String),
    Index(usize),
}

/// Problems found after loading (against a database, say), each at a
/// field path, with their places in `file` as [`load_file`] would give
/// them; the file is read again (a file that no longer parses gives
/// problems without places).
pub fn locate_in_file(file: &Path, problems: Vec<(Vec<PathPart>, String)>) -> ConfigErrors {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let tree = match file.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => tree::parse_yaml(&text),
        _ => tree::parse_toml(&text),
    };
    let problems: Vec<Problem> = problems
        .into_iter()
        .map(|(parts, message)| {
            let path = parts
                .into_iter()
                .fold(FieldPath::root(), |p, part| match part {
                    PathPart::Key(k) => p.key(k),
                    PathPart::Index(i) => p.index(i),
                });
            Problem::at(path, message)
        })
        .collect();
    match tree {
        Ok(tree) => located_errors(problems, &tree.positions(), &name),
        Err(_) => ConfigErrors(
            problems
                .into_iter()
                .map(|p| ConfigError {
                    location: None,
                    path: p.path.to_string(),
                    message: p.message,
                })
                .collect(),
        ),
    }
}

fn located(file: &str, pos: Pos) -> Located {
    Located {
        file: file.to_string(),
        line: pos.line,
        column: pos.column,
    }
}

/// Gives each problem its place in the file and sorts them by it.
fn located_errors(problems: Vec<Problem>, positions: &Positions, file: &str) -> ConfigErrors {
    let mut errors = locate(problems, positions, file);
    if errors.is_empty() {
        // Unreachable in practice: a failed stage always reports a problem.
        errors.push(ConfigError {
            location: None,
            path: String::new(),
            message: format!("{file}: the configuration is invalid"),
        });
    }
    ConfigErrors(errors)
}

/// Each problem with its place in the file, sorted by place.
fn locate(problems: Vec<Problem>, positions: &Positions, file: &str) -> Vec<ConfigError> {
    let mut errors: Vec<ConfigError> = problems
        .into_iter()
        .map(|problem| ConfigError {
            location: Some(located(
                file,
                positions.locate(&problem.path, problem.anchor),
            )),
            path: problem.path.to_string(),
            message: problem.message,
        })
        .collect();
    // Stable: problems at one place keep the order they were found in.
    errors.sort_by_key(|e| e.location.as_ref().map(|l| (l.line, l.column)));
    errors.dedup();
    errors
}

/// The JSON Schema of the configuration, for editors.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Config)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn errors_print_as_file_line_column_path_message() {
        let text = "[pipelines.p]\nsource = \"a\"\nsink = \"b\"\nschedule = { every = \"1h\" }\n";
        let errors = load_str(text, Format::Toml, "c.toml", &no_env).expect_err("no such source");
        assert_eq!(
            errors.to_string(),
            "c.toml:2:10: pipelines.p.source: unknown source \"a\"; no sources are defined\n\
             c.toml:3:8: pipelines.p.sink: unknown sink \"b\"; no sinks are defined"
        );
    }

    #[test]
    fn errors_are_sorted_by_location() {
        let text = "pipelines:\n  z:\n    source: a\n    sink: b\n    schedule: {}\n  a:\n    source: a\n    sink: b\n    schedule: { every: 1h }\n";
        let errors = load_str(text, Format::Yaml, "c.yaml", &no_env).expect_err("invalid");
        let lines: Vec<u32> = errors
            .0
            .iter()
            .filter_map(|e| e.location.as_ref().map(|l| l.line))
            .collect();
        assert_eq!(lines, [3, 4, 5, 7, 8]);
    }

    #[test]
    fn an_empty_file_is_the_default_config() {
        for format in [Format::Toml, Format::Yaml] {
            let config = load_str("", format, "c", &no_env).expect("empty is valid");
            assert_eq!(config.state.url.expose(), super::super::DEFAULT_STATE_URL);
        }
    }

    #[test]
    fn the_schema_describes_the_model() {
        let schema = json_schema();
        let properties = &schema["properties"];
        for key in ["state", "sources", "sinks", "pipelines"] {
            assert!(properties.get(key).is_some(), "{key} missing from {schema}");
        }
    }
}

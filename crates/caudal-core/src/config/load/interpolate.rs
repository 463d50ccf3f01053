//! `${VAR}` and `${VAR:-default}` in string values.
//!
//! Interpolation runs on the parsed tree, value by value, never on the raw
//! file text: an environment value is always plain string content and can
//! never add keys, quotes or tables. Keys are not interpolated.
//!
//! Rules:
//! - `${VAR}` is the value of `VAR`; unset is an error (set but empty is
//!   the empty string).
//! - `${VAR:-default}` is the value of `VAR`, or `default` when `VAR` is
//!   unset or empty. The default ends at the first `}`.
//! - `$${` is a literal `${`; any other `$` is kept as written.
//! - Names are letters, digits and `_`, not starting with a digit.

use super::path::{FieldPath, Problem};
use super::tree::{Kind, Node};

/// Looks up an environment variable.
pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Interpolates every string value of the tree in place. A value with a
/// problem is left as written and one [`Problem`] per problem is added, so
/// every missing variable in the file is reported at once.
pub(crate) fn interpolate_tree(
    node: &mut Node,
    path: &FieldPath,
    env: Env<'_>,
    problems: &mut Vec<Problem>,
) {
    match &mut node.kind {
        Kind::String(text) => match interpolate(text, env) {
            Ok(value) => *text = value,
            Err(messages) => {
                problems.extend(messages.into_iter().map(|m| Problem::at(path.clone(), m)));
            }
        },
        Kind::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_tree(item, &path.index(i), env, problems);
            }
        }
        Kind::Table(entries) => {
            for entry in entries {
                interpolate_tree(
                    &mut entry.value,
                    &path.key(entry.key.clone()),
                    env,
                    problems,
                );
            }
        }
        Kind::Null | Kind::Bool(_) | Kind::Number(_) => {}
    }
}

/// Interpolates one string. On failure returns one message per problem.
pub(crate) fn interpolate(text: &str, env: Env<'_>) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        rest = &rest[dollar..];
        if let Some(after) = rest.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let Some(close) = after.find('}') else {
                problems.push(
                    "\"${\" is not closed by \"}\"; write \"$${\" for a literal \"${\"".to_string(),
                );
                out.push_str(rest);
                rest = "";
                break;
            };
            let reference = &after[..close];
            match resolve(reference, env) {
                Ok(value) => out.push_str(&value),
                Err(message) => problems.push(message),
            }
            rest = &after[close + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// Resolves the inside of `${...}`: `NAME` or `NAME:-default`.
fn resolve(reference: &str, env: Env<'_>) -> Result<String, String> {
    let (name, default) = match reference.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (reference, None),
    };
    if !is_valid_name(name) {
        return Err(format!(
            "invalid variable reference \"${{{reference}}}\": write ${{NAME}} or ${{NAME:-default}} \
             with a name of letters, digits and _ (or \"$${{\" for a literal \"${{\")"
        ));
    }
    match (env(name), default) {
        (Some(value), Some(default)) if value.is_empty() => Ok(default.to_string()),
        (Some(value), _) => Ok(value),
        (None, Some(default)) => Ok(default.to_string()),
        (None, None) => Err(format!(
            "environment variable {name} is not set; set it, or give a default with ${{{name}:-default}}"
        )),
    }
}

fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("db.local".into()),
            "EMPTY" => Some(String::new()),
            "TRICKY" => Some("\"}\n[x]\n${HOST}".into()),
            _ => None,
        }
    }

    fn run(text: &str) -> Result<String, Vec<String>> {
        interpolate(text, &env)
    }

    #[test]
    fn variables_are_replaced() {
        assert_eq!(
            run("postgres://${HOST}/db"),
            Ok("postgres://db.local/db".into())
        );
        assert_eq!(run("${HOST}${HOST}"), Ok("db.localdb.local".into()));
        assert_eq!(run("no variables"), Ok("no variables".into()));
        assert_eq!(run(""), Ok(String::new()));
    }

    #[test]
    fn defaults_apply_when_unset_or_empty() {
        assert_eq!(run("${MISSING:-5432}"), Ok("5432".into()));
        assert_eq!(run("${EMPTY:-x}"), Ok("x".into()));
        assert_eq!(run("${HOST:-x}"), Ok("db.local".into()));
        assert_eq!(run("${MISSING:-}"), Ok(String::new()));
        assert_eq!(run("${MISSING:-a:-b}"), Ok("a:-b".into()));
        // Set but empty without a default is the empty string.
        assert_eq!(run("[${EMPTY}]"), Ok("[]".into()));
    }

    #[test]
    fn dollar_escapes_and_plain_dollars() {
        assert_eq!(run("$${HOST}"), Ok("${HOST}".into()));
        assert_eq!(run("pa$$word $HOST $"), Ok("pa$$word $HOST $".into()));
        // Scanning is left to right: a plain `$`, then the escape.
        assert_eq!(run("$$${HOST}"), Ok("$${HOST}".into()));
        assert_eq!(run("a$${b}${HOST}"), Ok("a${b}db.local".into()));
    }

    #[test]
    fn values_are_not_interpolated_again() {
        assert_eq!(run("${TRICKY}"), Ok("\"}\n[x]\n${HOST}".into()));
    }

    #[test]
    fn every_missing_variable_is_reported() {
        let errors = run("${A}/${HOST}/${B}").expect_err("two missing");
        assert_eq!(errors.len(), 2);
        assert!(errors[0].contains("A is not set"), "{errors:?}");
        assert!(errors[0].contains("${A:-default}"), "{errors:?}");
        assert!(errors[1].contains("B is not set"), "{errors:?}");
    }

    #[test]
    fn malformed_references_are_errors() {
        let unclosed = run("x ${HOST").expect_err("unclosed");
        assert!(unclosed[0].contains("not closed"), "{unclosed:?}");
        for bad in ["${}", "${1A}", "${A B}", "${A-b}", "${:-x}"] {
            let errors = run(bad).expect_err(bad);
            assert!(
                errors[0].contains("invalid variable reference"),
                "{errors:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn text_without_dollars_is_unchanged(text in "[^$]*") {
            proptest::prop_assert_eq!(run(&text), Ok(text.clone()));
        }

        #[test]
        fn escaped_text_comes_back_literally(text in "[a-z${}:-]*") {
            let escaped = text.replace("${", "$${");
            // Escaping is only unambiguous when no `$` precedes a `${`.
            proptest::prop_assume!(!text.contains("$${"));
            proptest::prop_assert_eq!(run(&escaped), Ok(text.clone()));
        }

        #[test]
        fn any_text_is_handled_without_panicking(text in ".*") {
            let _ = run(&text);
        }
    }

    #[test]
    fn tree_problems_carry_the_value_path() {
        let mut node =
            crate::config::load::tree::parse_toml("[a]\nb = [\"${NOPE}\", \"${HOST}\"]\nk = 1\n")
                .expect("parses");
        let mut problems = Vec::new();
        interpolate_tree(&mut node, &FieldPath::root(), &env, &mut problems);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].path.to_string(), "a.b[0]");
        assert_eq!(
            node.to_json(),
            serde_json::json!({"a": {"b": ["${NOPE}", "db.local"], "k": 1}})
        );
    }
}

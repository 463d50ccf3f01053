//! Task templates: minijinja with strict undefined, so a template that
//! names an output an upstream task did not write fails the task with a
//! message naming it, instead of running a command with an empty argument.

use serde_json::{Map, Value};

/// What every instance of a task sees: params, the run, upstream results.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Context {
    pub params: Map<String, Value>,
    pub run: Map<String, Value>,
    pub workflow: String,
    pub tasks: Map<String, Value>,
}

/// What one fan-out instance adds.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Instance {
    pub item: Value,
    pub items: Value,
    pub index: i64,
}

/// The template environment of the executor.
pub(crate) fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env
}

/// A context ready for rendering. The task's part is built once and
/// shared by all its instances (a fan-out of 10,000 does not copy its
/// upstream's items 10,000 times); an instance's `item` is merged in
/// lazily.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    value: minijinja::Value,
}

impl Prepared {
    /// The shared part.
    pub(crate) fn base(context: &Context) -> minijinja::Value {
        minijinja::Value::from(minijinja::value::Serde(context))
    }

    pub(crate) fn new(base: &minijinja::Value, instance: Option<&Instance>) -> Self {
        let value = match instance {
            None => base.clone(),
            Some(i) => minijinja::value::merge_maps([
                minijinja::Value::from(minijinja::value::Serde(i)),
                base.clone(),
            ]),
        };
        Self { value }
    }

    /// Its JSON form, to name what is missing (only on errors).
    fn json(&self) -> Value {
        serde_json::to_value(&self.value).unwrap_or(Value::Null)
    }
}

/// Renders `template` (at `field`, for messages) with `context`.
pub(crate) fn render(
    env: &minijinja::Environment<'static>,
    field: &str,
    template: &str,
    context: &Prepared,
) -> Result<String, String> {
    if !template.contains("{{") && !template.contains("{%") {
        return Ok(template.to_string());
    }
    env.render_str(template, &context.value)
        .map_err(|e| template_error(env, field, template, &e, context))
}

/// The expression of a template that is exactly one `{{ … }}`.
pub(crate) fn single_expression(template: &str) -> Option<&str> {
    let expr = template
        .trim()
        .strip_prefix("{{")?
        .strip_suffix("}}")?
        .trim();
    (!expr.contains("}}") && !expr.contains("{{")).then_some(expr)
}

/// A command argument: a template that is one expression giving a list
/// becomes one argument per element (`"{{ items }}"`); anything else one
/// argument.
pub(crate) fn arguments(
    env: &minijinja::Environment<'static>,
    field: &str,
    template: &str,
    context: &Prepared,
) -> Result<Vec<String>, String> {
    if single_expression(template).is_none() {
        return render(env, field, template, context).map(|a| vec![a]);
    }
    Ok(match evaluate(env, field, template, context)? {
        Value::Array(list) => list.iter().map(text).collect(),
        other => vec![text(&other)],
    })
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Evaluates `template` as one expression's value: `"{{ tasks.a.items }}"`
/// gives the list itself, not its text. Used by `for_each`.
pub(crate) fn evaluate(
    env: &minijinja::Environment<'static>,
    field: &str,
    template: &str,
    context: &Prepared,
) -> Result<Value, String> {
    match single_expression(template) {
        Some(expr) => {
            let compiled = env
                .compile_expression(expr)
                .map_err(|e| template_error(env, field, template, &e, context))?;
            let value = compiled
                .eval(&context.value)
                .map_err(|e| template_error(env, field, template, &e, context))?;
            if value.is_undefined() {
                let e =
                    minijinja::Error::new(minijinja::ErrorKind::UndefinedError, "undefined value");
                return Err(template_error(env, field, template, &e, context));
            }
            serde_json::to_value(&value).map_err(|e| format!("{field}: {e}"))
        }
        _ => {
            let text = render(env, field, template, context)?;
            serde_json::from_str(&text).map_err(|_| {
                format!("{field}: must give a list (e.g. \"{{{{ tasks.inm24.items }}}}\"); it gave {text:?}")
            })
        }
    }
}

fn template_error(
    env: &minijinja::Environment<'static>,
    field: &str,
    template: &str,
    e: &minijinja::Error,
    context: &Prepared,
) -> String {
    let detail = e.detail().map_or_else(|| e.to_string(), str::to_string);
    if e.kind() != minijinja::ErrorKind::UndefinedError {
        return format!("{field}: {detail}");
    }
    match missing_path(env, template, &context.json()) {
        Some(path) => format!(
            "{field}: the template names `{path}`, which does not exist{}",
            if path.starts_with("tasks.") {
                " (the upstream task did not write that output)"
            } else {
                ""
            }
        ),
        None => format!("{field}: the template names something that does not exist ({detail})"),
    }
}

/// The first dotted variable path of `template` that `json` lacks.
fn missing_path(
    env: &minijinja::Environment<'static>,
    template: &str,
    json: &Value,
) -> Option<String> {
    let compiled = env.template_from_str(template).ok()?;
    let mut paths: Vec<String> = compiled.undeclared_variables(true).into_iter().collect();
    paths.sort();
    paths.into_iter().find(|path| {
        let mut at = json;
        for part in path.split('.') {
            match at.get(part) {
                Some(next) => at = next,
                None => return true,
            }
        }
        false
    })
}

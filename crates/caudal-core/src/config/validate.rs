//! Cross-field checks of a parsed configuration: what the types alone
//! cannot say (a pipeline names a sink that exists, a schedule has exactly
//! one trigger, a URL fits its source type, a template compiles). Each
//! section's checks live beside its types (`sources`, `sinks`,
//! `delivery`, `pipelines`, `server`); this module runs them all.
//!
//! Every problem is reported, each with the field path it is about; the
//! loader turns paths into file locations. Messages never print secret
//! values (source URLs, header values): at most a URL's scheme.

use super::Config;
use super::load::ConfigError;
use super::load::path::{FieldPath, Problem};

/// Checks a configuration and returns every problem (empty when valid).
/// Errors carry field paths but no locations; [`super::load_str`] runs these
/// checks too and adds locations.
pub fn validate(config: &Config) -> Vec<ConfigError> {
    check(config)
        .into_iter()
        .map(|problem| ConfigError {
            location: None,
            path: problem.path.to_string(),
            message: problem.message,
        })
        .collect()
}

/// Every cross-field problem of `config`, with paths.
pub(crate) fn check(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    let root = FieldPath::root();
    for (name, source) in &config.sources {
        super::sources::check_source(
            &root.key("sources").key(name.clone()),
            source,
            &mut problems,
        );
    }
    for (name, sink) in &config.sinks {
        super::sinks::check_sink(&root.key("sinks").key(name.clone()), sink, &mut problems);
    }
    let defined = super::pipelines::Defined {
        pipelines: &config.pipelines,
        sources: &config.sources,
        sinks: &config.sinks,
    };
    super::pipelines::check_pipelines(&defined, &mut problems);
    super::server::check_server(config.server.as_ref(), &mut problems);
    super::crawl::check_settings(&root.key("crawl"), &config.crawl, &mut problems);
    super::retention::check(&root.key("retention"), &config.retention, &mut problems);
    super::backup::check(config.backup.as_ref(), &mut problems);
    super::datasets::check_cache(&root.key("cache"), &config.cache, &mut problems);
    let names = super::workflows::Names {
        pools: &config.pools,
        pipelines: &config.pipelines,
        sources: &config.sources,
    };
    super::workflows::check(&config.workflows, &names, &mut problems);
    super::aggregates::check(
        &config.aggregates,
        &config.pipelines,
        &config.sources,
        &mut problems,
    );
    super::alerts::check(config, &mut problems);
    super::cluster::check(config, &mut problems);
    problems
}

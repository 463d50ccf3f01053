//! The configuration loader on arbitrary text, as TOML and as YAML: it
//! either loads or reports problems, each placed at a line and column of
//! the file; it never panics (YAML aliases included).
#![no_main]

use caudal_core::config::{Format, load_str};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // `${E...}` references resolve, others are unset (with or without a
    // default), so interpolation takes both paths.
    let env = |name: &str| name.starts_with('E').then(|| format!("{name}-value"));
    for format in [Format::Toml, Format::Yaml] {
        if let Err(errors) = load_str(&text, format, "fuzz.conf", &env) {
            assert!(!errors.0.is_empty(), "a failed load reports no problem");
            for error in &errors.0 {
                if let Some(at) = &error.location {
                    assert!(at.line >= 1 && at.column >= 1, "{error}: not 1-based");
                }
            }
            let _ = errors.to_string();
        }
    }
});

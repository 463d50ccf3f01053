//! Response status classes: success, retry later, reject, split.

use std::collections::BTreeMap;

use crate::config::StatusConfig;

/// How a response status is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusClass {
    /// The batch was accepted.
    Success,
    /// A temporary failure: send the same batch again later.
    Retry,
    /// The batch was refused; sending it unchanged will not help. It goes
    /// to dead letters.
    Reject,
    /// The batch was too large: split it in two and send each half.
    Split,
}

impl StatusClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Retry => "retry",
            Self::Reject => "reject",
            Self::Split => "split",
        }
    }
}

/// A sink's status classes: the defaults (2xx success; 408, 429 and 5xx
/// except 501 retry; 413 split; everything else reject) with the sink's
/// `status` lists on top.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusClasses {
    overrides: BTreeMap<u16, StatusClass>,
}

impl StatusClasses {
    /// The defaults overridden by `config`. A code listed twice (which
    /// validation refuses) takes the later list, in the order success,
    /// retry, reject, split.
    pub fn from_config(config: &StatusConfig) -> Self {
        let lists = [
            (&config.success, StatusClass::Success),
            (&config.retry, StatusClass::Retry),
            (&config.reject, StatusClass::Reject),
            (&config.split, StatusClass::Split),
        ];
        let overrides = lists
            .into_iter()
            .flat_map(|(codes, class)| codes.iter().map(move |&code| (code, class)))
            .collect();
        Self { overrides }
    }

    /// `code` is `class` unless the configuration lists it.
    pub fn unless_listed(mut self, code: u16, class: StatusClass) -> Self {
        self.overrides.entry(code).or_insert(class);
        self
    }

    /// The class of a response status.
    pub fn classify(&self, status: u16) -> StatusClass {
        self.overrides
            .get(&status)
            .copied()
            .unwrap_or_else(|| default_class(status))
    }
}

/// The class of a status when the sink lists nothing for it.
pub fn default_class(status: u16) -> StatusClass {
    match status {
        200..=299 => StatusClass::Success,
        408 | 429 => StatusClass::Retry,
        413 => StatusClass::Split,
        501 => StatusClass::Reject,
        500..=599 => StatusClass::Retry,
        _ => StatusClass::Reject,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let classes = StatusClasses::default();
        for (status, class) in [
            (200, StatusClass::Success),
            (204, StatusClass::Success),
            (299, StatusClass::Success),
            (301, StatusClass::Reject),
            (400, StatusClass::Reject),
            (404, StatusClass::Reject),
            (408, StatusClass::Retry),
            (409, StatusClass::Reject),
            (413, StatusClass::Split),
            (429, StatusClass::Retry),
            (500, StatusClass::Retry),
            (501, StatusClass::Reject),
            (503, StatusClass::Retry),
            (599, StatusClass::Retry),
            (100, StatusClass::Reject),
        ] {
            assert_eq!(classes.classify(status), class, "{status}");
        }
    }

    #[test]
    fn lists_override_the_defaults() {
        let classes = StatusClasses::from_config(&StatusConfig {
            success: vec![409],
            retry: vec![425],
            reject: vec![503, 413],
            split: vec![400],
        });
        assert_eq!(classes.classify(409), StatusClass::Success);
        assert_eq!(classes.classify(425), StatusClass::Retry);
        assert_eq!(classes.classify(503), StatusClass::Reject);
        assert_eq!(classes.classify(413), StatusClass::Reject);
        assert_eq!(classes.classify(400), StatusClass::Split);
        // Untouched codes keep their defaults.
        assert_eq!(classes.classify(502), StatusClass::Retry);
        assert_eq!(classes.classify(201), StatusClass::Success);
        assert_eq!(classes.classify(404), StatusClass::Reject);
    }

    #[test]
    fn the_empty_config_is_the_default() {
        assert_eq!(
            StatusClasses::from_config(&StatusConfig::default()),
            StatusClasses::default()
        );
    }
}

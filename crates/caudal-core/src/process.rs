//! This process's identity, as leases name their holder: in the state
//! store (pipelines, workflow tasks) and in a broker (JetStream
//! partitions).
//!
//! Promises:
//! - [`holder_id`] is the same for the whole life of a process and
//!   differs from every other process's, also one that reuses a pid on
//!   this host after a restart.

use std::sync::OnceLock;

/// `host:pid:nonce`, fixed at its first use.
pub fn holder_id() -> String {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("{}:{}:{nonce:08x}", hostname(), std::process::id())
    })
    .clone()
}

/// This machine's host name (`localhost` when it cannot be read).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

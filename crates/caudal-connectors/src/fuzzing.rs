//! The pure decoding steps of the change data capture sources, reachable
//! without a database, for the fuzz targets in `fuzz/` (see
//! `docs/fuzzing.md`). Not a stable API: each item only forwards to the
//! function the sources use, so what is fuzzed is what runs.

use caudal_core::config::DecimalFormat;
use serde_json::Value;
use sqlx::postgres::PgTypeInfo;

/// One PostgreSQL value in binary format as JSON, by its type: how
/// snapshots, incremental reads and the replication stream's binary
/// columns decode.
pub fn pg_binary_value(
    ty: &PgTypeInfo,
    bytes: &[u8],
    decimals: DecimalFormat,
) -> Result<Value, String> {
    crate::sources::sql::postgres::binary_value(ty, bytes, decimals)
}

/// MariaDB binary log rows: a table map event's shape and the row images
/// of a rows event.
#[cfg(feature = "mysql")]
pub mod mysql {
    pub use crate::sources::mysql_cdc::catalog::Facts;
    pub use crate::sources::mysql_cdc::decode::{Image, Images, Shape, images};
}

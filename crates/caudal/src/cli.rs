//! Command-line arguments: what the user typed, before anything is resolved.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// caudal keeps systems in sync: it reads changed rows from SQL databases on
/// a schedule into a durable local buffer, and delivers them to HTTP APIs in
/// batches, with checkpoints that never move past rows that are not durable.
///
/// Start with `caudal demo` (no services needed), then write a config file
/// (`caudal schema` gives its JSON Schema) and run `caudal validate`,
/// `caudal once PIPELINE` and `caudal run`.
#[derive(Debug, Parser)]
#[command(name = "caudal", version, about, long_about, after_help = EXIT_CODES)]
pub struct Cli {
    /// The configuration file (TOML or YAML).
    #[arg(
        short,
        long,
        global = true,
        env = "CAUDAL_CONFIG",
        default_value = "caudal.toml"
    )]
    pub config: PathBuf,

    /// Log level: error, warn, info, debug, trace (or a tracing filter such
    /// as `caudal=debug`). RUST_LOG overrides it.
    #[arg(long, global = true, env = "CAUDAL_LOG", default_value = "info")]
    pub log_level: String,

    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// `status` and `dlq list|show|discard` ask a running `caudal run` at
    /// this address (its `[server]`, e.g. http://127.0.0.1:9464) instead
    /// of reading the state store.
    #[arg(long, global = true, env = "CAUDAL_API")]
    pub api: Option<String>,

    /// The API token for `--api` (`caudal token create`).
    #[arg(long, global = true, env = "CAUDAL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  a run failed, or the operation failed (the message says why)
  2  invalid arguments or configuration
  3  the pipeline is running in another process
  130  interrupted (Ctrl-C) before the work finished";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show caudal working end to end, with no services: a SQLite database
    /// of service requests changes while a pipeline syncs it to a local
    /// receiver; at the end, what changed is compared with what arrived.
    Demo(DemoArgs),
    /// Run every pipeline on its schedule until SIGINT or SIGTERM.
    ///
    /// Each pipeline's runs read its source into its buffer, and a delivery
    /// loop per pipeline sends the buffer as it fills, so a receiver outage
    /// does not stop reading (until the buffer is full). On a signal,
    /// caudal stops reading, lets requests already in flight finish, keeps
    /// the rest in the buffer, and exits 0.
    Run,
    /// Run one pipeline once, now: read from its checkpoint to the source's
    /// end, and deliver until its buffer is empty. A report pipeline
    /// (`mode = "query"`) writes the dates due, or `--date`.
    Once {
        /// The pipeline to run.
        pipeline: String,
        /// Report pipelines: write this logical date (YYYY-MM-DD) again.
        #[arg(long)]
        date: Option<String>,
    },
    /// Show every pipeline: schedule, last run, rows, checkpoint, next run.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show or reset a pipeline's checkpoint.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Dead letters: records a receiver refused, kept with why.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// A pipeline's durable buffer: what it holds, and whether it is intact.
    #[command(subcommand)]
    Buffer(BufferCommand),
    /// Check a configuration file and report every problem with its
    /// file:line:column and field path.
    Validate,
    /// Check that a configuration can run here, and say what to fix: the
    /// state store (opens, writable), the buffers' disk (writable, room for
    /// every buffer.max_bytes), each source (reachable, SELECT privilege,
    /// CDC prerequisites: wal_level, REPLICATION, slots, binlog settings)
    /// and each sink (reachable, TLS, OAuth2 token; the exchange or stream
    /// exists; a dataset writable). No record is read or sent.
    ///
    /// Exit codes: 0 nothing failed (warnings allowed unless --strict), 1 a
    /// check failed (or warned, with --strict), 2 invalid configuration.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Exit 1 on warnings too.
        #[arg(long)]
        strict: bool,
        /// The longest one step (a connection, a query, a request) may take.
        #[arg(long, default_value = "10s")]
        timeout: caudal_core::units::Duration,
    },
    /// Print the JSON Schema of the configuration, for editors.
    Schema,
    /// Print a shell completion script: `caudal completions bash >
    /// /etc/bash_completion.d/caudal` (also zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `caudal man > caudal.1; man ./caudal.1`.
    Man,
    /// Change data capture: the replication slot and publication of a
    /// pipeline with a `mode = "cdc"` source.
    #[command(subcommand)]
    Cdc(CdcCommand),
    /// A live view of every pipeline: state, rows in and out per second,
    /// lag, buffer, dead letters, circuit. Refreshes every second; q quits.
    /// Reads the state store, or a running daemon with --api.
    Top,
    /// API bearer tokens: create (shown once), list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Start a CDC pipeline over on purpose: drop its slot (and what waits
    /// in its buffer), forget its checkpoint; the next run creates a new
    /// slot, reads the tables again and streams from there. For a slot that
    /// was dropped or invalidated behind caudal's back.
    Resync {
        /// The pipeline to resync.
        pipeline: String,
    },
    /// Nodes: the `caudal run` processes sharing this state store, and the
    /// pipelines each owns in a cluster; drain one.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Workflows: list them, start a run, follow its tasks and logs,
    /// cancel, retry the failed tasks, backfill a date range.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Report pipelines: write every day from `--from` to `--to`
    /// (inclusive), up to `--parallel` at once, each replacing that day's
    /// partitions. CDC pipelines: read a table again (`--table`, or the rows
    /// matching `--where`) while the pipeline keeps streaming, as `read`
    /// records ordered with the changes around them (needs the pipeline
    /// running under `caudal run`). Shows progress until done.
    Backfill {
        /// The pipeline.
        pipeline: String,
        /// Report pipelines: the first logical date (YYYY-MM-DD).
        #[arg(long)]
        from: Option<String>,
        /// Report pipelines: the last logical date (YYYY-MM-DD), included.
        #[arg(long)]
        to: Option<String>,
        /// Report pipelines: dates written at once (default 2).
        #[arg(long, default_value_t = 2)]
        parallel: usize,
        /// CDC pipelines: the table to read, as in `tables`.
        #[arg(long)]
        table: Option<String>,
        /// Only rows matching this SQL condition, e.g. `"status_id = 3"`.
        #[arg(long = "where")]
        filter: Option<String>,
    },
    /// Take a consistent online backup of the SQLite state store and every
    /// pipeline's buffer: a new `caudal-backup-<UTC time>` directory under
    /// --to. With --api the running `caudal run` takes it (and --to is a
    /// directory on its machine); without, no process may hold the buffers.
    Backup {
        /// The directory to put the backup in (default `[backup] dir`).
        #[arg(long)]
        to: Option<PathBuf>,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put a backup in place: the SQLite state store and every pipeline's
    /// buffer (stop `caudal run` first). What it replaces is moved aside,
    /// never deleted. Pipelines then resume from the backup's checkpoints.
    Restore {
        /// The backup's directory (`caudal-backup-…`).
        from: PathBuf,
        /// The backup's store is PostgreSQL and the dump taken with it is
        /// restored already: put its buffers in place.
        #[arg(long)]
        store_restored: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Every node: state, heartbeat, version, and the pipelines it owns.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Ask a node to hand its pipelines over to the others and exit. Each
    /// pipeline stops cleanly (a run in progress ends as cancelled) and is
    /// given back at once; the command returns once the request is stored.
    Drain {
        /// The node's id, or a prefix naming one node.
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
    /// Every workflow: schedule, tasks, last run.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Start a run now. Without --wait it is queued for `caudal run`;
    /// with --wait this command runs it (or, when `caudal run` is the
    /// executor, follows it) and exits 0 only if it succeeded.
    Run {
        workflow: String,
        /// A parameter, `key=value` (a JSON value, or text). Repeatable.
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// The latest runs, or one run with its tasks by state.
    Status {
        run: Option<i64>,
        /// Only this workflow's runs.
        #[arg(long)]
        workflow: Option<String>,
        /// How many runs to list.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// The task instances of a run (with --attempts, every attempt).
    Tasks {
        run: i64,
        #[arg(long)]
        attempts: bool,
        #[arg(long)]
        json: bool,
    },
    /// An attempt's standard output (or --stderr).
    Logs {
        run: i64,
        task: String,
        /// The fan-out instance.
        #[arg(long)]
        index: Option<i64>,
        /// The attempt (default: the latest).
        #[arg(long)]
        attempt: Option<u32>,
        #[arg(long)]
        stderr: bool,
        /// Keep printing what the attempt writes until it ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a run: running tasks are killed, the rest never start.
    Cancel { run: i64 },
    /// Run an ended run again: with --failed only its failed (and
    /// upstream_failed, cancelled) tasks; succeeded tasks keep their
    /// results.
    Retry {
        run: i64,
        #[arg(long)]
        failed: bool,
        #[arg(long)]
        wait: bool,
    },
    /// Queue one run per schedule time from --from to --to (RFC 3339 or
    /// YYYY-MM-DD, UTC), oldest first; `caudal run` executes them.
    Backfill {
        workflow: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{text:?} is not key=value")),
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for the REST API; it is printed once (only its hash
    /// is kept).
    Create {
        /// A name for the token (who or what uses it), unique.
        #[arg(long)]
        name: String,
        /// viewer (reads), operator (also acts on pipelines and dead
        /// letters) or admin (also tokens and the audit log).
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
    },
    /// List the tokens: name, role, when created and revoked.
    List,
    /// Revoke a token by name: it is refused from then on.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum CdcCommand {
    /// Drop the pipeline's replication slot and publication, so the server
    /// stops keeping WAL for it (`caudal run` also does this for pipelines
    /// removed from the configuration). The checkpoint is kept: running the
    /// pipeline again stops with an error until `caudal resync`.
    Drop {
        /// The pipeline whose slot and publication to drop.
        pipeline: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Print the checkpoint as JSON.
    Show { pipeline: String },
    /// Forget the checkpoint: the next run reads the source from the
    /// start. Records still waiting in the pipeline's buffer are dropped
    /// (they are read again from the source).
    Reset { pipeline: String },
}

#[derive(Debug, Subcommand)]
pub enum BufferCommand {
    /// Segments, offsets, acknowledged offset and records waiting for
    /// delivery. Read-only; works while the pipeline runs.
    Inspect {
        pipeline: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verify every record's checksum and framing and list each problem
    /// with its segment file and byte position. Read-only. Exits 1 when
    /// records are damaged (a torn tail left by a crash is reported but is
    /// not damage: it is cut at the next start).
    Fsck {
        pipeline: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List pending dead letters (all pipelines, or one).
    List {
        pipeline: Option<String>,
        /// Also list replayed and discarded letters.
        #[arg(long)]
        all: bool,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter whole: record, reason, response, attempts.
    Show { id: i64 },
    /// Send a pipeline's pending dead letters again through the normal
    /// delivery path, with their original idempotency keys.
    Replay {
        pipeline: String,
        /// Only these ids.
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
    /// Mark dead letters discarded (they stay listed with `--all`).
    Discard {
        /// The ids to discard.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long rows keep changing before the final sync and summary.
    #[arg(long, default_value = "20s")]
    pub duration: caudal_core::units::Duration,
    /// Directory for the demo's databases and config (recreated).
    #[arg(long, default_value = "caudal-demo")]
    pub dir: PathBuf,
    /// Print fewer lines per delivered batch.
    #[arg(long)]
    pub quiet: bool,
}

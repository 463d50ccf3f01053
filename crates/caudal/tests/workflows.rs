//! Workflows end to end: the real `caudal` binary runs real processes
//! (sh, python3) with its state in SQLite or PostgreSQL, and the tests read
//! what the scripts observed (ledgers they append to) and what the store
//! recorded (`caudal workflow tasks --attempts --json`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

mod support;

use caudal_testkit::{Receiver, TestDb, pg_database};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_caudal");
/// Generous: the machine may be busy building or testing.
const PATIENCE: Duration = Duration::from_secs(180);

/// One test's directory, state store and configuration file.
struct Flow {
    dir: tempfile::TempDir,
    state_url: String,
    pg: Option<TestDb>,
}

impl Flow {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state_url = format!("sqlite://{}/state/caudal.db", dir.path().display());
        Self {
            dir,
            state_url,
            pg: None,
        }
    }

    async fn postgres() -> Self {
        let db = pg_database().await;
        Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
            state_url: db.url().to_string(),
            pg: Some(db),
        }
    }

    async fn cleanup(self) {
        if let Some(db) = self.pg {
            db.cleanup().await;
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> PathBuf {
        self.path("caudal.toml")
    }

    /// Writes the configuration: `[state]` first, then `body`.
    fn write(&self, body: &str) {
        let text = format!(
            "[state]\nurl = \"{}\"\nruns_dir = \"runs\"\n\n{body}",
            self.state_url
        );
        std::fs::write(self.config(), text).expect("write the configuration");
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(BIN);
        c.arg("--config")
            .arg(self.config())
            .args(args)
            .env_remove("CAUDAL_API")
            .env_remove("RUST_LOG")
            .kill_on_drop(true);
        c
    }

    /// Runs `caudal ARGS` to its end: (exit code, stdout, stderr).
    async fn caudal(&self, args: &[&str]) -> (i32, String, String) {
        let out = tokio::time::timeout(PATIENCE, self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("caudal {args:?} did not end"))
            .expect("caudal runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `caudal run` in the background.
    fn daemon(&self) -> tokio::process::Child {
        self.command(&["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.path("daemon.log"))
                    .expect("daemon log"),
            ))
            .spawn()
            .expect("caudal run starts")
    }

    async fn json_lines(&self, args: &[&str]) -> Vec<Value> {
        let (code, out, err) = self.caudal(args).await;
        assert_eq!(code, 0, "caudal {args:?}: {err}");
        out.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    async fn run_info(&self, run: i64) -> Value {
        let id = run.to_string();
        self.json_lines(&["workflow", "status", &id, "--json"])
            .await
            .pop()
            .expect("the run")
    }

    /// Task instances by `task` or `task[index]`.
    async fn tasks(&self, run: i64) -> BTreeMap<String, Value> {
        let id = run.to_string();
        self.json_lines(&["workflow", "tasks", &id, "--json"])
            .await
            .into_iter()
            .map(|t| (instance_name(&t), t))
            .collect()
    }

    async fn attempts(&self, run: i64) -> Vec<Value> {
        let id = run.to_string();
        self.json_lines(&["workflow", "tasks", &id, "--attempts", "--json"])
            .await
    }

    /// Waits until run `run` has ended; returns its state.
    async fn wait_ended(&self, run: i64) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let id = run.to_string();
        loop {
            // The run may not exist yet (the daemon's schedule creates it).
            let (_, out, _) = self.caudal(&["workflow", "status", &id, "--json"]).await;
            let info: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
            let state = info["state"].as_str().unwrap_or("(not yet)").to_string();
            if matches!(state.as_str(), "succeeded" | "failed" | "cancelled") {
                return state;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {run} still {state}; daemon log:\n{}",
                tail(&self.path("daemon.log"))
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// SIGTERM to a `caudal run`, and waits for it to exit.
async fn stop(daemon: &mut tokio::process::Child) {
    let pid = Pid::from_raw(daemon.id().expect("a running daemon") as i32);
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let _ = tokio::time::timeout(PATIENCE, daemon.wait()).await;
}

fn instance_name(t: &Value) -> String {
    let task = t["task"].as_str().unwrap_or_default();
    match t["map_index"].as_i64() {
        Some(i) if i >= 0 => format!("{task}[{i}]"),
        _ => task.to_string(),
    }
}

fn state(tasks: &BTreeMap<String, Value>, name: &str) -> String {
    tasks
        .get(name)
        .and_then(|t| t["state"].as_str())
        .unwrap_or("(missing)")
        .to_string()
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(3000);
    text[text.floor_char_boundary(start)..].to_string()
}

fn ts(v: &Value) -> jiff::Timestamp {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a time: {v}"))
}

fn alive(pid: i32) -> bool {
    // A zombie has exited; only a live process counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// Pids of live processes whose environment holds `marker` (`K=V`).
fn processes_with(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()) && alive(pid) {
            found.push(pid);
        }
    }
    found
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

// ---------------------------------------------------------------------
// Seed 004 end to end
// ---------------------------------------------------------------------

/// The fixture site of the seed-004 example, on a free port.
struct Site {
    /// Killed when the site is dropped.
    _child: tokio::process::Child,
    url: String,
}

impl Site {
    async fn start() -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = tokio::process::Command::new("python3")
            .arg(repo().join("examples/seed-004/site.py"))
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs the fixture site (apt install python3)");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the site starts")
            .expect("reads")
            .expect("a line");
        let url = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim()
            .to_string();
        Self { _child: child, url }
    }
}

/// The example's configuration, with its scripts' directory made absolute
/// so it runs from the test's directory.
fn seed_004_workflows() -> String {
    let text = std::fs::read_to_string(repo().join("examples/seed-004/caudal.toml"))
        .expect("examples/seed-004/caudal.toml");
    let scrapers = repo().join("examples/seed-004/scrapers");
    let scrapers = scrapers.canonicalize().expect("the scrapers directory");
    let body = text
        .split_once("[pools.")
        .map(|(_, rest)| format!("[pools.{rest}"))
        .expect("the example defines a pool");
    body.replace(
        "cwd = \"scrapers\"",
        &format!("cwd = \"{}\"", scrapers.display()),
    )
}

#[derive(Debug)]
struct Event {
    script: String,
    start: bool,
    time: f64,
    args: Vec<String>,
}

fn ledger(path: &Path) -> Vec<Event> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a ledger line");
            Event {
                script: v["script"].as_str().unwrap_or_default().to_string(),
                start: v["event"] == "start",
                time: v["time"].as_f64().unwrap_or_default(),
                args: v["args"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect()
}

fn url_column(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut urls: Vec<String> = text.lines().skip(1).map(str::to_string).collect();
    urls.sort();
    urls
}

async fn seed_004(flow: Flow) {
    let site = Site::start().await;
    flow.write(&seed_004_workflows());
    let ledger_path = flow.path("ledger.jsonl");
    let site_param = format!("site={}", site.url);
    let mut command = flow.command(&[
        "workflow",
        "run",
        "seed004",
        "--param",
        &site_param,
        "--wait",
    ]);
    // Each script holds its slot a while, so the pool is saturated and
    // the order of starts shows the priorities.
    command
        .env("SEED004_LEDGER", &ledger_path)
        .env("SEED004_HOLD_MS", "400");
    let out = tokio::time::timeout(PATIENCE, command.output())
        .await
        .expect("the workflow ends")
        .expect("caudal runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "workflow failed: {stderr}");
    drop(site);

    let events = ledger(&ledger_path);
    let mains = ["inm24", "cyt", "lam", "mit", "prop", "tro"];
    let first = |script: &str, start: bool| -> f64 {
        events
            .iter()
            .filter(|e| e.script == script && e.start == start)
            .map(|e| e.time)
            .fold(f64::NAN, f64::min)
    };
    // The pool's three slots go to priorities 1-3 first: 4-6 start only
    // after one of those ended.
    let first_end = ["inm24", "cyt", "lam"]
        .iter()
        .map(|s| first(s, false))
        .fold(f64::INFINITY, f64::min);
    for late in ["mit", "prop", "tro"] {
        assert!(
            first(late, true) >= first_end,
            "{late} started before a slot was free"
        );
    }
    // The executor started them in priority order (its own record).
    let attempts = flow.attempts(1).await;
    let started = |task: &str| -> jiff::Timestamp {
        attempts
            .iter()
            .find(|a| a["task"] == task)
            .map(|a| ts(&a["started_at"]))
            .unwrap_or_else(|| panic!("no attempt of {task}"))
    };
    for pair in mains.windows(2) {
        assert!(
            started(pair[0]) <= started(pair[1]),
            "{} after {}",
            pair[0],
            pair[1]
        );
    }
    // Never more than three scrapers at once.
    let mut edges: Vec<(f64, i32)> = events
        .iter()
        .map(|e| (e.time, if e.start { 1 } else { -1 }))
        .collect();
    edges.sort_by(|a, b| a.partial_cmp(b).expect("times compare"));
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    assert!(most <= 3, "{most} scrapers ran at once in a pool of 3");
    assert!(most >= 2, "the pool never ran two at once ({most})");
    // Detail scrapers start after their main scraper ended and get exactly
    // the URLs it found, each once.
    let run_dir = flow.path("runs/seed004/1");
    for (main, detail) in [("inm24", "inm24_det"), ("lam", "lam_det")] {
        let ended = first(main, false);
        let mut got: Vec<String> = Vec::new();
        for e in events.iter().filter(|e| e.script == detail && e.start) {
            assert!(e.time >= ended, "{detail} started before {main} ended");
            // Arguments: --out FILE URL...
            got.extend(e.args.iter().skip(2).cloned());
        }
        got.sort();
        let found = url_column(&run_dir.join(format!("{main}_urls.csv")));
        assert_eq!(got.len(), 15, "{detail}: {} URLs", got.len());
        assert_eq!(got, found, "{detail} got other URLs than {main} found");
    }
    // The report ran last and saw every file.
    let tasks = flow.tasks(1).await;
    assert!(
        tasks.values().all(|t| t["state"] == "succeeded"),
        "{tasks:?}"
    );
    let report = &tasks["report"]["outputs"];
    assert_eq!(report["listings"], 90, "{report}");
    assert_eq!(report["details"], 30, "{report}");
    let report_start = started("report");
    for a in attempts.iter().filter(|a| a["task"] != "report") {
        assert!(
            ts(&a["ended_at"]) <= report_start,
            "report started before {}",
            a["task"]
        );
    }
    flow.cleanup().await;
}

#[tokio::test]
async fn seed_004_phases_priorities_pool_and_fan_out_on_sqlite() {
    seed_004(Flow::sqlite()).await;
}

#[tokio::test]
async fn seed_004_phases_priorities_pool_and_fan_out_on_postgres() {
    seed_004(Flow::postgres().await).await;
}

// ---------------------------------------------------------------------
// kill -9 of the daemon during a fan-out of 500
// ---------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

async fn kill_9_cycles(flow: Flow, cycles: u32) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64 | 1);
    let mut rng = Rng(seed);
    let mark = format!("CRASH_MARK={seed}");
    let ledger = flow.path("ledger.txt");
    flow.write(&format!(
        r#"
[pools.workers]
slots = 4

[workflows.crash.tasks.list]
type = "command"
run = ["sh", "-c", "seq 1 500 > \"$CAUDAL_ITEMS\""]
retry = {{ strategy = "fixed", initial = "10ms", jitter = 0, max_attempts = 1000 }}

[workflows.crash.tasks.work]
type = "command"
depends_on = ["list"]
for_each = "{{{{ tasks.list.items }}}}"
pool = "workers"
run = ["sh", "-c", "sleep 0.05; echo \"$1 $CAUDAL_ATTEMPT\" >> \"$2\"", "sh", "{{{{ item }}}}", "{ledger}"]
env = {{ CRASH_MARK = "{seed}" }}
retry = {{ strategy = "fixed", initial = "10ms", jitter = 0, max_attempts = 1000 }}
"#,
        ledger = ledger.display()
    ));
    let (code, _, err) = flow.caudal(&["workflow", "run", "crash"]).await;
    assert_eq!(code, 0, "{err}");
    for _ in 0..cycles {
        let mut daemon = flow.daemon();
        let pid = Pid::from_raw(daemon.id().expect("pid") as i32);
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        kill(pid, Signal::SIGKILL).expect("kill -9");
        let _ = daemon.wait().await;
    }
    let mut daemon = flow.daemon();
    let state = flow.wait_ended(1).await;
    stop(&mut daemon).await;
    assert_eq!(
        state,
        "succeeded",
        "seed {seed}; log:\n{}",
        tail(&flow.path("daemon.log"))
    );

    // Every item's task succeeded exactly once, and its ledger line is
    // there; every ledger line belongs to a recorded attempt.
    let attempts = flow.attempts(1).await;
    let mut by_instance: BTreeMap<i64, Vec<&Value>> = BTreeMap::new();
    for a in attempts.iter().filter(|a| a["task"] == "work") {
        by_instance
            .entry(a["map_index"].as_i64().unwrap_or(-1))
            .or_default()
            .push(a);
    }
    assert_eq!(by_instance.len(), 500, "seed {seed}");
    let lines: BTreeSet<(String, u64)> = std::fs::read_to_string(&ledger)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (item, attempt) = l.split_once(' ')?;
            Some((item.to_string(), attempt.parse().ok()?))
        })
        .collect();
    let mut recorded = BTreeSet::new();
    for (index, list) in &by_instance {
        let item = (index + 1).to_string();
        let ok: Vec<&&Value> = list.iter().filter(|a| a["state"] == "succeeded").collect();
        assert_eq!(
            ok.len(),
            1,
            "seed {seed}: work[{index}] succeeded {} times",
            ok.len()
        );
        let n = ok[0]["attempt"].as_u64().unwrap_or(0);
        assert!(
            lines.contains(&(item.clone(), n)),
            "seed {seed}: no ledger line for item {item} attempt {n}"
        );
        // Attempts of one instance never overlap.
        let mut spans: Vec<(jiff::Timestamp, jiff::Timestamp)> = list
            .iter()
            .map(|a| (ts(&a["started_at"]), ts(&a["ended_at"])))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "seed {seed}: work[{index}] ran twice at once"
            );
        }
        for a in list {
            recorded.insert((item.clone(), a["attempt"].as_u64().unwrap_or(0)));
            assert!(
                matches!(a["state"].as_str(), Some("succeeded" | "lost" | "failed")),
                "seed {seed}: attempt state {}",
                a["state"]
            );
        }
    }
    for line in &lines {
        assert!(
            recorded.contains(line),
            "seed {seed}: ledger line {line:?} of an unrecorded attempt"
        );
    }
    // The kills did land while attempts ran.
    let lost = attempts.iter().filter(|a| a["state"] == "lost").count();
    assert!(
        lost > 0,
        "seed {seed}: no attempt was lost: the kills missed the run"
    );
    // Nothing the attempts started is left.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = processes_with(&mark);
    assert!(left.is_empty(), "seed {seed}: orphans {left:?}");
    flow.cleanup().await;
}

#[tokio::test]
async fn kill_9_at_random_moments_during_a_fan_out_of_500_on_sqlite() {
    kill_9_cycles(Flow::sqlite(), 20).await;
}

#[tokio::test]
async fn kill_9_at_random_moments_during_a_fan_out_of_500_on_postgres() {
    kill_9_cycles(Flow::postgres().await, 8).await;
}

// ---------------------------------------------------------------------
// Timeouts, retries, trigger rules
// ---------------------------------------------------------------------

#[tokio::test]
async fn timeouts_kill_the_group_retries_follow_the_policy_and_rules_propagate() {
    let flow = Flow::sqlite();
    flow.write(
        r#"
[workflows.rules.tasks.slow]
type = "command"
run = ["sh", "-c", "sleep 300 & echo $! > \"$CAUDAL_RUN_DIR/bg.$CAUDAL_ATTEMPT\"; sleep 300"]
timeout = "1s"
retry = { strategy = "fixed", initial = "1500ms", jitter = 0, max_attempts = 2 }

[workflows.rules.tasks.ok]
type = "command"
run = ["true"]

[workflows.rules.tasks.skip]
type = "command"
run = ["sh", "-c", "exit 99"]

[workflows.rules.tasks.after_slow]
type = "command"
depends_on = ["slow"]
run = ["true"]

[workflows.rules.tasks.chain]
type = "command"
depends_on = ["after_slow"]
run = ["true"]

[workflows.rules.tasks.after_slow_all_done]
type = "command"
depends_on = ["slow"]
trigger_rule = "all_done"
run = ["true"]

[workflows.rules.tasks.one_of_slow_ok]
type = "command"
depends_on = ["slow", "ok"]
trigger_rule = "one_success"
run = ["true"]

[workflows.rules.tasks.one_of_none]
type = "command"
depends_on = ["slow", "after_slow"]
trigger_rule = "one_success"
run = ["true"]

[workflows.rules.tasks.after_skip]
type = "command"
depends_on = ["skip", "ok"]
run = ["true"]

[workflows.rules.tasks.after_after_skip]
type = "command"
depends_on = ["after_skip"]
run = ["true"]
"#,
    );
    let (code, _, err) = flow.caudal(&["workflow", "run", "rules", "--wait"]).await;
    assert_eq!(code, 1, "the run fails: {err}");
    let tasks = flow.tasks(1).await;
    let expected = [
        ("slow", "failed"),
        ("ok", "succeeded"),
        ("skip", "skipped"),
        ("after_slow", "upstream_failed"),
        ("chain", "upstream_failed"),
        ("after_slow_all_done", "succeeded"),
        ("one_of_slow_ok", "succeeded"),
        ("one_of_none", "upstream_failed"),
        ("after_skip", "skipped"),
        ("after_after_skip", "skipped"),
    ];
    for (task, want) in expected {
        assert_eq!(state(&tasks, task), want, "{task}");
    }
    assert_eq!(flow.run_info(1).await["state"], "failed");
    let slow: Vec<Value> = flow
        .attempts(1)
        .await
        .into_iter()
        .filter(|a| a["task"] == "slow")
        .collect();
    assert_eq!(slow.len(), 2, "two attempts: {slow:?}");
    for a in &slow {
        assert_eq!(a["state"], "timed_out");
        let took = ts(&a["ended_at"]).duration_since(ts(&a["started_at"]));
        assert!(
            took >= jiff::SignedDuration::from_secs(1),
            "killed before its timeout: {took}"
        );
    }
    let gap = ts(&slow[1]["started_at"]).duration_since(ts(&slow[0]["ended_at"]));
    assert!(
        gap >= jiff::SignedDuration::from_millis(1500),
        "retried after {gap}, not 1.5s"
    );
    // The background sleep of each attempt died with its group.
    for n in 1..=2 {
        let pid: i32 = std::fs::read_to_string(flow.path(&format!("runs/rules/1/bg.{n}")))
            .expect("the attempt wrote its child's pid")
            .trim()
            .parse()
            .expect("a pid");
        assert!(
            !alive(pid),
            "attempt {n}'s background process {pid} outlived it"
        );
    }
    flow.cleanup().await;
}

#[tokio::test]
async fn cancel_stops_running_tasks_and_the_rest() {
    let flow = Flow::sqlite();
    flow.write(
        r#"
[workflows.long.tasks.sleeper]
type = "command"
run = ["sh", "-c", "echo $$ > \"$CAUDAL_RUN_DIR/pid\"; sleep 300"]

[workflows.long.tasks.next]
type = "command"
depends_on = ["sleeper"]
run = ["true"]
"#,
    );
    let mut waiting = flow
        .command(&["workflow", "run", "long", "--wait"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("caudal runs");
    let pid_file = flow.path("runs/long/1/pid");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !pid_file.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the task never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    let (code, _, err) = flow.caudal(&["workflow", "cancel", "1"]).await;
    assert_eq!(code, 0, "{err}");
    let status = tokio::time::timeout(PATIENCE, waiting.wait())
        .await
        .expect("the run ends after cancel")
        .expect("wait");
    assert_eq!(status.code(), Some(1), "a cancelled run is not a success");
    assert_eq!(flow.run_info(1).await["state"], "cancelled");
    let tasks = flow.tasks(1).await;
    assert_eq!(state(&tasks, "sleeper"), "cancelled");
    assert_eq!(state(&tasks, "next"), "cancelled");
    assert!(!alive(pid), "the task's process {pid} survived the cancel");
    let (code, _, err) = flow.caudal(&["workflow", "cancel", "1"]).await;
    assert_eq!(code, 1, "cancelling an ended run is refused");
    assert!(err.contains("already ended"), "{err}");
    flow.cleanup().await;
}

async fn retry_failed(flow: Flow) {
    let ledger = flow.path("ledger.txt");
    let flag = flow.path("flag");
    flow.write(&format!(
        r#"
[workflows.again.tasks.a]
type = "command"
run = ["sh", "-c", "echo a >> {ledger}"]

[workflows.again.tasks.b]
type = "command"
depends_on = ["a"]
run = ["sh", "-c", "echo b >> {ledger}; test -e {flag} || {{ touch {flag}; echo first time >&2; exit 3; }}"]

[workflows.again.tasks.c]
type = "command"
depends_on = ["b"]
run = ["sh", "-c", "echo c >> {ledger}"]
"#,
        ledger = ledger.display(),
        flag = flag.display()
    ));
    let (code, _, err) = flow.caudal(&["workflow", "run", "again", "--wait"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("exited with code 3"), "{err}");
    let tasks = flow.tasks(1).await;
    assert_eq!(state(&tasks, "b"), "failed");
    assert_eq!(state(&tasks, "c"), "upstream_failed");
    let attempts = flow.attempts(1).await;
    let b = attempts
        .iter()
        .find(|a| a["task"] == "b")
        .expect("b's attempt");
    assert_eq!(b["exit_code"], 3);
    assert!(
        b["stderr_tail"]
            .as_str()
            .unwrap_or_default()
            .contains("first time"),
        "{b}"
    );
    let (code, out, err) = flow
        .caudal(&["workflow", "logs", "1", "b", "--stderr"])
        .await;
    assert_eq!((code, out.as_str()), (0, "first time\n"), "{err}");
    // A silent attempt has no output file, and no output.
    let (code, out, err) = flow.caudal(&["workflow", "logs", "1", "a"]).await;
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    let (code, _, err) = flow
        .caudal(&["workflow", "retry", "1", "--failed", "--wait"])
        .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = flow
        .caudal(&["workflow", "logs", "1", "b", "--stderr", "--attempt", "1"])
        .await;
    assert_eq!((code, out.as_str()), (0, "first time\n"), "{err}");
    let ran = std::fs::read_to_string(&ledger).expect("ledger");
    assert_eq!(ran, "a\nb\nb\nc\n", "only the failed tasks ran again");
    let tasks = flow.tasks(1).await;
    assert!(
        tasks.values().all(|t| t["state"] == "succeeded"),
        "{tasks:?}"
    );
    // Retrying a whole run reruns every task.
    let (code, _, err) = flow.caudal(&["workflow", "retry", "1", "--wait"]).await;
    assert_eq!(code, 0, "{err}");
    let ran = std::fs::read_to_string(&ledger).expect("ledger");
    assert_eq!(ran, "a\nb\nb\nc\na\nb\nc\n");
    flow.cleanup().await;
}

#[tokio::test]
async fn retry_of_failed_tasks_reruns_only_those_on_sqlite() {
    retry_failed(Flow::sqlite()).await;
}

#[tokio::test]
async fn retry_of_failed_tasks_reruns_only_those_on_postgres() {
    retry_failed(Flow::postgres().await).await;
}

// ---------------------------------------------------------------------
// Outputs, items, params, and tasks that cannot run
// ---------------------------------------------------------------------

#[tokio::test]
async fn outputs_items_and_params_reach_downstream_and_bad_tasks_fail_clearly() {
    let flow = Flow::sqlite();
    flow.write(
        r#"
[workflows.data]
params = { n = 2, word = "x" }

[workflows.data.tasks.produce]
type = "command"
run = ["sh", "-c", "echo '{\"count\": 3}' >> \"$CAUDAL_OUTPUT\"; printf 'u1\\nu2\\n' > \"$CAUDAL_ITEMS\""]

[workflows.data.tasks.consume]
type = "command"
depends_on = ["produce"]
run = ["sh", "-c", "echo \"$1 $2 $3 $4\" > \"$CAUDAL_RUN_DIR/consume.txt\"", "sh",
       "{{ tasks.produce.outputs.count }}", "{{ params.n }}", "{{ tasks.produce.items | join(',') }}", "{{ params.word }}"]

[workflows.data.tasks.each]
type = "command"
depends_on = ["produce"]
for_each = "{{ tasks.produce.items }}"
run = ["sh", "-c", "echo \"{\\\"seen\\\": \\\"$1\\\"}\" >> \"$CAUDAL_OUTPUT\"", "sh", "{{ item }}"]

[workflows.data.tasks.reduce]
type = "command"
depends_on = ["each"]
run = ["sh", "-c", "echo \"$1\" > \"$CAUDAL_RUN_DIR/reduce.txt\"", "sh", "{{ tasks.each.results | map(attribute='seen') | join('+') }}"]

[workflows.data.tasks.missing_output]
type = "command"
depends_on = ["produce"]
run = ["echo", "{{ tasks.produce.outputs.nope }}"]

[workflows.data.tasks.missing_script]
type = "command"
run = ["python3", "does_not_exist.py"]

[workflows.data.tasks.missing_program]
type = "command"
run = ["no-such-program-here"]

[workflows.data.tasks.bad_items]
type = "command"
run = ["true"]
items_from = "{{ run.dir }}/never_written.csv"
"#,
    );
    let (code, _, err) = flow
        .caudal(&["workflow", "run", "data", "--param", "n=5", "--wait"])
        .await;
    assert_eq!(code, 1, "{err}");
    let dir = flow.path("runs/data/1");
    let consumed = std::fs::read_to_string(dir.join("consume.txt")).expect("consume ran");
    assert_eq!(consumed, "3 5 u1,u2 x\n");
    let reduced = std::fs::read_to_string(dir.join("reduce.txt")).expect("reduce ran");
    assert_eq!(reduced, "u1+u2\n");
    let tasks = flow.tasks(1).await;
    assert_eq!(state(&tasks, "each[0]"), "succeeded");
    assert_eq!(state(&tasks, "each[1]"), "succeeded");
    let error = |t: &str| tasks[t]["error"].as_str().unwrap_or_default().to_string();
    assert_eq!(state(&tasks, "missing_output"), "failed");
    assert!(
        error("missing_output").contains("tasks.produce.outputs.nope"),
        "{}",
        error("missing_output")
    );
    assert!(
        error("missing_script").contains("exited with code 2"),
        "{}",
        error("missing_script")
    );
    assert!(
        error("missing_program").contains("no such program"),
        "{}",
        error("missing_program")
    );
    assert!(
        error("bad_items").contains("never_written.csv"),
        "{}",
        error("bad_items")
    );
    let attempts = flow.attempts(1).await;
    let script = attempts
        .iter()
        .find(|a| a["task"] == "missing_script")
        .expect("attempt");
    assert!(
        script["stderr_tail"]
            .as_str()
            .unwrap_or_default()
            .contains("does_not_exist.py"),
        "{script}"
    );
    // An undeclared parameter is refused before a run exists.
    let (code, _, err) = flow
        .caudal(&["workflow", "run", "data", "--param", "m=1"])
        .await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no parameter `m`") && err.contains("n, word"),
        "{err}"
    );
    let (code, _, err) = flow.caudal(&["workflow", "run", "nothing"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no workflow named \"nothing\""), "{err}");
    flow.cleanup().await;
}

#[tokio::test]
async fn bad_workflow_configuration_is_reported_at_its_lines() {
    let flow = Flow::sqlite();
    flow.write(
        r#"[pools.p]
slots = 0
rate = "lots"

[workflows.bad.tasks.a]
type = "command"
run = ["true"]
depends_on = ["b"]
pool = "nope"

[workflows.bad.tasks.b]
type = "command"
run = ["echo", "{{ params.missing }}", "{{ tasks.c.outputs.x }}", "{{ item }}"]
depends_on = ["a"]

[workflows.bad.tasks.c]
type = "command"
depends_on = ["ghost"]
url = "http://example.invalid"
run = ["true"]

[workflows.bad.tasks.d]
type = "pipeline"
pipeline = "absent"
retry = { max_attempts = 0, jitter = 2.0 }
"#,
    );
    let (code, _, err) = flow.caudal(&["validate"]).await;
    assert_eq!(code, 2, "{err}");
    let config = flow.config().display().to_string();
    let expect = [
        (6, "pools.p.slots: must be at least 1"),
        (7, "pools.p.rate: invalid rate"),
        (
            12,
            "workflows.bad.tasks.a.depends_on: tasks depend on each other in a cycle: a → b → a",
        ),
        (13, "workflows.bad.tasks.a.pool: unknown pool \"nope\""),
        (17, "`params.missing` is not declared"),
        (17, "`tasks.c` is not upstream of this task"),
        (17, "`item` exists only in a task with `for_each`"),
        (
            22,
            "workflows.bad.tasks.c.depends_on[0]: unknown task \"ghost\"",
        ),
        (
            23,
            "workflows.bad.tasks.c.url: `url` applies only to http tasks",
        ),
        (
            28,
            "workflows.bad.tasks.d.pipeline: unknown pipeline \"absent\"",
        ),
        (29, "max_attempts: must be at least 1"),
        (29, "jitter: must be between 0 and 1"),
    ];
    for (line, text) in expect {
        let found = err
            .lines()
            .any(|l| l.contains(&format!("{config}:{line}:")) && l.contains(text));
        assert!(found, "no `{text}` at line {line}:\n{err}");
    }
    flow.cleanup().await;
}

// ---------------------------------------------------------------------
// HTTP tasks, notifications, schedules, backfill
// ---------------------------------------------------------------------

#[tokio::test]
async fn http_tasks_and_the_end_of_run_notification() {
    let receiver = Receiver::start().await;
    let flow = Flow::sqlite();
    flow.write(&format!(
        r#"
[workflows.ping]
params = {{ who = "caudal" }}
notify = {{ url = "{notify}", on = "always" }}

[workflows.ping.tasks.hello]
type = "http"
url = "{hello}"
body = '{{"from": "{{{{ params.who }}}}"}}'
headers = {{ "Content-Type" = "application/json" }}
"#,
        notify = receiver.url("/notify"),
        hello = receiver.url("/hello"),
    ));
    let (code, _, err) = flow.caudal(&["workflow", "run", "ping", "--wait"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        receiver.wait_for_requests(2, PATIENCE).await,
        "two requests"
    );
    let requests = receiver.requests();
    let hello = requests
        .iter()
        .find(|r| r.path == "/hello")
        .expect("the task's request");
    assert_eq!(hello.method, "POST");
    assert_eq!(
        hello.json.as_ref().map(|j| j["from"].clone()),
        Some(Value::from("caudal"))
    );
    let note = requests
        .iter()
        .find(|r| r.path == "/notify")
        .expect("the notification");
    let body = note.json.clone().expect("a JSON summary");
    assert_eq!(body["workflow"], "ping");
    assert_eq!(body["state"], "succeeded");
    assert_eq!(body["tasks"]["succeeded"], 1);
    let tasks = flow.tasks(1).await;
    assert_eq!(tasks["hello"]["outputs"]["status"], 200);
    flow.cleanup().await;
}

#[tokio::test]
async fn backfill_runs_each_schedule_time_in_order_and_scheduled_runs_never_overlap() {
    let flow = Flow::sqlite();
    let ledger = flow.path("ledger.txt");
    flow.write(&format!(
        r#"
[workflows.daily]
schedule = {{ cron = "0 6 * * *", tz = "America/Mexico_City" }}

[workflows.daily.tasks.day]
type = "command"
run = ["sh", "-c", "echo {{{{ run.date }}}} {{{{ run.triggered_by }}}} >> {ledger}"]

[workflows.often]
schedule = {{ every = "1s" }}

[workflows.often.tasks.slow]
type = "command"
run = ["sleep", "2.5"]
"#,
        ledger = ledger.display()
    ));
    let (code, out, err) = flow
        .caudal(&[
            "workflow",
            "backfill",
            "daily",
            "--from",
            "2026-01-01",
            "--to",
            "2026-01-04",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 runs of daily queued"), "{out}");
    let mut daemon = flow.daemon();
    for run in 1..=3 {
        assert_eq!(flow.wait_ended(run).await, "succeeded");
    }
    // Let `often` be due while its run is still going.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop(&mut daemon).await;
    let ran = std::fs::read_to_string(&ledger).expect("ledger");
    assert_eq!(
        ran, "2026-01-01 backfill\n2026-01-02 backfill\n2026-01-03 backfill\n",
        "one run per 06:00 in Mexico City (12:00 UTC), oldest first"
    );
    let runs = flow
        .json_lines(&["workflow", "status", "--workflow", "often", "--json"])
        .await;
    assert!(!runs.is_empty(), "the schedule started runs");
    let mut spans: Vec<(jiff::Timestamp, Option<jiff::Timestamp>)> = runs
        .iter()
        .filter(|r| r["started_at"].is_string())
        .map(|r| {
            (
                ts(&r["started_at"]),
                r["ended_at"].as_str().and_then(|t| t.parse().ok()),
            )
        })
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        let end = w[0].1.expect("an earlier run ended");
        assert!(
            end <= w[1].0,
            "scheduled runs overlapped (overlap = \"skip\")"
        );
    }
    flow.cleanup().await;
}

#[tokio::test]
async fn after_downtime_every_missed_time_runs_with_catchup_all() {
    let flow = Flow::sqlite();
    flow.write(
        r#"
[workflows.tick]
schedule = { every = "1s" }
catchup = "all"

[workflows.tick.tasks.t]
type = "command"
run = ["true"]
"#,
    );
    let mut daemon = flow.daemon();
    assert_eq!(flow.wait_ended(1).await, "succeeded");
    stop(&mut daemon).await;
    let before: Vec<Value> = flow
        .json_lines(&[
            "workflow",
            "status",
            "--workflow",
            "tick",
            "--limit",
            "1000",
            "--json",
        ])
        .await;
    let last = before
        .iter()
        .filter_map(|r| r["logical_date"].as_str().map(|t| ts(&Value::from(t))))
        .max()
        .expect("a scheduled run");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let restart = jiff::Timestamp::now();
    let mut daemon = flow.daemon();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop(&mut daemon).await;
    let after: Vec<Value> = flow
        .json_lines(&[
            "workflow",
            "status",
            "--workflow",
            "tick",
            "--limit",
            "1000",
            "--json",
        ])
        .await;
    // Every whole second of the downtime got its run, once, in order.
    let mut missed: Vec<jiff::Timestamp> = after
        .iter()
        .filter(|r| r["state"] == "succeeded")
        .filter_map(|r| r["logical_date"].as_str().map(|t| ts(&Value::from(t))))
        .filter(|t| *t > last && *t < restart)
        .collect();
    missed.sort();
    let expected = (restart.duration_since(last).as_secs_f64()).floor() as usize;
    assert!(
        missed.len() >= 4,
        "{} missed runs ran: {missed:?}",
        missed.len()
    );
    assert!(
        missed.len() <= expected,
        "more runs than missed times: {missed:?}"
    );
    for w in missed.windows(2) {
        assert_eq!(
            w[1].duration_since(w[0]),
            jiff::SignedDuration::from_secs(1)
        );
    }
    flow.cleanup().await;
}

#[tokio::test]
async fn old_runs_are_pruned_with_their_directories() {
    let flow = Flow::sqlite();
    flow.write(
        r#"
[retention]
workflow_runs_max_age = "1s"

[workflows.once.tasks.t]
type = "command"
run = ["sh", "-c", "echo kept > \"$CAUDAL_RUN_DIR/file\""]
"#,
    );
    let (code, _, err) = flow.caudal(&["workflow", "run", "once", "--wait"]).await;
    assert_eq!(code, 0, "{err}");
    let dir = flow.path("runs/once/1");
    assert!(dir.join("file").exists(), "the run wrote its file");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // `caudal run` prunes at start.
    let mut daemon = flow.daemon();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (code, _, _) = flow.caudal(&["workflow", "status", "1"]).await;
        if code != 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run 1 was never pruned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(&mut daemon).await;
    assert!(!dir.exists(), "its directory was removed");
    let (code, _, err) = flow.caudal(&["workflow", "status", "1"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no workflow run 1"), "{err}");
    flow.cleanup().await;
}

#[tokio::test]
async fn a_pool_rate_spaces_starts_and_a_deadline_bounds_all_attempts() {
    let flow = Flow::sqlite();
    flow.write(
        r#"
[pools.site]
slots = 10
rate = "2/sec"

[workflows.polite.tasks.list]
type = "command"
run = ["sh", "-c", "seq 1 6 > \"$CAUDAL_ITEMS\""]

[workflows.polite.tasks.fetch]
type = "command"
depends_on = ["list"]
for_each = "{{ tasks.list.items }}"
pool = "site"
run = ["true"]

[workflows.polite.tasks.stubborn]
type = "command"
run = ["sh", "-c", "sleep 1; exit 1"]
deadline = "1500ms"
retry = { strategy = "fixed", initial = "100ms", jitter = 0, max_attempts = 10 }
"#,
    );
    let (code, _, err) = flow.caudal(&["workflow", "run", "polite", "--wait"]).await;
    assert_eq!(code, 1, "stubborn fails: {err}");
    let attempts = flow.attempts(1).await;
    let mut starts: Vec<jiff::Timestamp> = attempts
        .iter()
        .filter(|a| a["task"] == "fetch")
        .map(|a| ts(&a["started_at"]))
        .collect();
    starts.sort();
    assert_eq!(starts.len(), 6);
    // At most 2 starts in any second: the third after the first is a
    // second later or more.
    for w in starts.windows(3) {
        let gap = w[2].duration_since(w[0]);
        assert!(
            gap >= jiff::SignedDuration::from_millis(990),
            "3 starts within {gap}"
        );
    }
    let stubborn: Vec<&Value> = attempts
        .iter()
        .filter(|a| a["task"] == "stubborn")
        .collect();
    assert_eq!(
        stubborn.len(),
        2,
        "a second attempt, cut at the deadline: {stubborn:?}"
    );
    assert_eq!(stubborn[1]["state"], "timed_out");
    let why = stubborn[1]["error"].as_str().unwrap_or_default();
    assert!(why.contains("deadline"), "{why}");
    let tasks = flow.tasks(1).await;
    assert_eq!(state(&tasks, "stubborn"), "failed");
    assert_eq!(state(&tasks, "fetch"), "succeeded");
    flow.cleanup().await;
}

#[tokio::test]
async fn a_pipeline_task_runs_the_pipeline_once_and_returns_its_counts() {
    let world = support::World::sqlite().await;
    world.insert(1..=25, 1).await;
    let config = format!(
        "{}\n[workflows.sync.tasks.load]\ntype = \"pipeline\"\npipeline = \"{}\"\n\n\
         [workflows.sync.tasks.after]\ntype = \"command\"\ndepends_on = [\"load\"]\n\
         run = [\"sh\", \"-c\", \"test $1 = 25\", \"sh\", \"{{{{ tasks.load.outputs.rows_read }}}}\"]\n",
        world.config_toml(),
        support::PIPELINE
    );
    let path = world.dir.path().join("with-workflow.toml");
    std::fs::write(&path, config).expect("write the configuration");
    let out = world
        .caudal_with(&path, &["workflow", "run", "sync", "--wait"])
        .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    world.wait_for_delivered(25).await;
    assert_eq!(world.delivery_counts().len(), 25, "every row delivered");
    world.cleanup().await;
}

#[tokio::test]
async fn a_queued_run_cancelled_while_it_waits_ends_at_once() {
    let flow = Flow::sqlite();
    flow.write(
        r#"
[workflows.one_at_a_time.tasks.sleeper]
type = "command"
run = ["sleep", "300"]
"#,
    );
    for _ in 0..2 {
        let (code, _, err) = flow.caudal(&["workflow", "run", "one_at_a_time"]).await;
        assert_eq!(code, 0, "{err}");
    }
    let mut daemon = flow.daemon();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while flow.run_info(1).await["state"] != "running" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "run 1 never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Run 2 waits for run 1 (overlap = "skip" runs them one at a time).
    assert_eq!(flow.run_info(2).await["state"], "queued");
    let (code, _, err) = flow.caudal(&["workflow", "cancel", "2"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(flow.wait_ended(2).await, "cancelled");
    assert_eq!(flow.run_info(1).await["state"], "running", "run 1 goes on");
    let tasks = flow.tasks(2).await;
    assert_eq!(state(&tasks, "sleeper"), "cancelled");
    let (code, _, err) = flow.caudal(&["workflow", "cancel", "1"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(flow.wait_ended(1).await, "cancelled");
    stop(&mut daemon).await;
    flow.cleanup().await;
}

#[tokio::test]
async fn overlap_queue_one_waits_in_line_and_allow_runs_side_by_side() {
    let flow = Flow::sqlite();
    flow.write(
        r#"
[workflows.in_line]
schedule = { every = "1s" }
overlap = "queue_one"

[workflows.in_line.tasks.slow]
type = "command"
run = ["sleep", "2.5"]

[workflows.side_by_side]
schedule = { every = "1s" }
overlap = "allow"

[workflows.side_by_side.tasks.slow]
type = "command"
run = ["sleep", "2.5"]
"#,
    );
    let mut daemon = flow.daemon();
    tokio::time::sleep(Duration::from_secs(7)).await;
    stop(&mut daemon).await;
    let flow_ref = &flow;
    let runs = |name: &'static str| async move {
        let mut rows = flow_ref
            .json_lines(&["workflow", "status", "--workflow", name, "--json"])
            .await;
        rows.sort_by_key(|r| r["id"].as_i64());
        rows
    };
    let spans = |rows: &[Value]| -> Vec<(jiff::Timestamp, Option<jiff::Timestamp>)> {
        rows.iter()
            .filter(|r| r["started_at"].is_string())
            .map(|r| {
                (
                    ts(&r["started_at"]),
                    r["ended_at"].as_str().and_then(|t| t.parse().ok()),
                )
            })
            .collect()
    };
    // queue_one: never side by side, but the next run was already queued
    // while the one before ran (created before it ended).
    let in_line = runs("in_line").await;
    let s = spans(&in_line);
    assert!(s.len() >= 2, "{in_line:?}");
    for w in s.windows(2) {
        assert!(
            w[0].1.is_some_and(|end| end <= w[1].0),
            "in_line runs overlapped"
        );
    }
    let first_end = s[0].1.expect("run 1 ended");
    assert!(
        ts(&in_line[1]["created_at"]) < first_end,
        "run 2 was not queued while run 1 ran"
    );
    // allow: some run started while the one before still ran.
    let side = spans(&runs("side_by_side").await);
    let overlapped = side
        .windows(2)
        .any(|w| w[0].1.is_none_or(|end| w[1].0 < end));
    assert!(overlapped, "no side_by_side runs overlapped: {side:?}");
    flow.cleanup().await;
}

#[tokio::test]
async fn a_retried_run_whose_failed_task_left_the_configuration_still_ends() {
    let flow = Flow::sqlite();
    flow.write(
        r#"
[workflows.changing.tasks.ok]
type = "command"
run = ["true"]

[workflows.changing.tasks.broken]
type = "command"
run = ["false"]

[workflows.changing.tasks.each]
type = "command"
depends_on = ["ok"]
for_each = "{{ params.list }}"
run = ["false"]

[workflows.changing]
params = { list = ["a", "b"] }
"#,
    );
    let (code, _, err) = flow
        .caudal(&["workflow", "run", "changing", "--wait"])
        .await;
    assert_eq!(code, 1, "{err}");
    // `broken` is removed and `each` is no longer a fan-out: the retry
    // must not wait for them forever.
    flow.write(
        r#"
[workflows.changing.tasks.ok]
type = "command"
run = ["true"]

[workflows.changing.tasks.each]
type = "command"
depends_on = ["ok"]
run = ["true"]
"#,
    );
    let (code, _, err) = flow
        .caudal(&["workflow", "retry", "1", "--failed", "--wait"])
        .await;
    assert_ne!(code, 0, "{err}");
    let info = flow.run_info(1).await;
    assert!(
        matches!(info["state"].as_str(), Some("cancelled" | "failed")),
        "{info}"
    );
    let tasks = flow.tasks(1).await;
    assert_eq!(state(&tasks, "broken"), "cancelled");
    assert_eq!(state(&tasks, "each[0]"), "cancelled");
    flow.cleanup().await;
}

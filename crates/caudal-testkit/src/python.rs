//! The benchmarks' Python interpreter, for tests that need a second opinion
//! from outside caudal: pyarrow and DuckDB reading caudal's Parquet back, and
//! moto's S3 server (see [`S3`](crate::S3)).
//!
//! The interpreter is the one `bench/venv` creates in `target/bench-venv`
//! with the packages pinned in `bench/requirements.txt`; `scripts/test`
//! exports it as [`PYTHON_ENV`]. [`python`] hands it out and [`run_python`]
//! runs a script with it. Without it a test fails loudly, it never skips.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Environment variable with the path of the benchmarks' Python interpreter
/// (what `bench/venv` prints).
pub const PYTHON_ENV: &str = "CAUDAL_BENCH_PYTHON";

/// What to do when the interpreter or its packages are missing; every panic
/// of this module and of [`S3`](crate::S3) ends with it.
pub(crate) const PYTHON_ADVICE: &str = "The datasets tests need the benchmarks' Python \
     virtualenv (moto, pyarrow, DuckDB, pinned in bench/requirements.txt): run scripts/test, \
     which creates it with bench/venv, or run `export CAUDAL_BENCH_PYTHON=$(bench/venv)` \
     from the workspace root.";

/// The benchmarks' Python interpreter, from [`PYTHON_ENV`].
///
/// # Panics
///
/// When [`PYTHON_ENV`] is unset or names no file.
pub fn python() -> PathBuf {
    let Some(path) = env::var_os(PYTHON_ENV) else {
        panic!("caudal-testkit: {PYTHON_ENV} is not set.\n{PYTHON_ADVICE}");
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "caudal-testkit: {PYTHON_ENV} is {}, which does not exist.\n{PYTHON_ADVICE}",
        path.display()
    );
    path
}

/// Runs `python -c script args…` with the benchmarks' interpreter and returns
/// what it printed on stdout. In the script, `sys.argv[1:]` is `args`.
///
/// It blocks the calling thread until Python exits: from an async test whose
/// own in-process servers the script talks to, call it in
/// `tokio::task::spawn_blocking`.
///
/// # Panics
///
/// When there is no interpreter (see [`python`]), or when the script fails:
/// the message holds its exit status, stderr and stdout (and the usual
/// advice when a module is missing).
pub fn run_python(script: &str, args: &[&str]) -> String {
    let python = python();
    let output = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "caudal-testkit: cannot run {}: {err}\n{PYTHON_ADVICE}",
                python.display()
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let advice = if stderr.contains("ModuleNotFoundError") {
            PYTHON_ADVICE
        } else {
            ""
        };
        panic!(
            "caudal-testkit: the Python script failed ({status}) with {python}\n\
             --- script ---\n{script}\n--- args ---\n{args:?}\n\
             --- stderr ---\n{stderr}\n--- stdout ---\n{stdout}\n{advice}",
            status = output.status,
            python = python.display(),
        );
    }
    stdout
}

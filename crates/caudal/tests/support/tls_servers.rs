//! Database servers of a test's own that speak TLS only: a PostgreSQL and a
//! MariaDB in the test's temporary directory, on free loopback ports, with
//! a server certificate for 127.0.0.1 signed by a test CA
//! ([`super::tls::certificates`]). The shared servers are never touched.
//!
//! PostgreSQL's `pg_hba.conf` accepts TCP only through `hostssl` (plain
//! TCP is rejected) and has `wal_level = logical`; MariaDB runs with
//! `require_secure_transport` and a ROW binary log, and its `caudal` user is
//! created `REQUIRE SSL`. Set-up runs over each server's Unix socket.
//! Missing server binaries fail the test with what to install; nothing is
//! skipped. Servers stop when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The password of the TLS servers' client users.
pub const PASSWORD: &str = "tls-secret";

/// A free TCP port on 127.0.0.1 (free when asked).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Whether this process runs as root (its effective uid, from /proc).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Runs `cmd` to the end; fails the test with its output if it fails.
fn run(mut cmd: Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (install it, or run scripts/test)"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
fn wait_for_port(port: u16, log: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A PostgreSQL 15+ accepting TCP connections over TLS only.
pub struct TlsPostgres {
    dir: tempfile::TempDir,
    pub port: u16,
}

impl TlsPostgres {
    /// A PostgreSQL tool of the newest installed version.
    fn bin(tool: &str) -> PathBuf {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path().join("bin").join(tool))
                    .collect()
            })
            .unwrap_or_default();
        found.retain(|p| p.exists());
        found.sort();
        found.pop().unwrap_or_else(|| {
            panic!(
                "{tool} not found under /usr/lib/postgresql: install postgresql-15 \
                 (scripts/test does)"
            )
        })
    }

    /// `tool args…`, as the `postgres` user when we are root (initdb and
    /// the server refuse root).
    fn tool(tool: &str, args: &[&str]) -> Command {
        let bin = Self::bin(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        cmd.args(args);
        cmd
    }

    /// Starts a server whose certificate and key are `certs`'s
    /// `server.pem` and `server.key`.
    pub fn start(certs: &Path) -> Self {
        let dir = tempfile::tempdir().expect("a directory for the server");
        let data = dir.path().join("data");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(dir.path());
                    c
                },
                "chown",
            );
        }
        run(
            Self::tool(
                "initdb",
                &[
                    "-D",
                    data.to_str().expect("path"),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                ],
            ),
            "initdb (postgresql-15)",
        );
        // The server reads its key only when it alone may read it.
        for (from, to) in [("server.pem", "server.crt"), ("server.key", "server.key")] {
            let target = data.join(to);
            std::fs::copy(certs.join(from), &target).expect("copy the server's certificate");
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostssl replication all 127.0.0.1/32 scram-sha-256\n\
             hostnossl all all all reject\n\
             hostnossl replication all all reject\n",
        )
        .expect("write pg_hba.conf");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(&data);
                    c
                },
                "chown",
            );
        }
        let pg = Self {
            port: free_port(),
            dir,
        };
        let log = pg.dir.path().join("server.log");
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key \
             -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10",
            pg.port,
            pg.dir.path().display()
        );
        run(
            Self::tool(
                "pg_ctl",
                &[
                    "-D",
                    data.to_str().expect("path"),
                    "-l",
                    log.to_str().expect("path"),
                    "-o",
                    &opts,
                    "-w",
                    "start",
                ],
            ),
            "pg_ctl start (postgresql-15)",
        );
        wait_for_port(pg.port, &log, "the TLS PostgreSQL");
        pg.psql(&format!("ALTER USER postgres PASSWORD '{PASSWORD}'"));
        pg
    }

    /// Runs `sql` as `postgres` over the Unix socket; returns what psql
    /// printed (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    /// [`TlsPostgres::psql`] in database `db`.
    pub fn psql_in(&self, db: &str, sql: &str) -> String {
        let mut cmd = Command::new(Self::bin("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .stdin(Stdio::null());
        run(cmd, &format!("psql {sql:?}"))
    }

    /// A URL of database `db` on `host` (`127.0.0.1`, or `localhost` to
    /// connect by a name the certificate does not carry), with `options`
    /// (e.g. `sslmode=verify-full&sslrootcert=…`).
    pub fn url(&self, host: &str, db: &str, options: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@{host}:{}/{db}?{options}",
            self.port
        )
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Self::tool(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "stop",
            ],
        )
        .output();
    }
}

/// A MariaDB accepting TCP connections over TLS only, with a ROW binary
/// log so it can serve change data capture.
pub struct TlsMariadb {
    dir: tempfile::TempDir,
    pub port: u16,
    child: std::process::Child,
}

impl TlsMariadb {
    /// Starts a server presenting `certs`'s `server.pem` (signed by its
    /// `ca.pem`), with a user `caudal` (password [`PASSWORD`]) that may
    /// only connect over TLS.
    pub fn start(certs: &Path) -> Self {
        let dir = tempfile::tempdir().expect("a data directory");
        let d = dir.path();
        // A server starting deletes every `#sql*` file of its tmpdir: with
        // the shared /tmp, another test's server removed this bootstrap's
        // tables mid-way. Each server has a tmpdir of its own.
        let tmp = d.join("tmp");
        std::fs::create_dir(&tmp).expect("a temporary directory");
        let mut install = Command::new("mariadb-install-db");
        install
            .args(["--no-defaults", "--auth-root-authentication-method=normal"])
            .arg(format!("--datadir={}", d.join("data").display()))
            .args(["--user=root", "--skip-test-db"])
            .arg(format!("--tmpdir={}", tmp.display()));
        run(install, "mariadb-install-db (mariadb-server)");
        let port = free_port();
        let log = d.join("server.log");
        let file = std::fs::File::create(&log).expect("the server log");
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--socket={}", d.join("sock").display()))
            .arg(format!("--pid-file={}", d.join("pid").display()))
            .arg(format!("--log-bin={}", d.join("data/bin").display()))
            .arg(format!("--ssl-ca={}", certs.join("ca.pem").display()))
            .arg(format!("--ssl-cert={}", certs.join("server.pem").display()))
            .arg(format!("--ssl-key={}", certs.join("server.key").display()))
            .args([
                "--require-secure-transport=ON",
                "--bind-address=127.0.0.1",
                "--user=root",
                "--binlog-format=ROW",
                "--binlog-row-image=FULL",
                "--binlog-row-metadata=FULL",
                "--server-id=1",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=32M",
            ])
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start mariadbd (install mariadb-server, or run scripts/test)");
        let server = Self { dir, port, child };
        wait_for_port(port, &log, "the TLS MariaDB");
        server.sql(&format!(
            "CREATE USER caudal@'%' IDENTIFIED BY '{PASSWORD}' REQUIRE SSL; \
             GRANT ALL PRIVILEGES ON *.* TO caudal@'%'"
        ));
        server
    }

    /// Runs `sql` as root over the Unix socket; returns what the client
    /// printed (tab-separated, no column names).
    pub fn sql(&self, sql: &str) -> String {
        let mut cmd = Command::new("mariadb");
        cmd.arg("--no-defaults")
            .arg(format!(
                "--socket={}",
                self.dir.path().join("sock").display()
            ))
            .args(["-uroot", "--batch", "--skip-column-names", "-e", sql])
            .stdin(Stdio::null());
        run(cmd, &format!("mariadb {sql:?}"))
    }

    /// A URL of database `db` on `host` as the `caudal` user.
    pub fn url(&self, host: &str, db: &str) -> String {
        format!("mysql://caudal:{PASSWORD}@{host}:{}/{db}", self.port)
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for TlsMariadb {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

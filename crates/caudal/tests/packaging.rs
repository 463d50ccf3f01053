//! Packaging: `packaging/caudal.service` passes `systemd-analyze verify`,
//! and the binary runs the demo inside a minimal Debian root (debootstrap,
//! the `minbase` variant that `debian:bookworm-slim` is) holding only the
//! packages the Dockerfile's runtime stage installs: what the image needs
//! is exactly what the Dockerfile says. No image is built here (no Docker
//! daemon, no registry); debootstrap fetches Debian's packages.
//!
//! Both need root (scripts/test runs as root) and Debian's `systemd` and
//! `debootstrap` packages (scripts/test installs debootstrap).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo().join("packaging/caudal.service")).expect("the unit");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/caudal run"),
        "{unit}"
    );
    // The same unit, pointing at this build (verify checks the program).
    let dir = tempfile::tempdir().expect("a directory");
    let path = dir.path().join("caudal.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/caudal", env!("CARGO_BIN_EXE_caudal")),
    )
    .expect("write the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let noise = text(&out.stderr);
    assert!(
        !noise.contains("caudal.service"),
        "systemd-analyze has remarks on the unit: {noise}"
    );
}

/// The packages the Dockerfile's runtime stage installs.
fn runtime_packages() -> Vec<String> {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("the Dockerfile");
    let runtime = dockerfile.split("\nFROM ").last().expect("a runtime stage");
    let install = runtime
        .lines()
        .find(|l| l.contains("apt-get install"))
        .expect("an apt-get install in the runtime stage");
    let packages: Vec<String> = install
        .split("--no-install-recommends")
        .nth(1)
        .expect("--no-install-recommends")
        .split_whitespace()
        .take_while(|w| *w != "\\" && *w != "&&")
        .map(str::to_string)
        .collect();
    assert!(!packages.is_empty(), "{install}");
    packages
}

#[test]
fn the_binary_runs_the_demo_in_a_debian_root_with_only_the_dockerfile_packages() {
    assert!(
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| text(&o.stdout).trim() == "0"),
        "this test makes a Debian root with debootstrap and chroots into it: run it as root \
         (scripts/test does)"
    );
    let packages = runtime_packages();
    // One root per package list, kept between runs (debootstrap takes a
    // few minutes the first time).
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("debian-root-{}", packages.join("-")));
    if !root.join("etc/debian_version").exists() {
        let partial = root.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        let out = Command::new("debootstrap")
            .args([
                "--variant=minbase",
                &format!("--include={}", packages.join(",")),
                "bookworm",
            ])
            .arg(&partial)
            .arg("http://deb.debian.org/debian")
            .output()
            .expect("debootstrap (Debian's debootstrap package; scripts/test installs it)");
        assert!(
            out.status.success(),
            "debootstrap failed: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&root);
        std::fs::rename(&partial, &root).expect("keep the root");
    }
    // Only what the Dockerfile names, beyond the minimal base.
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).expect("dpkg status");
    for p in &packages {
        assert!(
            status.contains(&format!("Package: {p}\n")),
            "{p} not installed"
        );
    }
    assert!(!status.contains("Package: libpq-dev\n"));
    let bin = root.join("usr/local/bin/caudal");
    std::fs::copy(env!("CARGO_BIN_EXE_caudal"), &bin).expect("copy the binary in");
    let out = Command::new("/usr/sbin/chroot")
        .arg(&root)
        .args([
            "/usr/local/bin/caudal",
            "demo",
            "--duration",
            "3s",
            "--dir",
            "/tmp/caudal-demo",
            "--quiet",
        ])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("NO_COLOR", "1")
        .output()
        .expect("chroot");
    let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "the demo in the Debian root: {shown}");
    assert!(shown.contains("latest version of each row:"), "{shown}");
    assert!(shown.contains(", 0 missing"), "{shown}");
}

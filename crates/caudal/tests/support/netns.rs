//! A network namespace joined to the host by a veth pair: a process run in
//! it reaches the host only through the pair, so taking the host's end
//! down partitions it (packets dropped, no reset: connections hang as
//! across a real network failure), and bringing it up heals it.
//!
//! Needs root and iproute2's `ip` (scripts/test runs as root on the test
//! machines); a test that cannot create one fails and says so.

use std::process::Command;

/// A namespace `caudal-<pid>-<tag>` with `10.213.<n>.2/30` inside and
/// `10.213.<n>.1/30` on the host's end, `<n>` a subnet no interface uses.
/// Removed on drop.
pub struct Netns {
    pub name: String,
    host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Creates namespace number `tag` of this test process.
    pub fn create(tag: u8) -> Self {
        let pid = std::process::id();
        let n = (pid % 200) as u8;
        let name = format!("caudal-{pid}-{tag}");
        let host_if = format!("cv{}h{tag}", pid % 100_000);
        let ns_if = format!("cv{}n{tag}", pid % 100_000);
        // A subnet no interface uses (a run killed before its drop may
        // have left one behind).
        let used = Command::new("ip")
            .args(["-o", "addr", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let first = n.wrapping_add(tag.wrapping_mul(17)) % 250;
        let third = (0..250u16)
            .map(|i| ((u16::from(first) + i) % 250) as u8)
            .find(|t| !used.contains(&format!("10.213.{t}.")))
            .unwrap_or(first);
        let host_ip = format!("10.213.{third}.1");
        let ns_ip = format!("10.213.{third}.2");
        // Leftovers of an earlier process with this pid.
        let _ = ip(&["netns", "del", &name]);
        let _ = ip(&["link", "del", &host_if]);
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), name.clone()],
            vec![
                "link".into(),
                "add".into(),
                host_if.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                ns_if.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                ns_if.clone(),
                "netns".into(),
                name.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{host_ip}/30"),
                "dev".into(),
                host_if.clone(),
            ],
            vec!["link".into(), "set".into(), host_if.clone(), "up".into()],
            vec![
                "-n".into(),
                name.clone(),
                "addr".into(),
                "add".into(),
                format!("{ns_ip}/30"),
                "dev".into(),
                ns_if.clone(),
            ],
            vec![
                "-n".into(),
                name.clone(),
                "link".into(),
                "set".into(),
                ns_if.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                name.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        let netns = Self {
            name,
            host_if,
            host_ip,
            ns_ip,
        };
        for step in &steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            if let Err(e) = ip(&args) {
                panic!(
                    "cannot set up the network namespace for this test: {e}\n\
                     network-namespace tests need root and iproute2: run scripts/test as root"
                );
            }
        }
        netns
    }

    /// Partitions the namespace: the host's end of the pair goes down.
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]).expect("take the veth down");
    }

    /// Heals the partition.
    pub fn heal(&self) {
        ip(&["link", "set", &self.host_if, "up"]).expect("bring the veth up");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

//! Network namespaces owned by this run: named `knb-<pid>-<role>`, deleted on drop, and all of
//! them again on SIGINT/SIGTERM (see [`cleanup_all`]).

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

/// The prefix of every namespace this process creates.
pub fn prefix() -> String {
    format!("knb-{}-", std::process::id())
}

/// A network namespace, deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates `knb-<pid>-<role><n>` with loopback up.
    pub fn create(role: &str) -> anyhow::Result<Netns> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}{role}{n}", prefix());
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command that runs `program` inside the namespace (`nsenter --net`, which only switches
    /// the network namespace and execs: the child's pid is the program's pid).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        cmd
    }

    /// The same as [`Netns::command`], for tokio.
    pub fn tokio_command(&self, program: &str) -> tokio::process::Command {
        tokio::process::Command::from(self.command(program))
    }

    /// Sets a per-namespace sysctl.
    pub fn sysctl(&self, key_value: &str) -> anyhow::Result<()> {
        let status = self
            .command("sysctl")
            .args(["-qw", key_value])
            .status()
            .context("sysctl")?;
        if !status.success() {
            bail!("sysctl {key_value} failed in {}", self.name);
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Connects two namespaces with a veth pair and addresses both ends (`a_addr`, `b_addr` in
/// CIDR form). Interface names are local to each namespace, so they need not be unique.
/// Returns the interface names in `a` and in `b`.
pub fn link(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> anyhow::Result<(String, String)> {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let (ia, ib) = (format!("knba{n}"), format!("knbb{n}"));
    a.ip(&[
        "link", "add", &ia, "type", "veth", "peer", "name", &ib, "netns", &b.name,
    ])?;
    a.ip(&["addr", "add", a_addr, "dev", &ia])?;
    b.ip(&["addr", "add", b_addr, "dev", &ib])?;
    a.ip(&["link", "set", &ia, "up"])?;
    b.ip(&["link", "set", &ib, "up"])?;
    Ok((ia, ib))
}

/// Deletes every namespace with this process's prefix (for signal handlers, where drops do
/// not run).
pub fn cleanup_all() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let prefix = prefix();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(name) = line
            .split_whitespace()
            .next()
            .filter(|n| n.starts_with(&prefix))
        {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

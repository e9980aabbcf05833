//! Bounded command execution and network-namespace bookkeeping.
//!
//! Why: the lab drives `ip`, `nft`, `sysctl` and friends as real processes (the same tools an
//! operator uses, so failures are reproducible by hand), and a hung command must never hang a
//! test — hence [`run`] with a hard timeout. Namespaces are named `kn<pid>x<n>-<host>`; the
//! per-lab prefix keeps parallel tests apart, and a lock file held by the owning process lets
//! [`sweep_stale`] tell abandoned namespaces (owner SIGKILLed) from live ones, even across
//! PID namespaces where the pid alone would be ambiguous.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::{LabError, Result};

/// Default cap for setup commands (`ip`, `sysctl`, `nft`).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(10);

/// Where lab owners keep their liveness locks (tmpfs, so it empties on reboot like
/// `/run/netns`).
const LOCK_DIR: &str = "/run/kubenft-lab";

/// Renders a command line for error messages.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion, killing it after `timeout`. Returns the output whatever the
/// exit status; see [`run_ok`] for the checked variant. stdin is closed.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let line = display(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            cmd: line.clone(),
            source,
        })?;
    // Drain both pipes concurrently so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                // The readers finish once the pipes close (grandchildren holding them are
                // not waited for: their threads are simply detached).
                return Err(LabError::CommandTimeout { cmd: line, timeout });
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(LabError::io(format!("waiting for `{line}`"), e)),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Like [`run`], but a non-zero exit is an error carrying stderr.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let out = run(cmd, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::Command {
            cmd: display(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `ip [-n NS] ARGS...`, checked.
pub fn ip(ns: Option<&str>, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(args);
    run_ok(&mut cmd, CMD_TIMEOUT).map(|_| ())
}

/// A `Command` that runs `argv` inside namespace `ns` (`ip netns exec NS ARGV...`).
/// `ip netns exec` execs the program directly, so the child's pid is the program's pid.
pub fn exec_cmd<S: AsRef<std::ffi::OsStr>>(ns: &str, argv: &[S]) -> Command {
    let mut cmd = Command::new(ip_binary());
    cmd.args(["netns", "exec", ns]);
    cmd.args(argv);
    cmd
}

/// `ip` as found on this process's PATH, by its full path: a program the lab starts may be
/// given another PATH (one without `ip`), and `Command` would look for `ip` there.
fn ip_binary() -> &'static std::path::Path {
    static IP: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    IP.get_or_init(|| {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join("ip"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("ip"))
    })
}

/// Sets sysctls inside `ns`; unknown keys are ignored (`sysctl -e`) because some (e.g. the
/// br_netfilter ones) only exist when a module is loaded.
pub fn sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    let mut argv = vec!["sysctl", "-q", "-e", "-w"];
    argv.extend_from_slice(settings);
    run_ok(&mut exec_cmd(ns, &argv), CMD_TIMEOUT).map(|_| ())
}

/// Names of all named network namespaces (`ip netns list`).
pub fn list() -> Result<Vec<String>> {
    let out = run_ok(Command::new("ip").args(["netns", "list"]), CMD_TIMEOUT)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Creates namespace `name` with `lo` up.
pub fn add(name: &str) -> Result<()> {
    run_ok(Command::new("ip").args(["netns", "add", name]), CMD_TIMEOUT)?;
    ip(Some(name), &["link", "set", "lo", "up"])
}

/// Deletes namespace `name` after SIGKILLing every process still inside it, so the namespace
/// (and its veths, routes, nft tables and conntrack table) really goes away.
pub fn delete(name: &str) -> Result<()> {
    if let Ok(out) = run(
        Command::new("ip").args(["netns", "pids", name]),
        CMD_TIMEOUT,
    ) {
        let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !pids.is_empty() {
            let mut kill = Command::new("kill");
            kill.arg("-KILL").arg("--").args(&pids);
            let _ = run(&mut kill, CMD_TIMEOUT);
        }
    }
    run_ok(
        Command::new("ip").args(["netns", "delete", name]),
        CMD_TIMEOUT,
    )
    .map(|_| ())
}

/// A fresh, process-unique prefix `kn<pid>x<n>-` for one lab.
pub fn new_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "kn{}x{}-",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The lab prefix of a namespace name, if it has the `kn<digits>x<digits>-` shape.
pub fn lab_prefix_of(ns: &str) -> Option<&str> {
    let rest = ns.strip_prefix("kn")?;
    let (pid, rest) = rest.split_once('x')?;
    let (n, _) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(n)).then(|| &ns[..2 + pid.len() + 1 + n.len() + 1])
}

/// Proof that a lab is alive: an exclusively locked file named after its prefix. The kernel
/// drops the lock when the owning process dies, however it dies.
#[derive(Debug)]
pub struct OwnerLock {
    path: PathBuf,
    _file: File,
}

impl OwnerLock {
    /// Creates and locks the lock file for `prefix`. Must happen before any namespace with
    /// that prefix exists.
    pub fn acquire(prefix: &str) -> Result<Self> {
        fs::create_dir_all(LOCK_DIR)
            .map_err(|e| LabError::io(format!("creating {LOCK_DIR}"), e))?;
        let path = lock_path(prefix);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LabError::io(format!("opening {}", path.display()), e))?;
        file.try_lock()
            .map_err(|e| LabError::Invalid(format!("lab lock {} is taken: {e}", path.display())))?;
        Ok(OwnerLock { path, _file: file })
    }
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn lock_path(prefix: &str) -> PathBuf {
    PathBuf::from(LOCK_DIR).join(format!("{}.lock", prefix.trim_end_matches('-')))
}

/// The directory (logs, agent state, manifests) of the lab with `prefix`.
pub fn lab_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir()
        .join("kubenft-lab")
        .join(prefix.trim_end_matches('-'))
}

/// Deletes every namespace of this process's labs — and so every process in them — with
/// their lock files and directories. For a process about to exit without dropping its labs
/// (on a signal, while another thread drives a lab): namespaces that thread is still creating
/// are caught by repeating until two passes 50 ms apart find none (at most about 5 s).
pub fn delete_own_labs() {
    let own_prefix = format!("kn{}x", std::process::id());
    let own = || -> Vec<(String, String)> {
        list()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|ns| {
                let prefix = lab_prefix_of(&ns).filter(|p| p.starts_with(&own_prefix))?;
                Some((prefix.to_string(), ns))
            })
            .collect()
    };
    let mut prefixes = BTreeSet::new();
    let mut quiet_passes = 0;
    for _ in 0..100 {
        let found = own();
        if found.is_empty() {
            quiet_passes += 1;
            if quiet_passes == 2 {
                break;
            }
        } else {
            quiet_passes = 0;
        }
        for (prefix, ns) in found {
            // A failure is retried by the next pass (the lab's own thread may be deleting
            // the same namespaces).
            let _ = delete(&ns);
            prefixes.insert(prefix);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<String> = own().into_iter().map(|(_, ns)| ns).collect();
    if !left.is_empty() {
        eprintln!("kubenft-lab: could not delete namespaces {left:?}");
    }
    for prefix in prefixes {
        let _ = fs::remove_file(lock_path(&prefix));
        let _ = fs::remove_dir_all(lab_dir(&prefix));
    }
}

/// Whether the lab owning `prefix` is gone: its lock file is missing or can be locked.
fn owner_gone(prefix: &str) -> bool {
    match OpenOptions::new().write(true).open(lock_path(prefix)) {
        Err(_) => true,
        Ok(f) => match f.try_lock() {
            Ok(()) => true,
            Err(TryLockError::WouldBlock) => false,
            // Unexpected lock error: be conservative and leave the namespace alone.
            Err(TryLockError::Error(_)) => false,
        },
    }
}

/// Deletes every lab namespace (`kn<pid>x<n>-*`) whose owning lab is gone — including any
/// processes still running inside it — and returns the deleted names. Called by
/// [`crate::Lab::new`]; safe to call while other labs are running.
pub fn sweep_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut dead_prefixes = Vec::new();
    for ns in list()? {
        let Some(prefix) = lab_prefix_of(&ns) else {
            continue;
        };
        if !owner_gone(prefix) {
            continue;
        }
        match delete(&ns) {
            Ok(()) => removed.push(ns.clone()),
            Err(e) => eprintln!("kubenft-lab: could not sweep stale namespace {ns}: {e}"),
        }
        if !dead_prefixes.iter().any(|p| p == prefix) {
            dead_prefixes.push(prefix.to_string());
        }
    }
    for prefix in dead_prefixes {
        let _ = fs::remove_file(lock_path(&prefix));
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_shape() {
        assert_eq!(lab_prefix_of("kn123x0-node-a"), Some("kn123x0-"));
        assert_eq!(lab_prefix_of("kn1x22-p-web-1"), Some("kn1x22-"));
        assert_eq!(lab_prefix_of("knx0-a"), None);
        assert_eq!(lab_prefix_of("kn12x-a"), None);
        assert_eq!(lab_prefix_of("n"), None);
        assert_eq!(lab_prefix_of("kn12y3-a"), None);
        let p = new_prefix();
        assert_eq!(lab_prefix_of(&format!("{p}fab")), Some(p.as_str()));
    }

    #[test]
    fn run_times_out() {
        let err = run(Command::new("sleep").arg("5"), Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, LabError::CommandTimeout { .. }), "{err}");
    }
}

//! Managed child processes: the controller, the agents and the echo servers.
//!
//! Why: lab tests kill, stop and restart the real binaries (agent restart, controller outage)
//! and must never leave one running after the test. A [`Process`] is a cheap, cloneable handle
//! shared by the test and its [`crate::Lab`]; the lab stops every handle on `Drop`. Each
//! process runs in its own process group (so helpers it spawns die with it) and logs to
//! files in the lab directory, which the lab prints when a test fails.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::netns::{self, CMD_TIMEOUT};
use crate::{LabError, Result};

/// How long [`Process::stop`] waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// Finds one of the workspace binaries (`kubenft-controller`, `kubenft-agent`,
/// `kubenft-echo`): in `$KUBENFT_BIN_DIR` if set, else next to the running test's parent
/// directory (`target/debug/` for `target/debug/deps/<test>`), else next to the executable.
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let mut searched = Vec::new();
    if let Some(dir) = std::env::var_os("KUBENFT_BIN_DIR") {
        searched.push(PathBuf::from(dir));
    } else if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        if let Some(parent) = dir.parent() {
            searched.push(parent.to_path_buf());
        }
        searched.push(dir.to_path_buf());
    }
    searched
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| LabError::MissingBinary {
            name: name.to_string(),
            searched,
        })
}

#[derive(Debug)]
struct Inner {
    name: String,
    ns: String,
    argv: Vec<String>,
    /// Environment variables set on top of the test's own (kept across restarts).
    env: Vec<(String, String)>,
    stdout: PathBuf,
    stderr: PathBuf,
    child: Mutex<Option<Child>>,
    /// Length of the stdout log when the current incarnation started, so readiness checks
    /// ignore what earlier incarnations (or an earlier pod of the same name) printed.
    stdout_start: Mutex<u64>,
}

/// A process running inside a lab namespace. Clones share the same process.
#[derive(Debug, Clone)]
pub struct Process(Arc<Inner>);

impl Process {
    /// Starts `argv` in namespace `ns`; logs go to `<log_dir>/<name>.stdout|.stderr`
    /// (appended, so restarts keep the history).
    pub fn spawn(name: &str, ns: &str, argv: Vec<String>, log_dir: &Path) -> Result<Self> {
        Self::spawn_with_env(name, ns, argv, Vec::new(), log_dir)
    }

    /// [`Self::spawn`] with environment variables `env` set on top of the test's own (on
    /// every start, restarts included).
    pub fn spawn_with_env(
        name: &str,
        ns: &str,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        log_dir: &Path,
    ) -> Result<Self> {
        let p = Process(Arc::new(Inner {
            name: name.to_string(),
            ns: ns.to_string(),
            argv,
            env,
            stdout: log_dir.join(format!("{name}.stdout")),
            stderr: log_dir.join(format!("{name}.stderr")),
            child: Mutex::new(None),
            stdout_start: Mutex::new(0),
        }));
        p.start()?;
        Ok(p)
    }

    /// The name given at spawn (also the log file stem).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The full namespace name the process runs in.
    pub fn netns(&self) -> &str {
        &self.0.ns
    }

    /// The program and its arguments (without the `ip netns exec` wrapper).
    pub fn argv(&self) -> &[String] {
        &self.0.argv
    }

    /// Path of the stdout log.
    pub fn stdout_path(&self) -> &Path {
        &self.0.stdout
    }

    /// Path of the stderr log.
    pub fn stderr_path(&self) -> &Path {
        &self.0.stderr
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.0.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the process if it is not running (after a kill/stop or a crash).
    pub fn start(&self) -> Result<()> {
        let mut guard = self.child();
        if let Some(child) = guard.as_mut()
            && matches!(child.try_wait(), Ok(None))
        {
            return Ok(());
        }
        let open = |p: &Path| -> Result<File> {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| LabError::io(format!("opening log {}", p.display()), e))?;
            let env: String = self
                .0
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v} "))
                .collect();
            let _ = writeln!(
                f,
                "=== kubenft-lab: starting {env}{} ===",
                self.0.argv.join(" ")
            );
            Ok(f)
        };
        let stdout = open(&self.0.stdout)?;
        let offset = stdout
            .metadata()
            .map_err(|e| LabError::io(format!("stat {}", self.0.stdout.display()), e))?
            .len();
        *self
            .0
            .stdout_start
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = offset;
        let mut cmd = netns::exec_cmd(&self.0.ns, &self.0.argv);
        cmd.envs(self.0.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(open(&self.0.stderr)?)
            .process_group(0);
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            cmd: netns::display(&cmd),
            source,
        })?;
        *guard = Some(child);
        Ok(())
    }

    /// The pid (also the process-group id), if started and not yet reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child().as_ref().map(Child::id)
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&self) -> bool {
        match self.child().as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The exit status if the process has exited (and was not yet restarted).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILLs the whole process group and reaps it (a crash, as far as the process can
    /// tell). No-op if not running.
    pub fn kill(&self) -> Result<()> {
        let mut guard = self.child();
        if let Some(child) = guard.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                signal_group(child.id(), "KILL");
                let _ = child.kill();
            }
            child
                .wait()
                .map_err(|e| LabError::io(format!("reaping {}", self.0.name), e))?;
        }
        Ok(())
    }

    /// SIGTERMs the process group, waits up to `grace` for a clean exit, then SIGKILLs.
    /// Returns the exit status (None if it was not running).
    pub fn stop_with_grace(&self, grace: Duration) -> Result<Option<ExitStatus>> {
        let mut guard = self.child();
        let Some(child) = guard.as_mut() else {
            return Ok(None);
        };
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(Some(status));
        }
        signal_group(child.id(), "TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(Some(status));
            }
            thread::sleep(Duration::from_millis(10));
        }
        signal_group(child.id(), "KILL");
        let _ = child.kill();
        child
            .wait()
            .map(Some)
            .map_err(|e| LabError::io(format!("reaping {}", self.0.name), e))
    }

    /// [`Self::stop_with_grace`] with [`STOP_GRACE`].
    pub fn stop(&self) -> Result<Option<ExitStatus>> {
        self.stop_with_grace(STOP_GRACE)
    }

    /// Stops (SIGTERM, then SIGKILL after the grace period) and starts again with the same
    /// arguments.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    /// stdout and stderr logs so far.
    pub fn logs(&self) -> String {
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        format!(
            "--- {} stdout ({}) ---\n{}--- {} stderr ---\n{}",
            self.0.name,
            self.0.stdout.display(),
            read(&self.0.stdout),
            self.0.name,
            read(&self.0.stderr)
        )
    }

    /// The last `lines` lines of each log, for failure reports.
    pub fn log_tail(&self, lines: usize) -> String {
        let tail = |p: &Path| {
            let s = fs::read_to_string(p).unwrap_or_default();
            let v: Vec<&str> = s.lines().collect();
            v[v.len().saturating_sub(lines)..].join("\n")
        };
        format!(
            "--- {} stdout (tail) ---\n{}\n--- {} stderr (tail) ---\n{}\n",
            self.0.name,
            tail(&self.0.stdout),
            self.0.name,
            tail(&self.0.stderr)
        )
    }

    /// What the current incarnation printed on stdout so far.
    pub fn current_stdout(&self) -> String {
        let offset = *self
            .0
            .stdout_start
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let bytes = fs::read(&self.0.stdout).unwrap_or_default();
        let from = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        String::from_utf8_lossy(&bytes[from..]).into_owned()
    }

    /// Waits until the current incarnation's stdout contains `marker` (e.g. the echo
    /// server's `READY`), failing early with the logs if the process exits.
    pub fn wait_for_stdout(&self, marker: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let max_polls = timeout.as_millis() / 10 + 1;
        for _ in 0..max_polls {
            if self.current_stdout().contains(marker) {
                return Ok(start.elapsed());
            }
            if !self.is_running() {
                return Err(self.not_ready(format!(
                    "exited ({:?}) before printing {marker:?}",
                    self.exit_status()
                )));
            }
            if start.elapsed() >= timeout {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        Err(self.not_ready(format!("no {marker:?} within {timeout:?}")))
    }

    fn not_ready(&self, reason: String) -> LabError {
        LabError::NotReady {
            name: self.0.name.clone(),
            reason,
            logs: self.log_tail(40),
        }
    }
}

/// Sends `sig` to process group `pgid` (best effort). Callers only signal while the leader
/// is not yet reaped, so the id cannot have been reused by an unrelated process.
fn signal_group(pgid: u32, sig: &str) {
    let mut cmd = Command::new("kill");
    cmd.arg(format!("-{sig}")).arg("--").arg(format!("-{pgid}"));
    let _ = netns::run(&mut cmd, CMD_TIMEOUT);
}

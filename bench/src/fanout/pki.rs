//! Certificates for suites 3 and 4 in TLS mode, made with the `openssl` CLI as the lab makes
//! them (`kubenft_lab::pki`: EC P-256 keys in PKCS#8): a CA, the controller's serving
//! certificate (SAN `IP:127.0.0.1`, the address the simulated agents dial) and one client
//! certificate per simulated agent (CN `system:node:<name>`, its own key).
//!
//! The CA and the controller's certificate come from the lab's [`Pki`]. The agents' are one
//! `openssl req -x509 -CA …` each (key, certificate and signature in one process: about 17 ms
//! here, against 60 ms for the lab's CSR then `x509 -req`), spread over the machine's cores.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use kubenft_lab::pki::{Pki, Usage};
use kubenft_tls::{ClientFiles, ServerFiles};

use crate::workload::node_name;

/// A CA with the controller's certificate and `agents` agents' certificates, in a temporary
/// directory removed on drop.
pub struct BenchPki {
    pki: Pki,
    server: ServerFiles,
    agents: u32,
    /// How long making every certificate took.
    pub generated: Duration,
}

impl BenchPki {
    /// Makes the CA and every certificate (blocking: run it off the runtime's workers).
    pub fn generate(agents: u32) -> anyhow::Result<BenchPki> {
        let started = Instant::now();
        let dir = std::env::temp_dir().join(format!("{}pki", crate::netns::prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = Pki::new(&dir, "kubenft-bench-ca").context("making the bench CA")?;
        let cert = pki
            .issue(
                "controller",
                "kubenft-controller",
                &["IP:127.0.0.1".to_owned()],
                Usage::Server,
                30,
            )
            .context("issuing the controller's certificate")?;
        let server = ServerFiles {
            cert: cert.cert,
            key: cert.key,
            client_ca: pki.ca(),
        };
        let next = AtomicU32::new(0);
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| -> anyhow::Result<()> {
                        loop {
                            let id = next.fetch_add(1, Ordering::Relaxed);
                            if id >= agents {
                                return Ok(());
                            }
                            issue_agent(&pki, id)?;
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("certificate worker panicked"))
        })?;
        Ok(BenchPki {
            pki,
            server,
            agents,
            generated: started.elapsed(),
        })
    }

    /// The controller's `--tls-cert-file`, `--tls-private-key-file`, `--client-ca-file`.
    pub fn server(&self) -> &ServerFiles {
        &self.server
    }

    pub fn agents(&self) -> u32 {
        self.agents
    }

    /// Agent `id`'s files, as the real agent is given them.
    pub fn client(&self, id: u32) -> ClientFiles {
        let (cert, key) = agent_paths(self.pki.dir(), id);
        ClientFiles {
            cert,
            key,
            ca: self.pki.ca(),
        }
    }
}

impl Drop for BenchPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.pki.dir());
    }
}

fn agent_paths(dir: &Path, id: u32) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("agent-{id}.crt")),
        dir.join(format!("agent-{id}.key")),
    )
}

/// Agent `id`'s key and certificate, signed by the CA, in one `openssl` process.
fn issue_agent(pki: &Pki, id: u32) -> anyhow::Result<()> {
    let (cert, key) = agent_paths(pki.dir(), id);
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "30"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .arg("-CA")
        .arg(pki.ca())
        .arg("-CAkey")
        .arg(pki.dir().join("ca.key"))
        .args(["-set_serial", &format!("0xbe{id:08x}")])
        .args([
            "-subj",
            &format!("/CN={}", kubenft_tls::node_identity(&node_name(id))),
        ])
        .args(["-addext", "basicConstraints=CA:FALSE"])
        .args(["-addext", "keyUsage=critical,digitalSignature"])
        .args(["-addext", "extendedKeyUsage=clientAuth"])
        .output()
        .context("running openssl")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl for agent {id}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

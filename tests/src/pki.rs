//! Test certificates made with the `openssl` CLI (installed on every lab machine): a CA, and
//! leaf certificates it signs — the controller's serving certificate, one client certificate
//! per node (Subject CN `system:node:<name>`, also the serving certificate of the agent's
//! inspection port), an operator's client certificate for grpcurl — and, for the TLS tests,
//! certificates from another CA and expired ones.
//!
//! Why the CLI rather than a crate: no extra dependencies to build, and the files are exactly
//! what an operator would produce. Keys are EC P-256 in PKCS#8.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::netns::{self, CMD_TIMEOUT};
use crate::{LabError, Result};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a leaf certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
    /// Both: an agent's certificate (client of the controller, server of its inspection).
    Both,
}

impl Usage {
    fn eku(self) -> &'static str {
        match self {
            Usage::Server => "serverAuth",
            Usage::Client => "clientAuth",
            Usage::Both => "serverAuth,clientAuth",
        }
    }
}

/// A certificate authority in a directory (`ca.crt`, `ca.key`) and the leaves it issued.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
}

fn openssl(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    netns::run_ok(&mut cmd, CMD_TIMEOUT).map(|_| ())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| LabError::Invalid(format!("non-UTF-8 path {}", p.display())))
}

impl Pki {
    /// Creates a CA named `name` in `dir` (created if missing).
    pub fn new(dir: &Path, name: &str) -> Result<Pki> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        let (crt, key) = (pki.ca(), dir.join("ca.key"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&crt)?,
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "30",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])?;
        Ok(pki)
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues `<dir>/<file>.crt|.key` with Subject CN `cn`, these SANs (`IP:…`, `DNS:…`),
    /// valid for `days` from now (negative: already expired).
    pub fn issue(
        &self,
        file: &str,
        cn: &str,
        sans: &[String],
        usage: Usage,
        days: i32,
    ) -> Result<CertFiles> {
        static SERIAL: AtomicU64 = AtomicU64::new(1);
        let out = CertFiles {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        let csr = self.dir.join(format!("{file}.csr"));
        let ext = self.dir.join(format!("{file}.ext"));
        let mut text = format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={}\n",
            usage.eku()
        );
        if !sans.is_empty() {
            text.push_str(&format!("subjectAltName={}\n", sans.join(",")));
        }
        std::fs::write(&ext, text)
            .map_err(|e| LabError::io(format!("writing {}", ext.display()), e))?;
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            path_str(&out.key)?,
            "-out",
            path_str(&csr)?,
            "-subj",
            &format!("/CN={cn}"),
        ])?;
        let serial = format!(
            "{}{:06}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            path_str(&csr)?,
            "-CA",
            path_str(&self.ca())?,
            "-CAkey",
            path_str(&self.dir.join("ca.key"))?,
            "-set_serial",
            &serial,
            "-out",
            path_str(&out.cert)?,
            "-days",
            &days.to_string(),
            "-extfile",
            path_str(&ext)?,
        ])?;
        Ok(out)
    }

    /// A node's certificate: CN `system:node:<node>`, server and client use, SANs
    /// 127.0.0.1, ::1 and `addrs` (the addresses grpcurl dials the inspection port on).
    pub fn issue_node(&self, file: &str, node: &str, addrs: &[String]) -> Result<CertFiles> {
        let mut sans = vec!["IP:127.0.0.1".to_string(), "IP:::1".to_string()];
        sans.extend(addrs.iter().map(|a| format!("IP:{a}")));
        self.issue(file, &format!("system:node:{node}"), &sans, Usage::Both, 30)
    }
}

/// Replaces `dst`'s certificate and key with `src`'s, each by an atomic rename (as a
/// certificate manager does; the pair is briefly mismatched, which readers must tolerate).
pub fn install(src: &CertFiles, dst: &CertFiles) -> Result<()> {
    for (from, to) in [(&src.cert, &dst.cert), (&src.key, &dst.key)] {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp)
            .map_err(|e| LabError::io(format!("copying {}", from.display()), e))?;
        std::fs::rename(&tmp, to)
            .map_err(|e| LabError::io(format!("renaming to {}", to.display()), e))?;
    }
    Ok(())
}

//! Mutual TLS for kubenft's gRPC ports (docs/contract.md §3, docs/trust.md), with rustls and
//! the ring provider only (the one kube uses: a second provider in the tree makes rustls panic
//! at run time).
//!
//! - A server ([`ServerTls`]) holds its certificate, key and client CA as read from files, and
//!   re-reads them when a file changes ([`ServerTls::watch`] polls their inode, size and
//!   modification time): every new handshake uses the newest good files, established
//!   connections are untouched, and files that do not load (a half-written rotation) are
//!   logged and the previous ones kept. A client certificate is mandatory.
//! - [`incoming`] turns a TCP listener into the TLS connections tonic serves with
//!   `serve_with_incoming`. Handshakes run concurrently, each bounded by
//!   [`HANDSHAKE_TIMEOUT`]; one that fails is reported (peer address, the certificate's CN
//!   when one was presented, and a [`Refusal::reason`]) and never reaches tonic. Tonic's
//!   `Connected` impl for the stream puts the verified chain in each request
//!   (`Request::peer_certs`), and [`common_name`] reads the identity from it.
//! - A client ([`ClientFiles`]) reads its files afresh for each new connection.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

pub mod bounds;
pub mod pki;
pub use bounds::{CallLimit, HttpLimits, Limited, Limits, plaintext, serve_http};

/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// The Subject CN of node `node`'s client certificate (the kubelet convention).
pub fn node_identity(node: &str) -> String {
    format!("system:node:{node}")
}

/// The crypto provider of every TLS endpoint: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("{}: {source}", path.display())]
    Rustls {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("client CA {}: {source}", path.display())]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// A server's files: its certificate (chain) and key, and the CA its clients' certificates
/// must be signed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// A client's files: its certificate (chain) and key, and the CA its servers' certificates
/// must be signed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

impl ClientFiles {
    /// The client's TLS settings for one connection, from the files as they are now.
    pub fn load(&self) -> Result<tonic::transport::ClientTlsConfig, Error> {
        let (cert, key, ca) = (read(&self.cert)?, read(&self.key)?, read(&self.ca)?);
        // Checked here so a bad file is reported by name rather than as a handshake error.
        certs(&self.cert, &cert)?;
        private_key(&self.key, &key)?;
        certs(&self.ca, &ca)?;
        Ok(tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .identity(tonic::transport::Identity::from_pem(cert, key)))
    }
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            path: path.to_owned(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::Pem {
            path: path.to_owned(),
            what: "no CERTIFICATE in PEM".into(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| Error::Pem {
        path: path.to_owned(),
        what: format!("no private key: {e}"),
    })
}

/// What a server hands out and checks with, as loaded from its files.
struct Material {
    key: Arc<CertifiedKey>,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl Material {
    fn load(files: &ServerFiles, provider: &Arc<CryptoProvider>) -> Result<Material, Error> {
        let chain = certs(&files.cert, &read(&files.cert)?)?;
        let key = private_key(&files.key, &read(&files.key)?)?;
        let key = CertifiedKey::from_der(chain, key, provider).map_err(|source| Error::Rustls {
            path: files.key.clone(),
            source,
        })?;
        let mut roots = RootCertStore::empty();
        for ca in certs(&files.client_ca, &read(&files.client_ca)?)? {
            roots.add(ca).map_err(|source| Error::Rustls {
                path: files.client_ca.clone(),
                source,
            })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .map_err(|source| Error::Verifier {
                path: files.client_ca.clone(),
                source,
            })?;
        Ok(Material {
            key: Arc::new(key),
            verifier,
        })
    }
}

/// What identifies a file's content having changed: replaced (inode), rewritten (size,
/// modification and change times).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp(Option<(u64, u64, SystemTime, i64, i64)>);

impl Stamp {
    fn of(path: &Path) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp(std::fs::metadata(path).ok().map(|m| {
            (
                m.ino(),
                m.len(),
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.ctime(),
                m.ctime_nsec(),
            )
        }))
    }
}

/// A TLS server's certificate, key and client CA, re-read when their files change.
pub struct ServerTls {
    files: ServerFiles,
    provider: Arc<CryptoProvider>,
    current: Mutex<Arc<Material>>,
    /// The files' stamps when `current` was loaded, and the last reload error logged.
    stamps: Mutex<(Vec<Stamp>, Option<String>)>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the files (an error names the file that does not load).
    pub fn load(files: ServerFiles) -> Result<Arc<ServerTls>, Error> {
        let provider = provider();
        let stamps = Self::stamps_of(&files);
        let material = Material::load(&files, &provider)?;
        Ok(Arc::new(ServerTls {
            files,
            provider,
            current: Mutex::new(Arc::new(material)),
            stamps: Mutex::new((stamps, None)),
        }))
    }

    pub fn files(&self) -> &ServerFiles {
        &self.files
    }

    fn stamps_of(files: &ServerFiles) -> Vec<Stamp> {
        [&files.cert, &files.key, &files.client_ca]
            .into_iter()
            .map(|p| Stamp::of(p))
            .collect()
    }

    /// Re-reads the files if any of them changed since they were loaded; returns whether new
    /// material is in use. Files that do not load are logged (once per distinct error) and
    /// tried again at the next check; the previous material stays in use meanwhile.
    pub fn reload_if_changed(&self) -> bool {
        let mut stamps = self.stamps.lock();
        let now = Self::stamps_of(&self.files);
        if now == stamps.0 {
            return false;
        }
        match Material::load(&self.files, &self.provider) {
            Ok(material) => {
                *self.current.lock() = Arc::new(material);
                *stamps = (now, None);
                tracing::info!(cert = %self.files.cert.display(), client_ca = %self.files.client_ca.display(), "TLS files changed: new connections use them");
                true
            }
            Err(e) => {
                let text = e.to_string();
                if stamps.1.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "TLS files changed but do not load: keeping the previous ones");
                    stamps.1 = Some(text);
                }
                false
            }
        }
    }

    /// Checks the files every [`RELOAD_INTERVAL`] until cancelled.
    pub fn watch(self: &Arc<Self>, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(RELOAD_INTERVAL) => {}
                }
                let t = this.clone();
                // File reads off the runtime's workers.
                let _ = tokio::task::spawn_blocking(move || t.reload_if_changed()).await;
            }
        })
    }

    /// The configuration of one handshake: the current certificate (resolved when the client
    /// says hello) and the current client CA; the presented certificate's CN is recorded in
    /// `seen` whether or not it verifies.
    fn config(self: &Arc<Self>, seen: Arc<Mutex<Option<String>>>) -> Arc<ServerConfig> {
        let material = self.current.lock().clone();
        let verifier = Arc::new(ConnVerifier {
            inner: material.verifier.clone(),
            seen,
        });
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No resumption: a cache per handshake could never resume anything, yet rustls's
        // default one allocates 256 entries up front (19 KB for each connection still in
        // its handshake), and a resumed session would skip the client certificate's check.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Arc::new(config)
    }
}

/// Hands out the server's current certificate.
#[derive(Debug)]
struct Resolver(Arc<ServerTls>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.lock().key.clone())
    }
}

/// One connection's client verifier: the client CA current when the connection was accepted,
/// and a note of the presented certificate's CN (for the log line of a refusal).
#[derive(Debug)]
struct ConnVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    seen: Arc<Mutex<Option<String>>>,
}

impl ClientCertVerifier for ConnVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No hints: a client then presents its certificate whatever CA signed it (Go's TLS
    /// client, grpcurl's, would otherwise send none when its CA is not hinted), so a refusal
    /// names the certificate and the precise reason (`unknown_ca` rather than
    /// `no_certificate`). The CA is no secret, but it need not be advertised either.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        *self.seen.lock() = common_name(end_entity);
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A connection refused during its TLS handshake.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub peer: SocketAddr,
    /// The Subject CN of the certificate the peer presented, if it presented one.
    pub common_name: Option<String>,
    /// `no_certificate`, `unknown_ca`, `expired`, `not_yet_valid`, `bad_certificate`,
    /// `not_tls` (plaintext or garbage), `peer_alert` (the client refused us),
    /// `handshake_timeout` or `handshake_error`; `connection_limit` (closed at once: the port
    /// had its maximum of connections open) and `closed` (closed before sending anything).
    pub reason: &'static str,
    pub error: String,
}

fn reason(e: &io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return "handshake_error";
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            _ => "bad_certificate",
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => "not_tls",
        rustls::Error::AlertReceived(_) => "peer_alert",
        _ => "handshake_error",
    }
}

/// The TLS connections on `listener`, for tonic's `serve_with_incoming`, under the default
/// [`Limits`]: see [`incoming_with`].
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    refused: impl Fn(Refusal) + Send + Sync + 'static,
) -> ReceiverStream<io::Result<Limited<TlsStream<TcpStream>>>> {
    incoming_with(listener, tls, Limits::default(), refused)
}

/// The TLS connections on `listener`, for tonic's `serve_with_incoming`: at most
/// `limits.max_connections` at once (beyond it a new connection is closed at once and refused
/// with `connection_limit`); each accepted connection's handshake runs in its own task (a slow
/// client holds up no one) and is bounded by `limits.handshake_timeout`; failed ones go to
/// `refused` and are dropped. Accepting stops when the stream is dropped.
pub fn incoming_with(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    limits: Limits,
    refused: impl Fn(Refusal) + Send + Sync + 'static,
) -> ReceiverStream<io::Result<Limited<TlsStream<TcpStream>>>> {
    bounds::accept(
        listener,
        limits,
        Arc::new(refused),
        move |tcp: TcpStream, peer: SocketAddr| {
            let tls = tls.clone();
            async move {
                let seen = Arc::new(Mutex::new(None));
                let refusal = |reason, error: String| Refusal {
                    peer,
                    common_name: seen.lock().take(),
                    reason,
                    error,
                };
                let timed_out = || {
                    refusal(
                        "handshake_timeout",
                        format!("no TLS handshake within {:?}", limits.handshake_timeout),
                    )
                };
                let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
                // The TLS state (configuration, buffers: about 5 KB) only once the client has
                // sent something, so a connection that stays silent costs its descriptor and
                // this task alone. `peek` rather than `readable`, which reports a fresh socket
                // readable at once.
                match tokio::time::timeout_at(deadline, tcp.peek(&mut [0u8; 1])).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(Ok(_)) => {
                        return Err(refusal("closed", "closed before sending anything".into()));
                    }
                    Ok(Err(e)) => return Err(refusal("handshake_error", e.to_string())),
                    Err(_) => return Err(timed_out()),
                }
                let acceptor = TlsAcceptor::from(tls.config(seen.clone()));
                match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => Ok(stream),
                    Ok(Err(e)) => Err(refusal(reason(&e), e.to_string())),
                    Err(_) => Err(timed_out()),
                }
            }
        },
    )
}

/// The Subject CN of a DER certificate (the first one, if several), if it has one.
pub fn common_name(cert: &[u8]) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serial,
    // signature, issuer, validity, subject, ... }, ... }
    let (_, cert, _) = der(cert, 0x30)?;
    let (_, mut tbs, _) = der(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der(tbs, 0xa0)?.2;
    }
    // serial, signature algorithm, issuer, validity
    for tag in [0x02, 0x30, 0x30, 0x30] {
        tbs = der(tbs, tag)?.2;
    }
    let (_, mut subject, _) = der(tbs, 0x30)?;
    let mut found = None;
    // Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }; the last CN wins, as
    // in most tools' "most specific" reading.
    while !subject.is_empty() {
        let (_, mut rdn, rest) = der(subject, 0x31)?;
        subject = rest;
        while !rdn.is_empty() {
            let (_, atv, rest) = der(rdn, 0x30)?;
            rdn = rest;
            let (_, oid, value) = der(atv, 0x06)?;
            if oid == [0x55, 0x04, 0x03] {
                let (tag, text, _) = der_any(value)?;
                // UTF8String, PrintableString, IA5String, T61String
                if matches!(tag, 0x0c | 0x13 | 0x16 | 0x14) {
                    found = Some(String::from_utf8_lossy(text).into_owned());
                }
            }
        }
    }
    found
}

/// The serial number of a DER certificate in upper-case hex, as `openssl x509 -serial`
/// prints it (for logs: which certificate a peer presented).
pub fn serial_hex(cert: &[u8]) -> Option<String> {
    let (_, cert, _) = der(cert, 0x30)?;
    let (_, mut tbs, _) = der(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der(tbs, 0xa0)?.2;
    }
    let (_, serial, _) = der(tbs, 0x02)?;
    let digits: String = serial
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02X}"))
        .collect();
    Some(if digits.is_empty() {
        "00".into()
    } else {
        digits
    })
}

/// One DER element with tag `tag`: (tag, content, rest).
fn der(input: &[u8], tag: u8) -> Option<(u8, &[u8], &[u8])> {
    der_any(input).filter(|(t, _, _)| *t == tag)
}

fn der_any(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The Subject CN of the verified client certificate of a request, if any.
pub fn peer_common_name<T>(request: &tonic::Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    common_name(certs.first()?.as_ref())
}

/// The serial number (hex) of the verified client certificate of a request, if any.
pub fn peer_serial<T>(request: &tonic::Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    serial_hex(certs.first()?.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    #[test]
    fn der_lengths_are_bounded() {
        assert_eq!(der_any(&[0x30, 0x02, 1, 2, 3]).unwrap().1, &[1, 2]);
        assert!(der_any(&[0x30, 0x05, 1]).is_none());
        assert!(der_any(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_none());
        assert_eq!(der_any(&[0x04, 0x81, 0x01, 9]).unwrap().1, &[9]);
        assert!(common_name(b"not a certificate").is_none());
    }

    /// A real certificate (made by the openssl CLI, as in the lab): CN and serial read back.
    #[test]
    fn reads_the_cn_and_serial_of_a_real_certificate() {
        let dir = std::env::temp_dir().join(format!("kubenft-tls-cn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (crt, key) = (dir.join("c.crt"), dir.join("c.key"));
        let ok = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args([
                "-subj",
                "/O=kubenft/CN=system:node:a",
                "-set_serial",
                "0x8badf00d",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .output()
            .expect("openssl")
            .status
            .success();
        assert!(ok);
        let pem = std::fs::read(&crt).unwrap();
        let der = certs(&crt, &pem).unwrap().remove(0);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(common_name(&der).as_deref(), Some("system:node:a"));
        assert_eq!(serial_hex(&der).as_deref(), Some("8BADF00D"));
    }

    /// A CA in `dir` (made on first use) and a leaf `name` it signs (SAN IP 127.0.0.1, both
    /// usages), with the crate's own issuing code.
    fn leaf(dir: &Path, name: &str, cn: &str) {
        use crate::pki::{Authority, Leaf};
        let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
        let ca = if ca_crt.exists() {
            Authority::from_pem(
                &std::fs::read_to_string(&ca_crt).unwrap(),
                &std::fs::read_to_string(&ca_key).unwrap(),
            )
            .unwrap()
        } else {
            let ca = Authority::generate("ca", Duration::from_secs(86400)).unwrap();
            std::fs::write(&ca_crt, ca.cert_pem()).unwrap();
            std::fs::write(&ca_key, ca.key_pem()).unwrap();
            ca
        };
        let leaf = Leaf {
            common_name: cn.into(),
            ips: vec!["127.0.0.1".parse().unwrap()],
            server: true,
            client: true,
            ..Leaf::default()
        };
        let (cert, key) = ca
            .issue_with_key(&leaf, Duration::from_secs(86400))
            .unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    }

    fn tempdir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kubenft-tls-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn served(tls: &ServerTls) -> Vec<u8> {
        tls.current.lock().key.cert[0].to_vec()
    }

    /// Rotation: unchanged files are not re-read; a half-done rotation (a new certificate
    /// with the old key) keeps the old pair; the completed one is taken.
    #[test]
    fn changed_files_are_reloaded_and_a_mismatched_pair_is_not() {
        let dir = tempdir("reload");
        leaf(&dir, "s", "server");
        leaf(&dir, "s2", "server-2");
        let files = ServerFiles {
            cert: dir.join("s.crt"),
            key: dir.join("s.key"),
            client_ca: dir.join("ca.crt"),
        };
        let tls = ServerTls::load(files).unwrap();
        let first = served(&tls);
        assert!(!tls.reload_if_changed());
        std::fs::rename(dir.join("s2.crt"), dir.join("s.crt")).unwrap();
        assert!(
            !tls.reload_if_changed(),
            "a certificate with the wrong key was taken"
        );
        assert_eq!(served(&tls), first);
        std::fs::rename(dir.join("s2.key"), dir.join("s.key")).unwrap();
        assert!(tls.reload_if_changed());
        assert_ne!(served(&tls), first);
        assert_eq!(common_name(&served(&tls)).as_deref(), Some("server-2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A client without a certificate is refused in the handshake, with the reason, and
    /// never reaches the server; one with a certificate from the CA gets through.
    #[tokio::test]
    async fn handshakes_are_refused_with_a_reason() {
        let dir = tempdir("handshake");
        leaf(&dir, "s", "server");
        leaf(&dir, "c", "system:node:a");
        let tls = ServerTls::load(ServerFiles {
            cert: dir.join("s.crt"),
            key: dir.join("s.key"),
            client_ca: dir.join("ca.crt"),
        })
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (refusals_tx, mut refusals) = mpsc::unbounded_channel();
        let mut accepted = incoming(listener, tls, move |r| {
            let _ = refusals_tx.send(r);
        });
        let ca = std::fs::read(dir.join("ca.crt")).unwrap();
        let mut roots = RootCertStore::empty();
        for c in certs(&dir.join("ca.crt"), &ca).unwrap() {
            roots.add(c).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let chain = certs(
            &dir.join("c.crt"),
            &std::fs::read(dir.join("c.crt")).unwrap(),
        )
        .unwrap();
        let key = private_key(
            &dir.join("c.key"),
            &std::fs::read(dir.join("c.key")).unwrap(),
        )
        .unwrap();
        let with_cert = builder.clone().with_client_auth_cert(chain, key).unwrap();
        let without = builder.with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        for config in [without, with_cert] {
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tcp = TcpStream::connect(addr).await.unwrap();
            if let Ok(mut s) = connector.connect(name.clone(), tcp).await {
                // TLS 1.3: the client learns of a refusal only when it reads.
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s.write_all(b"x").await;
                let mut buf = [0u8; 1];
                let _ = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await;
            }
        }
        let refusal = refusals.recv().await.unwrap();
        assert_eq!(refusal.reason, "no_certificate", "{refusal:?}");
        use futures::StreamExt as _;
        let conn = accepted.next().await.unwrap().unwrap();
        let peer = conn.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(common_name(&peer).as_deref(), Some("system:node:a"));
        assert!(refusals.try_recv().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A client that connects and says nothing is dropped after the handshake timeout (the
    /// clock is paused: the runtime jumps to the timeout once everything waits).
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
        let dir = tempdir("timeout");
        leaf(&dir, "s", "server");
        let tls = ServerTls::load(ServerFiles {
            cert: dir.join("s.crt"),
            key: dir.join("s.key"),
            client_ca: dir.join("ca.crt"),
        })
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (refusals_tx, mut refusals) = mpsc::unbounded_channel();
        let _accepted = incoming(listener, tls, move |r| {
            let _ = refusals_tx.send(r);
        });
        let started = tokio::time::Instant::now();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let refusal = refusals.recv().await.unwrap();
        assert_eq!(refusal.reason, "handshake_timeout", "{refusal:?}");
        assert!(started.elapsed() >= HANDSHAKE_TIMEOUT);
    }

    #[test]
    fn node_identity_is_the_kubelet_convention() {
        assert_eq!(node_identity("a"), "system:node:a");
    }
}

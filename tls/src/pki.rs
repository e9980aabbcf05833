//! Certificates made in-process: the signer's CA, the certificates it issues, and the
//! certificate signing requests agents send (issue 12: certificates in a cluster).
//!
//! Keys are ECDSA P-256 (what `openssl` and the tests use too). An issued certificate takes
//! nothing from a request but its public key: subject, names, usages and lifetime are the
//! signer's decision, so a request cannot smuggle in an extension the review did not see.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};

/// How far back an issued certificate's `notBefore` is set, for clocks that lag the signer's
/// (at most a tenth of its lifetime, so that a short-lived certificate's renewal time, a
/// fraction of its lifetime, is not already past when it is issued).
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

fn backdate(validity: Duration) -> Duration {
    CLOCK_SKEW.min(validity / 10)
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate signing request: {0}")]
    Request(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("private key: {0}")]
    Key(String),
    #[error("signing: {0}")]
    Sign(String),
}

/// What a certificate is for and whom it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leaf {
    pub common_name: String,
    pub organizations: Vec<String>,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Extended key usage serverAuth.
    pub server: bool,
    /// Extended key usage clientAuth.
    pub client: bool,
}

impl Leaf {
    fn params(&self, validity: Duration, now: SystemTime) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(&self.common_name, &self.organizations);
        for name in &self.dns_names {
            let name = name
                .clone()
                .try_into()
                .map_err(|_| PkiError::Sign(format!("{name:?} is not a DNS name")))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(self.ips.iter().copied().map(SanType::IpAddress));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if self.server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if self.client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.not_before = (now - backdate(validity)).into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(random_serial()?);
        Ok(params)
    }
}

fn distinguished_name(common_name: &str, organizations: &[String]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for o in organizations {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

/// 128 random bits, positive (RFC 5280 §4.1.2.2).
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Sign("no randomness for a serial number".into()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A certificate authority: its certificate and key, able to issue.
pub struct Authority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

impl Authority {
    /// A new self-signed CA named `common_name`, valid for `validity`.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Authority, PkiError> {
        let key = KeyPair::generate().map_err(|e| PkiError::Key(e.to_string()))?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - backdate(validity)).into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(|e| PkiError::Sign(e.to_string()))?;
        Authority::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// A CA from its PEM certificate and PKCS#8 PEM key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Key(e.to_string()))?;
        if !public_key_matches(cert_pem, &key)? {
            return Err(PkiError::Key(
                "the key does not belong to the CA certificate".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| PkiError::Certificate(e.to_string()))?;
        Ok(Authority {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A certificate for `request`'s public key, with everything else from `leaf`.
    pub fn issue(
        &self,
        request: &Request,
        leaf: &Leaf,
        validity: Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams {
            params: leaf.params(validity, SystemTime::now())?,
            public_key: request.public_key.clone(),
        };
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| PkiError::Sign(e.to_string()))?;
        Ok(cert.pem())
    }

    /// A certificate and a fresh key for `leaf` (the signer's own serving certificate).
    pub fn issue_with_key(
        &self,
        leaf: &Leaf,
        validity: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate().map_err(|e| PkiError::Key(e.to_string()))?;
        let cert = leaf
            .params(validity, SystemTime::now())?
            .signed_by(&key, &self.issuer)
            .map_err(|e| PkiError::Sign(e.to_string()))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn public_key_matches(cert_pem: &str, key: &KeyPair) -> Result<bool, PkiError> {
    let der = pem_block(cert_pem, "CERTIFICATE")
        .ok_or_else(|| PkiError::Certificate("no CERTIFICATE block".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// The content of the first PEM block labelled `label`.
pub fn pem_block(pem: &str, label: &str) -> Option<Vec<u8>> {
    pem::parse_many(pem)
        .ok()?
        .into_iter()
        .find(|p| p.tag() == label)
        .map(|p| p.into_contents())
}

/// A certificate signing request whose signature checked: what it asks for.
#[derive(Clone, Debug)]
pub struct Request {
    pub common_name: Option<String>,
    pub organizations: Vec<String>,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Subject alternative names other than DNS names and IP addresses (URIs, emails, ...).
    pub other_names: usize,
    pub is_ca: bool,
    public_key: rcgen::PublicKey,
}

impl Request {
    /// Parses a PEM `CERTIFICATE REQUEST` and checks its self-signature (proof that the
    /// requester holds the private key). Unknown extensions are refused.
    pub fn parse_pem(pem: &str) -> Result<Request, PkiError> {
        let parsed = CertificateSigningRequestParams::from_pem(pem)
            .map_err(|e| PkiError::Request(e.to_string()))?;
        let params = parsed.params;
        let (mut dns_names, mut ips, mut other_names) = (Vec::new(), Vec::new(), 0);
        for san in &params.subject_alt_names {
            match san {
                SanType::DnsName(n) => dns_names.push(n.as_str().to_owned()),
                SanType::IpAddress(ip) => ips.push(*ip),
                _ => other_names += 1,
            }
        }
        let mut common_name = None;
        let mut organizations = Vec::new();
        for (ty, value) in params.distinguished_name.iter() {
            match ty {
                DnType::CommonName => common_name = text(value),
                DnType::OrganizationName => organizations.extend(text(value)),
                _ => {}
            }
        }
        Ok(Request {
            common_name,
            organizations,
            dns_names,
            ips,
            other_names,
            is_ca: matches!(params.is_ca, IsCa::Ca(_)),
            public_key: parsed.public_key,
        })
    }
}

/// The text of a name attribute (the string types requests use).
fn text(value: &DnValue) -> Option<String> {
    match value {
        DnValue::Utf8String(s) => Some(s.clone()),
        DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A certificate signing request for `leaf`'s subject and names, with a new key: (request
/// PEM, PKCS#8 key PEM).
pub fn request(leaf: &Leaf) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(|e| PkiError::Key(e.to_string()))?;
    let mut params = leaf.params(Duration::ZERO, SystemTime::now())?;
    // Lifetime and serial are the signer's; a request carries neither.
    params.serial_number = None;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| PkiError::Request(e.to_string()))?;
    let pem = csr.pem().map_err(|e| PkiError::Request(e.to_string()))?;
    Ok((pem, key.serialize_pem()))
}

/// When a PEM certificate (the first in the text) is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    pub fn of_pem(pem: &str) -> Result<Validity, PkiError> {
        let der = pem_block(pem, "CERTIFICATE")
            .ok_or_else(|| PkiError::Certificate("no CERTIFICATE block".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::Certificate(e.to_string()))?;
        let at = |t: i64| {
            u64::try_from(t)
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        Ok(Validity {
            not_before: at(cert.validity().not_before.timestamp()),
            not_after: at(cert.validity().not_after.timestamp()),
        })
    }

    /// The moment `fraction` (0 to 1) of the lifetime has passed.
    pub fn at_fraction(&self, fraction: f64) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life.mul_f64(fraction.clamp(0.0, 1.0))
    }
}

/// Sleeps until the wall-clock time `when` (at once if it has passed): a renewal time.
/// `false` if cancelled first.
pub async fn sleep_until(when: SystemTime, cancel: &tokio_util::sync::CancellationToken) -> bool {
    let wait = when
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(wait) => true,
    }
}

/// Writes `content` to a temporary file beside `path` (mode 0600: keys are among it) and
/// renames it over `path`, so a reader sees the old file or the new one, never half of one.
pub fn write_atomically(path: &std::path::Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_leaf(node: &str) -> Leaf {
        Leaf {
            common_name: format!("system:node:{node}"),
            organizations: vec!["system:nodes".into()],
            ips: vec!["10.0.0.1".parse().unwrap()],
            client: true,
            server: true,
            ..Leaf::default()
        }
    }

    #[test]
    fn a_request_round_trips_and_is_issued_with_the_signers_choices() {
        let ca = Authority::generate("kubenft-ca", Duration::from_secs(3600)).unwrap();
        let (csr, key) = request(&node_leaf("a")).unwrap();
        let req = Request::parse_pem(&csr).unwrap();
        assert_eq!(req.common_name.as_deref(), Some("system:node:a"));
        assert_eq!(req.organizations, ["system:nodes"]);
        assert_eq!(req.ips, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(req.dns_names.is_empty() && req.other_names == 0 && !req.is_ca);

        // The signer names node b, whatever the request said: only the key is taken.
        let cert = ca
            .issue(&req, &node_leaf("b"), Duration::from_secs(600))
            .unwrap();
        let der = pem_block(&cert, "CERTIFICATE").unwrap();
        assert_eq!(
            crate::common_name(&der).as_deref(),
            Some("system:node:b"),
            "{cert}"
        );
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let key = KeyPair::from_pem(&key).unwrap();
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let v = Validity::of_pem(&cert).unwrap();
        let life = v.not_after.duration_since(v.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(600 + 60));
    }

    #[test]
    fn a_tampered_request_is_refused() {
        let (csr, _) = request(&node_leaf("a")).unwrap();
        let mut der = pem_block(&csr, "CERTIFICATE REQUEST").unwrap();
        // Flip a byte inside the signed part: the self-signature no longer checks.
        let at = der.len() / 3;
        der[at] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        assert!(Request::parse_pem(&tampered).is_err());
        assert!(Request::parse_pem("garbage").is_err());
    }

    #[test]
    fn an_authority_survives_its_pem_and_refuses_a_foreign_key() {
        let ca = Authority::generate("kubenft-ca", Duration::from_secs(3600)).unwrap();
        let again = Authority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let other = Authority::generate("other", Duration::from_secs(3600)).unwrap();
        assert!(Authority::from_pem(ca.cert_pem(), other.key_pem()).is_err());
        let (cert, key) = again
            .issue_with_key(
                &Leaf {
                    common_name: "kubenft-controller".into(),
                    dns_names: vec!["kubenft-controller.kubenft-system.svc".into()],
                    server: true,
                    ..Leaf::default()
                },
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(KeyPair::from_pem(&key).is_ok());
        assert!(Validity::of_pem(&cert).is_ok());
    }
}

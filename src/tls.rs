//! TLS for kura's own connections to PostgreSQL, CouchDB and the object store.
//!
//! One rustls stack (the one reqwest and the AWS SDK already carry), trust roots from the
//! system plus CA files the user names, and handshake failures turned into a sentence that
//! says which check failed (unknown CA, name mismatch, expired) and which option fixes it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::error::{Error, Result};

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// The chain up to a trusted root, and the host name (libpq `verify-full`; HTTPS).
    Full,
    /// The chain only (libpq `verify-ca`, and `require`/`prefer` when a root file exists).
    Chain,
    /// Encrypted but not authenticated (libpq `require`/`prefer` without a root file).
    Nothing,
}

/// A client certificate (PEM chain) and its private key (PEM: PKCS#8, PKCS#1 or SEC1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Which roots are trusted and which certificate, if any, kura presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM files of CA certificates, trusted besides the system's roots.
    pub ca_files: Vec<PathBuf>,
    /// Trust the operating system's roots too (HTTPS); libpq trusts only its root file.
    pub system_roots: bool,
    pub client_cert: Option<ClientCert>,
}

/// The crypto provider the AWS SDK uses too, named explicitly: with two providers compiled
/// in (ring comes with reqwest), rustls refuses to guess.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl TlsFiles {
    /// A rustls client configuration; a CA, certificate or key file that cannot be read is a
    /// usage error naming the file.
    pub fn client_config(&self, verify: Verify) -> Result<ClientConfig> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::failed(format!("TLS setup: {e}")))?;
        let builder = match verify {
            Verify::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider))),
            Verify::Full | Verify::Chain => {
                let (roots, pinned) = self.roots()?;
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| Error::usage(format!("no usable CA certificate: {e}")))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Checked {
                        webpki,
                        pinned,
                        names: verify == Verify::Full,
                    }))
            }
        };
        match &self.client_cert {
            None => Ok(builder.with_no_client_auth()),
            Some(client) => {
                let chain = read_certificates(&client.cert)?;
                let key = PrivateKeyDer::from_pem_file(&client.key).map_err(|e| {
                    Error::usage(format!(
                        "cannot read the private key {}: {e} (expected a PEM key)",
                        client.key.display()
                    ))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    Error::usage(format!(
                        "the client certificate {} does not go with the key {}: {e}",
                        client.cert.display(),
                        client.key.display()
                    ))
                })
            }
        }
    }

    /// The trusted roots, and the certificates of the CA files themselves (a self-signed
    /// server certificate may be given as its own root).
    fn roots(&self) -> Result<(RootCertStore, Vec<CertificateDer<'static>>)> {
        let mut roots = RootCertStore::empty();
        let mut pinned = Vec::new();
        if self.system_roots {
            let native = rustls_native_certs::load_native_certs();
            for err in &native.errors {
                tracing::debug!(error = %err, "skipping unreadable system CA certificates");
            }
            let (added, ignored) = roots.add_parsable_certificates(native.certs);
            tracing::debug!(added, ignored, "system CA certificates");
        }
        for file in &self.ca_files {
            for cert in read_certificates(file)? {
                pinned.push(cert.clone());
                roots.add(cert).map_err(|e| {
                    Error::usage(format!(
                        "the CA file {} holds a certificate that is not a usable CA: {e}",
                        file.display()
                    ))
                })?;
            }
        }
        Ok((roots, pinned))
    }
}

/// A PEM file of certificates, checked to hold at least one, as bytes (for clients that take
/// PEM themselves).
pub fn read_pem_certificates(file: &Path) -> Result<Vec<u8>> {
    read_certificates(file)?;
    std::fs::read(file).map_err(|e| Error::usage(format!("cannot read {}: {e}", file.display())))
}

fn read_certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::usage(format!("cannot read {}: {e}", file.display())))?;
    if certs.is_empty() {
        return Err(Error::usage(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            file.display()
        )));
    }
    Ok(certs)
}

/// webpki's checks, with libpq's two allowances: `verify-ca` does not check the name, and a
/// self-signed server certificate given as the root itself (as PostgreSQL's documentation
/// makes them) is trusted as that exact certificate, which webpki alone refuses as "a CA
/// used as an end entity". Its validity dates are then not checked; its name is.
#[derive(Debug)]
struct Checked {
    webpki: Arc<WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
    names: bool,
}

impl ServerCertVerifier for Checked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.names => Ok(ServerCertVerified::assertion()),
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(other)))
                if other.to_string().contains("CaUsedAsEndEntity")
                    && self
                        .pinned
                        .iter()
                        .any(|root| root.as_ref() == end_entity.as_ref()) =>
            {
                if self.names {
                    let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                    rustls::client::verify_server_name(&parsed, server_name)?;
                }
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// libpq's `require` without a root file: any certificate, but the handshake's signatures
/// are still checked, so the session key belongs to whoever holds that certificate.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What the user can do about a failed handshake, in the words of the caller's options.
pub struct Fixes<'a> {
    /// How to trust the CA, e.g. "give the CA with --couchdb-ca-file FILE".
    pub unknown_ca: &'a str,
    /// How to get past a name mismatch.
    pub name_mismatch: &'a str,
}

/// A handshake failure found in an error's cause chain, or `None` when TLS was not the
/// problem.
pub fn explain_failure(
    err: &(dyn std::error::Error + 'static),
    host: &str,
    fixes: &Fixes<'_>,
) -> Option<String> {
    let tls = find_rustls_error(err)?;
    let cert = format!("the TLS certificate of {host}");
    Some(match tls {
        rustls::Error::InvalidCertificate(problem) => match problem {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "{cert} is not signed by a trusted CA (unknown CA): {}",
                fixes.unknown_ca
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "{cert} is not issued for that name (name mismatch; the name must be in its subjectAltName, a CN alone does not count): {}",
                    fixes.name_mismatch
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("{cert} has expired: renew it on the server (or check this machine's clock)")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("{cert} is not valid yet: check the clocks of this machine and the server")
            }
            CertificateError::Revoked => format!("{cert} has been revoked: renew it on the server"),
            other => format!("{cert} was rejected ({other:?}): {}", fixes.unknown_ca),
        },
        rustls::Error::AlertReceived(alert) => format!(
            "{host} ended the TLS handshake ({alert:?}): if it requires a client certificate, give one the server trusts (and its key)"
        ),
        other => format!("the TLS handshake with {host} failed: {other}"),
    })
}

fn find_rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(current) = next {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // io::Error's source() skips the error it wraps, which is where rustls puts its own.
        if let Some(inner) = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(tls) = find_rustls_error(inner) {
                return Some(tls);
            }
        }
        next = current.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXES: Fixes<'static> = Fixes {
        unknown_ca: "give the CA with --ca FILE",
        name_mismatch: "use the certificate's name",
    };

    #[test]
    fn failures_are_found_through_io_errors_and_named() {
        let wrapped = std::io::Error::other(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let outer =
            crate::error::Error::with_source(crate::ErrorKind::Database, "connecting", wrapped);
        let text = explain_failure(&outer, "db.example:5432", &FIXES).unwrap();
        assert!(text.contains("db.example:5432"), "{text}");
        assert!(text.contains("unknown CA"), "{text}");
        assert!(text.contains("--ca FILE"), "{text}");

        let name = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        let text = explain_failure(&name, "h", &FIXES).unwrap();
        assert!(text.contains("name mismatch") && text.contains("certificate's name"));

        let expired = rustls::Error::InvalidCertificate(CertificateError::Expired);
        assert!(explain_failure(&expired, "h", &FIXES)
            .unwrap()
            .contains("expired"));

        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(explain_failure(&plain, "h", &FIXES).is_none());
    }

    #[test]
    fn unreadable_files_are_usage_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let files = TlsFiles {
            ca_files: vec![empty.clone()],
            ..TlsFiles::default()
        };
        let err = files.client_config(Verify::Full).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Usage);
        assert!(err.to_string().contains("empty.pem"), "{err}");

        let missing = TlsFiles {
            ca_files: vec![dir.path().join("missing.pem")],
            ..TlsFiles::default()
        };
        let err = missing.client_config(Verify::Chain).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        // Nothing to verify against is not an error until a certificate is checked.
        TlsFiles::default().client_config(Verify::Nothing).unwrap();
    }
}

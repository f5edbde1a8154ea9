//! libpq's `sslmode` for kura's own connections (preflight, snapshot, counts, database
//! creation, deep verify), over rustls. The child tools are libpq programs and read the same
//! settings themselves (`PGSSLMODE`, `PGSSLROOTCERT`, … from the URL or the environment).
//!
//! As in libpq: the default mode is `prefer`; a root certificate file (`sslrootcert`, else
//! `~/.postgresql/root.crt` when it exists) makes every TLS mode check the chain, and only
//! `verify-full` checks the host name; `sslrootcert=system` (PostgreSQL 16) trusts the
//! system's roots and requires `verify-full`.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::Socket;

use crate::error::{Error, Result};
use crate::tls::{ClientCert, TlsFiles, Verify};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::usage(format!(
                    "sslmode={other:?} is not a libpq sslmode: use disable, allow, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    None,
    File(PathBuf),
    System,
}

/// The TLS settings of one PostgreSQL URL, resolved as libpq resolves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    roots: Roots,
    client_cert: Option<ClientCert>,
}

impl PgTls {
    /// `setting(name)` is the URL's query parameter; the `PGSSL*` environment and libpq's
    /// files under `~/.postgresql` fill what the URL leaves out.
    pub fn resolve(setting: impl Fn(&str) -> Option<String>) -> Result<PgTls> {
        let value = |param: &str, var: &str| {
            setting(param)
                .or_else(|| std::env::var(var).ok())
                .filter(|v| !v.is_empty())
        };
        let home_file = |name: &str| {
            std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".postgresql").join(name))
                .filter(|path| path.is_file())
        };
        let root_setting = value("sslrootcert", "PGSSLROOTCERT");
        let mode = match value("sslmode", "PGSSLMODE") {
            Some(text) => SslMode::parse(&text)?,
            // libpq 16: system roots vouch for names, so they make verify-full the default.
            None if root_setting.as_deref() == Some("system") => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if setting("sslpassword").is_some() {
            return Err(Error::usage(
                "sslpassword: encrypted client keys are not supported; store the key decrypted (openssl pkey -in KEY -out PLAIN), readable by kura only",
            ));
        }
        let roots = match root_setting {
            Some(system) if system == "system" => Roots::System,
            // Stricter than libpq, which ignores a missing named file below verify-ca: a file
            // the user names and that is not there is a mistake to report, not to skip.
            Some(file) => match PathBuf::from(&file) {
                path if path.is_file() => Roots::File(path),
                _ if mode == SslMode::Disable => Roots::None,
                _ => {
                    return Err(Error::usage(format!(
                        "the root certificate file {file:?} (sslrootcert / PGSSLROOTCERT) does not exist: give the path of the CA certificate that signed the server's"
                    )))
                }
            },
            None => home_file("root.crt").map_or(Roots::None, Roots::File),
        };
        if roots == Roots::System && mode != SslMode::VerifyFull {
            return Err(Error::usage(format!(
                "sslrootcert=system needs sslmode=verify-full (not {}): system roots vouch for names, so the name must be checked",
                mode.as_str()
            )));
        }
        if roots == Roots::None && matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) {
            return Err(Error::usage(format!(
                "sslmode={} needs the CA certificate that signed the server's: add sslrootcert=FILE to the URL (or set PGSSLROOTCERT), or sslrootcert=system for a certificate from a public CA",
                mode.as_str()
            )));
        }
        let client_cert = match (
            value("sslcert", "PGSSLCERT")
                .map(PathBuf::from)
                .or_else(|| home_file("postgresql.crt")),
            value("sslkey", "PGSSLKEY")
                .map(PathBuf::from)
                .or_else(|| home_file("postgresql.key")),
        ) {
            (Some(cert), Some(key)) => {
                check_key_permissions(&key)?;
                Some(ClientCert { cert, key })
            }
            (Some(cert), None) => {
                return Err(Error::usage(format!(
                    "the client certificate {} has no key: add sslkey=FILE to the URL (or set PGSSLKEY)",
                    cert.display()
                )))
            }
            (None, _) => None,
        };
        Ok(PgTls {
            mode,
            roots,
            client_cert,
        })
    }

    /// What the first attempt asks of the server; `allow` starts without TLS.
    pub fn first_attempt(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Wire;
        match self.mode {
            SslMode::Disable | SslMode::Allow => Wire::Disable,
            SslMode::Prefer => Wire::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Wire::Require,
        }
    }

    fn verify(&self) -> Verify {
        match (self.mode, &self.roots) {
            (SslMode::VerifyFull, _) => Verify::Full,
            (_, Roots::None) => Verify::Nothing,
            _ => Verify::Chain,
        }
    }

    /// The connector every mode uses; with `disable` it is never asked to connect.
    pub fn connector(&self) -> Result<RustlsConnect> {
        let files = TlsFiles {
            ca_files: match &self.roots {
                Roots::File(path) => vec![path.clone()],
                _ => Vec::new(),
            },
            system_roots: self.roots == Roots::System,
            client_cert: self.client_cert.clone(),
        };
        let verify = match self.mode {
            SslMode::Disable => Verify::Nothing,
            _ => self.verify(),
        };
        let files = match self.mode {
            SslMode::Disable => TlsFiles::default(),
            _ => files,
        };
        let config = files
            .client_config(verify)
            .map_err(|e| e.context("PostgreSQL TLS settings"))?;
        Ok(RustlsConnect(Arc::new(config)))
    }
}

/// pg_dump and psql (libpq) refuse a key others can read, but only after kura's own
/// connection worked and the backup started: refuse it up front, in libpq's terms.
fn check_key_permissions(key: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(key) else {
        return Err(Error::usage(format!(
            "the client key {} (sslkey / PGSSLKEY) does not exist",
            key.display()
        )));
    };
    let mode = meta.mode() & 0o777;
    // libpq's rule: 0600 for a key of our own user, 0640 for root's, others are not checked.
    let allowed = match meta.uid() {
        uid if uid == unsafe { libc::geteuid() } => 0o600,
        0 => 0o640,
        _ => 0o777,
    };
    if mode & !allowed != 0 {
        return Err(Error::usage(format!(
            "the client key {} is readable by others (mode {mode:o}), which pg_dump and psql refuse: chmod 600 it (0640 when root owns it)",
            key.display()
        )));
    }
    Ok(())
}

/// tokio-postgres' TLS hook, over rustls.
#[derive(Clone)]
pub struct RustlsConnect(Arc<ClientConfig>);

impl MakeTlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type TlsConnect = RustlsHandshake;
    type Error = io::Error;

    // Called for every connection, Unix sockets (host "") and sslmode=disable included: a
    // host that is no TLS name only matters once TLS is actually negotiated.
    fn make_tls_connect(&mut self, host: &str) -> io::Result<RustlsHandshake> {
        Ok(RustlsHandshake {
            config: Arc::clone(&self.0),
            name: ServerName::try_from(host.to_string()).map_err(|e| e.to_string()),
        })
    }
}

pub struct RustlsHandshake {
    config: Arc<ClientConfig>,
    name: std::result::Result<ServerName<'static>, String>,
}

impl TlsConnect<Socket> for RustlsHandshake {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move {
            let name = self
                .name
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            connector
                .connect(name, stream)
                .await
                .map(|tls| RustlsStream(Box::new(tls)))
        })
    }
}

pub struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl TlsStream for RustlsStream {
    // SCRAM channel binding needs the hash algorithm of the server certificate's signature,
    // which would take an X.509 parser; without it SCRAM-SHA-256 still authenticates both
    // sides, and verify-full authenticates the server.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(pairs: &[(&str, &str)]) -> Result<PgTls> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PgTls::resolve(|name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn modes_follow_libpq() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "").unwrap();
        let ca = ca.to_str().unwrap();

        let verify_full = resolve(&[("sslmode", "verify-full"), ("sslrootcert", ca)]).unwrap();
        assert_eq!(verify_full.verify(), Verify::Full);
        let verify_ca = resolve(&[("sslmode", "verify-ca"), ("sslrootcert", ca)]).unwrap();
        assert_eq!(verify_ca.verify(), Verify::Chain);
        // A root file makes require check the chain, as in libpq.
        let require = resolve(&[("sslmode", "require"), ("sslrootcert", ca)]).unwrap();
        assert_eq!(require.verify(), Verify::Chain);
        assert_eq!(
            require.first_attempt(),
            tokio_postgres::config::SslMode::Require
        );
        let allow = resolve(&[("sslmode", "allow"), ("sslrootcert", ca)]).unwrap();
        assert_eq!(
            allow.first_attempt(),
            tokio_postgres::config::SslMode::Disable
        );

        let no_root = resolve(&[("sslmode", "verify-full"), ("sslrootcert", "")]);
        if std::env::var_os("PGSSLROOTCERT").is_none() {
            let err = no_root.unwrap_err();
            assert!(err.to_string().contains("sslrootcert=FILE"), "{err}");
        }
        let missing = resolve(&[
            ("sslmode", "require"),
            ("sslrootcert", "/nonexistent/ca.crt"),
        ])
        .unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/ca.crt"));
        let weak_system =
            resolve(&[("sslmode", "require"), ("sslrootcert", "system")]).unwrap_err();
        assert!(weak_system.to_string().contains("verify-full"));
        let typo = resolve(&[("sslmode", "verify_full")]).unwrap_err();
        assert!(typo.to_string().contains("verify-full"));
        let home_key = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".postgresql/postgresql.key"))
            .is_some_and(|p| p.exists());
        if std::env::var_os("PGSSLKEY").is_none() && !home_key {
            let cert_only = resolve(&[("sslcert", ca)]).unwrap_err();
            assert!(cert_only.to_string().contains("sslkey"), "{cert_only}");
        }
    }
}

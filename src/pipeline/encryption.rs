//! The age stage of the pipeline: between zstd and hashing, every part becomes a standard age
//! v1 file (X25519 recipients, <https://age-encryption.org/v1>), so `age -d -i key.txt part |
//! zstd -d` gives the plain dump back.
//!
//! A backup needs only public keys ([`Recipients`]); reading one needs a secret key
//! ([`Identities`]). Secret keys never reach a message, a log line or `Debug` output.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::catalog::{Encryption, Part};
use crate::error::{Error, ErrorKind, Result};

/// The `algorithm` a manifest records for an age-encrypted part.
pub const AGE: &str = "age";

/// Public keys (`age1…`) every part is encrypted to; any one of their identities decrypts.
#[derive(Clone)]
pub struct Recipients {
    keys: Vec<age::x25519::Recipient>,
    /// As given, in a stable order, for the manifest.
    names: Vec<String>,
}

impl fmt::Debug for Recipients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.names).finish()
    }
}

impl Recipients {
    /// From `--encrypt-to` values and `--encrypt-to-file` files (as `age -R` reads them: one
    /// key per line, `#` comments and blank lines ignored). Only X25519 keys are supported.
    pub fn parse(keys: &[String], files: &[PathBuf]) -> Result<Option<Recipients>> {
        let mut given: Vec<(String, String)> = keys
            .iter()
            .map(|k| (k.trim().to_string(), "--encrypt-to".to_string()))
            .filter(|(k, _)| !k.is_empty())
            .collect();
        for file in files {
            let text = std::fs::read_to_string(file).map_err(|e| {
                Error::with_source(
                    ErrorKind::Usage,
                    format!("cannot read the recipients file {}", file.display()),
                    e,
                )
            })?;
            for (number, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                given.push((
                    line.to_string(),
                    format!("{} line {}", file.display(), number + 1),
                ));
            }
        }
        if given.is_empty() {
            return Ok(None);
        }
        let mut recipients = Recipients {
            keys: Vec::new(),
            names: Vec::new(),
        };
        for (key, origin) in given {
            // Bech32 ignores case, and a pasted key may carry quotes: look anywhere, in any case.
            if key.to_ascii_lowercase().contains("age-secret-key-") {
                // Said without echoing it: the value is a secret.
                return Err(Error::usage(format!(
                    "{origin} holds a secret key where a public recipient (age1…) belongs: pass the public key (`age-keygen -y key.txt` prints it); the backup job must never hold the secret key"
                )));
            }
            // Not echoed either: a malformed value may still be (part of) a secret.
            let parsed = age::x25519::Recipient::from_str(&key).map_err(|_| {
                Error::usage(format!(
                    "{origin}: not an age X25519 recipient (expected age1… as `age-keygen -y` prints it)"
                ))
            })?;
            // The canonical (lower-case) form, which identities are compared with.
            let name = parsed.to_string();
            if !recipients.names.contains(&name) {
                recipients.names.push(name);
                recipients.keys.push(parsed);
            }
        }
        Ok(Some(recipients))
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// What the manifest records for a part encrypted to these recipients.
    pub fn manifest_entry(&self) -> Encryption {
        Encryption {
            algorithm: AGE.to_string(),
            recipients: self.names.clone(),
        }
    }

    /// Start an age file on `output`; call [`AgeWriter::finish`] to complete it.
    pub fn encrypt<W: Write>(&self, output: W) -> io::Result<AgeWriter<W>> {
        let encryptor =
            age::Encryptor::with_recipients(self.keys.iter().map(|k| k as &dyn age::Recipient))
                .map_err(io::Error::other)?;
        encryptor
            .wrap_output(output)
            .map(AgeWriter)
            .map_err(io::Error::other)
    }
}

/// An age file being written.
pub struct AgeWriter<W: Write>(age::stream::StreamWriter<W>);

impl<W: Write> AgeWriter<W> {
    /// Write the last chunk and its tag; without it the file does not decrypt.
    pub fn finish(self) -> io::Result<W> {
        self.0.finish()
    }
}

impl<W: Write> Write for AgeWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Secret keys from `--identity` files, for reading encrypted backups.
pub struct Identities {
    keys: Vec<age::x25519::Identity>,
    files: Vec<PathBuf>,
}

impl fmt::Debug for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The files, never the keys.
        f.debug_struct("Identities")
            .field("files", &self.files)
            .finish()
    }
}

impl Identities {
    /// Read age identity files (`age-keygen` output: `AGE-SECRET-KEY-1…` lines, `#` comments).
    pub fn load(files: &[PathBuf]) -> Result<Option<Arc<Identities>>> {
        if files.is_empty() {
            return Ok(None);
        }
        let mut keys = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(file).map_err(|e| {
                Error::with_source(
                    ErrorKind::Usage,
                    format!("cannot read the identity file {}", file.display()),
                    e,
                )
            })?;
            let before = keys.len();
            for (number, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                // The line is a secret: the error names only where it is.
                let key = age::x25519::Identity::from_str(line).map_err(|_| {
                    Error::usage(format!(
                        "{} line {}: not an age X25519 identity (AGE-SECRET-KEY-1…); only age-keygen keys are supported",
                        file.display(),
                        number + 1
                    ))
                })?;
                keys.push(key);
            }
            if keys.len() == before {
                return Err(Error::usage(format!(
                    "the identity file {} holds no key",
                    file.display()
                )));
            }
        }
        Ok(Some(Arc::new(Identities {
            keys,
            files: files.to_vec(),
        })))
    }

    /// Public keys of these identities.
    pub fn public_keys(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.to_public().to_string())
            .collect()
    }

    /// Whether one of these identities is among `recipients`.
    pub fn opens(&self, recipients: &[String]) -> bool {
        self.public_keys().iter().any(|k| recipients.contains(k))
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Decrypt an age file read from `input`. A header that does not parse, or whose MAC
    /// fails, is an integrity error; no matching key is a usage error (checked before any
    /// read by [`check_can_read`], so it means the manifest and the part disagree).
    pub fn decrypt<'r, R: Read + 'r>(&self, input: R) -> Result<Box<dyn Read + 'r>> {
        let decryptor = age::Decryptor::new(input).map_err(|e| decrypt_error(e, "header"))?;
        let reader = decryptor
            .decrypt(self.keys.iter().map(|k| k as &dyn age::Identity))
            .map_err(|e| decrypt_error(e, "header"))?;
        Ok(Box::new(reader))
    }
}

fn decrypt_error(err: age::DecryptError, what: &str) -> Error {
    match err {
        age::DecryptError::NoMatchingKeys => Error::usage(
            "none of the --identity keys opens this part, although the manifest lists one of them as a recipient",
        ),
        age::DecryptError::Io(e) => Error::with_source(ErrorKind::Storage, "reading", e),
        other => Error::integrity(format!("the age {what} is damaged: {other}")),
    }
}

/// Before anything is created on a target: every encrypted part of `parts` can be opened
/// with `identities`. Otherwise exit 2, naming the backup, its recipients and the option.
pub fn check_can_read<'p>(
    backup: &str,
    parts: impl IntoIterator<Item = &'p Part>,
    identities: Option<&Identities>,
) -> Result<()> {
    let mut recipients: Vec<String> = Vec::new();
    let mut locked = false;
    for part in parts {
        let Some(encryption) = &part.encryption else {
            continue;
        };
        if encryption.algorithm != AGE {
            return Err(Error::usage(format!(
                "part {} of backup {backup} is encrypted with {:?}, which this kura cannot decrypt: upgrade kura",
                part.key, encryption.algorithm
            )));
        }
        if identities.is_some_and(|i| i.opens(&encryption.recipients)) {
            continue;
        }
        locked = true;
        for r in &encryption.recipients {
            if !recipients.contains(r) {
                recipients.push(r.clone());
            }
        }
    }
    if !locked {
        return Ok(());
    }
    Err(Error::usage(match identities {
        None => format!(
            "backup {backup} is encrypted to {}: pass --identity FILE (KURA_IDENTITY_FILE) with the secret key of one of them",
            recipients.join(", ")
        ),
        Some(identities) => format!(
            "backup {backup} is encrypted to {}, and none of the keys in {} (public keys {}) is among them: pass --identity with a key of one of those recipients",
            recipients.join(", "),
            identities
                .files()
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            identities.public_keys().join(", ")
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;

    #[test]
    fn round_trip_and_recipient_checks() {
        let one = age::x25519::Identity::generate();
        let two = age::x25519::Identity::generate();
        let dir = tempfile::tempdir().unwrap();
        let recipients_file = dir.path().join("recipients.txt");
        std::fs::write(
            &recipients_file,
            format!("# escrow\n\n{}\n", two.to_public()),
        )
        .unwrap();
        let recipients = Recipients::parse(&[one.to_public().to_string()], &[recipients_file])
            .unwrap()
            .unwrap();
        assert_eq!(recipients.names().len(), 2);

        let mut sealed = Vec::new();
        let mut writer = recipients.encrypt(&mut sealed).unwrap();
        writer.write_all(b"the plain dump").unwrap();
        writer.finish().unwrap();
        assert!(sealed.starts_with(b"age-encryption.org/v1\n"));

        for key in [&one, &two] {
            let file = dir.path().join("key.txt");
            std::fs::write(
                &file,
                format!("# created: now\n{}\n", key.to_string().expose_secret()),
            )
            .unwrap();
            let identities = Identities::load(&[file]).unwrap().unwrap();
            assert!(identities.opens(recipients.names()));
            let mut plain = String::new();
            identities
                .decrypt(&sealed[..])
                .unwrap()
                .read_to_string(&mut plain)
                .unwrap();
            assert_eq!(plain, "the plain dump");
            assert!(!format!("{identities:?}").contains("AGE-SECRET-KEY"));
        }

        let stranger = age::x25519::Identity::generate();
        let file = dir.path().join("stranger.txt");
        std::fs::write(&file, stranger.to_string().expose_secret()).unwrap();
        let identities = Identities::load(&[file]).unwrap().unwrap();
        assert!(!identities.opens(recipients.names()));
        assert_eq!(
            identities.decrypt(&sealed[..]).err().unwrap().kind(),
            ErrorKind::Usage
        );
        let mut damaged = sealed.clone();
        damaged[30] ^= 1;
        let err = Identities::load(&[dir.path().join("key.txt")])
            .unwrap()
            .unwrap()
            .decrypt(&damaged[..])
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    }

    #[test]
    fn secret_keys_are_refused_as_recipients_without_being_echoed() {
        let secret = age::x25519::Identity::generate().to_string();
        let secret = secret.expose_secret();
        for given in [
            secret.to_string(),
            secret.to_lowercase(),
            format!("\"{secret}\""),
            format!("x{}", &secret[3..]),
        ] {
            let err = Recipients::parse(std::slice::from_ref(&given), &[]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Usage);
            assert!(!err.chain().contains(&given), "{}", err.chain());
            assert!(!err
                .chain()
                .to_lowercase()
                .contains(&secret[20..].to_lowercase()));
        }
        // Upper case is a valid spelling of a recipient; the manifest records the canonical one.
        let public = age::x25519::Identity::generate().to_public().to_string();
        let upper = Recipients::parse(&[public.to_uppercase()], &[])
            .unwrap()
            .unwrap();
        assert_eq!(upper.names(), [public]);
        assert!(Recipients::parse(&[], &[]).unwrap().is_none());
        assert!(Recipients::parse(&["age1nope".into()], &[]).is_err());
    }
}

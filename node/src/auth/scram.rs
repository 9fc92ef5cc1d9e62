//! SCRAM-SHA-256 password verifiers, as PostgreSQL stores them in `pg_authid.rolpassword`
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, RFC 5802/7677): making one
//! from a password (the leader does it once, so the log never holds a password) and checking
//! a password against one. The wire-protocol frontend's SCRAM exchange uses the same parts.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// The parts of a stored SCRAM-SHA-256 verifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// The salt.
    pub salt: Vec<u8>,
    /// SHA-256(HMAC(SaltedPassword, "Client Key")).
    pub stored_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: [u8; 32],
}

/// Most PBKDF2 iterations accepted in a verifier: a verifier is data from the log (a
/// `CREATE ROLE ... PASSWORD 'SCRAM-SHA-256$...'` a client wrote), and checking a password
/// against it costs one HMAC per iteration.
pub const ITERATIONS_MAX: u32 = 1_000_000;

impl Verifier {
    /// Parses a stored verifier; `None` for anything else (an MD5 hash, a plain password, a
    /// malformed or too costly verifier).
    pub fn parse(stored: &str) -> Option<Verifier> {
        let rest = stored.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;
        let iterations: u32 = iterations.parse().ok()?;
        if iterations == 0 || iterations > ITERATIONS_MAX {
            return None;
        }
        let key = |s: &str| -> Option<[u8; 32]> { STANDARD.decode(s).ok()?.try_into().ok() };
        Some(Verifier {
            iterations,
            salt: STANDARD.decode(salt).ok()?,
            stored_key: key(stored_key)?,
            server_key: key(server_key)?,
        })
    }

    /// Whether `password` is the one this verifier was made from.
    pub fn matches(&self, password: &str) -> bool {
        let salted = salted_password(password, &self.salt, self.iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        constant_time_eq(&stored_key, &self.stored_key)
    }
}

/// A new verifier of `password` (random salt, PostgreSQL's default 4096 iterations).
pub fn make_verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

/// Whether `s` looks like a stored SCRAM-SHA-256 verifier (PostgreSQL stores such a
/// "password" as given instead of hashing it).
pub fn is_verifier(s: &str) -> bool {
    Verifier::parse(s).is_some()
}

/// Hi(Normalize(password), salt, i) of RFC 5802: PBKDF2-HMAC-SHA-256. The password is
/// SASLprep-normalized when it can be, as PostgreSQL does.
fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let prepared = stringprep::saslprep(password)
        .map(|p| p.into_owned())
        .unwrap_or_else(|_| password.to_string());
    let mut block = salt.to_vec();
    block.extend_from_slice(&[0, 0, 0, 1]);
    let mut prev = hmac(prepared.as_bytes(), &block);
    let mut out = prev;
    for _ in 1..iterations {
        prev = hmac(prepared.as_bytes(), &prev);
        for (o, p) in out.iter_mut().zip(prev) {
            *o ^= p;
        }
    }
    out
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_accepts_its_password_only() {
        let v = make_verifier("s3cret pass");
        let parsed = Verifier::parse(&v).expect("a verifier");
        assert_eq!(parsed.iterations, 4096);
        assert!(parsed.matches("s3cret pass"));
        assert!(!parsed.matches("s3cret pas"));
        assert!(!parsed.matches(""));
        assert!(is_verifier(&v));
    }

    /// A verifier PostgreSQL 15.18 made (`CREATE ROLE u PASSWORD 'pencil'` with
    /// `password_encryption = 'scram-sha-256'`) matches its password only.
    #[test]
    fn postgres_verifiers_match() {
        let v = Verifier::parse("SCRAM-SHA-256$4096:cqQWOB6eUSfIXAYEF4g1Nw==$nlGiDNrK15YvKSJSWo3Cbl1bkgIEF8L6ldZX4+fUblM=:n506WLvj6Jna73C9PC5S/KVYoqv8vDPpuOn1FsHa2I0=").unwrap();
        assert!(v.matches("pencil"));
        assert!(!v.matches("Pencil"));
    }

    #[test]
    fn other_stored_passwords_are_not_verifiers() {
        assert!(Verifier::parse("md5c2a9c5ab6fb3ebd5c6e5a0f1a9b0a6e1").is_none());
        assert!(Verifier::parse("pencil").is_none());
        assert!(Verifier::parse("SCRAM-SHA-256$0:AAAA$AAAA:AAAA").is_none());
        assert!(Verifier::parse("SCRAM-SHA-256$4096:c2FsdA==$x:y").is_none());
        assert!(Verifier::parse("SCRAM-SHA-256$99999999:c2FsdA==$AAAA:AAAA").is_none());
    }
}

//! Challenge-response authentication over a shared per-user secret.
//!
//! The client proves knowledge of the secret with HMAC-SHA256 over both
//! nonces and its identity; the server's fresh nonce makes a recorded
//! handshake useless for replay. The server proves itself the same way, so a
//! client never trusts an impostor's callbacks.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::message::ConnKind;
use crate::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a user's secret (written as 64 hex digits in its file).
pub const SECRET_LEN: usize = 32;

/// Fill a buffer from the OS's random source.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the OS random source is unavailable");
    b
}

/// What the client's MAC covers.
pub struct Transcript<'a> {
    /// The user authenticating.
    pub user: &'a str,
    /// The client's persistent identity.
    pub client_id: &'a [u8; 16],
    /// The client's epoch (new at every start).
    pub epoch: u64,
    /// Which of the two connections this is.
    pub kind: ConnKind,
    /// The client's fresh random nonce.
    pub client_nonce: &'a [u8; 32],
    /// The server's fresh random nonce.
    pub server_nonce: &'a [u8; 32],
    /// The TLS session's channel binding (`tls::Stream::channel_binding`;
    /// zeros on a plaintext connection): a MAC made for one TLS session
    /// proves nothing on another, so a relay terminating TLS towards
    /// each side cannot pass a client's proof on.
    pub binding: &'a [u8; 32],
}

fn mac(secret: &[u8], label: &[u8], t: &Transcript) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(label);
    m.update(&(t.user.len() as u16).to_be_bytes());
    m.update(t.user.as_bytes());
    m.update(t.client_id);
    m.update(&t.epoch.to_be_bytes());
    m.update(&[t.kind as u8]);
    m.update(t.client_nonce);
    m.update(t.server_nonce);
    m.update(t.binding);
    m.finalize().into_bytes().into()
}

/// The client's proof: HMAC-SHA256 of the transcript under the secret, labelled "client".
pub fn client_mac(secret: &[u8], t: &Transcript) -> [u8; 32] {
    mac(secret, b"coda-v1 client", t)
}

/// The server's proof: HMAC-SHA256 of the transcript under the secret, labelled "server".
pub fn server_mac(secret: &[u8], t: &Transcript) -> [u8; 32] {
    mac(secret, b"coda-v1 server", t)
}

/// Constant-time comparison of MACs.
pub fn mac_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Secrets are stored as 64 hex digits (plus optional trailing newline).
pub fn encode_secret(s: &[u8; SECRET_LEN]) -> String {
    s.iter().map(|b| format!("{b:02x}")).collect()
}

/// The secret from its file's text: 64 hex digits, surrounding whitespace ignored.
pub fn decode_secret(text: &str) -> Result<[u8; SECRET_LEN]> {
    let t = text.trim();
    if t.len() != SECRET_LEN * 2 || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::Invalid(format!(
            "a secret is {} hex digits",
            SECRET_LEN * 2
        )));
    }
    let mut out = [0u8; SECRET_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap();
    }
    Ok(out)
}

/// Read a secret file, refusing one readable by group or others.
pub fn read_secret_file(path: &std::path::Path) -> Result<[u8; SECRET_LEN]> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("secret file {}", path.display()), e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(Error::Access(format!(
            "secret file {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("secret file {}", path.display()), e))?;
    decode_secret(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_bind_every_field() {
        let secret = [9u8; 32];
        let (id, cn, sn) = ([1u8; 16], [2u8; 32], [3u8; 32]);
        let t = Transcript {
            user: "admin",
            client_id: &id,
            epoch: 1,
            kind: ConnKind::Control,
            client_nonce: &cn,
            server_nonce: &sn,
            binding: &[0; 32],
        };
        let a = client_mac(&secret, &t);
        let sn2 = [4u8; 32];
        let t2 = Transcript {
            server_nonce: &sn2,
            ..t
        };
        assert!(
            !mac_eq(&a, &client_mac(&secret, &t2)),
            "a new server nonce gives a new MAC"
        );
        let t3 = Transcript {
            server_nonce: &sn,
            ..t2
        };
        assert!(mac_eq(&a, &client_mac(&secret, &t3)));
        assert!(!mac_eq(&a, &server_mac(&secret, &t3)));
        assert!(!mac_eq(&a, &client_mac(&[8u8; 32], &t3)));
    }

    #[test]
    fn secrets_round_trip_as_hex() {
        let s = random_bytes::<32>();
        assert_eq!(decode_secret(&(encode_secret(&s) + "\n")).unwrap(), s);
        assert!(decode_secret("abc").is_err());
        assert!(decode_secret(&"zz".repeat(32)).is_err());
    }
}

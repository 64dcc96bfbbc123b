//! The handshake of every connection (PROTOCOL.md "Handshake"): Hello,
//! Challenge with a fresh nonce, Auth checked in constant time, Welcome
//! proving the server knows the secret too.

use std::io::BufRead;
use std::net::TcpStream;

use super::volume::{ClientId, VolumeStore};
use super::wire::{error_reply, send};
use crate::proto::auth::{client_mac, mac_eq, random_bytes, server_mac, Transcript};
use crate::proto::frame::{read_frame_max, MAX_HANDSHAKE_FRAME};
use crate::proto::{ConnKind, Msg, PROTOCOL_VERSION};
use crate::{Error, Result};

/// Who is on the other end, once proven.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: String,
    pub client_id: ClientId,
    pub epoch: u64,
    pub kind: ConnKind,
}

fn next_msg<R: BufRead>(r: &mut R, what: &str) -> Result<Msg> {
    match read_frame_max(r, MAX_HANDSHAKE_FRAME)? {
        Some(f) => Msg::decode(&f),
        None => Err(Error::Protocol(format!("connection closed before {what}"))),
    }
}

/// Run the server side of the handshake up to (not including) Welcome,
/// which the caller sends once the connection is attached to its session:
/// a client that got Welcome on its control connection may open bulk ones
/// at once, and they must find the session. On failure the matching
/// `Error` frame has been sent (when the socket allows) and the caller
/// closes.
pub fn accept<R: BufRead>(
    reader: &mut R,
    stream: &mut TcpStream,
    store: &VolumeStore,
) -> Result<(Identity, Msg)> {
    let res = run(reader, stream, store);
    if let Err(e) = &res {
        // Timeouts and resets cannot be answered; everything else can.
        if !matches!(e, Error::Io { .. }) {
            let _ = send(stream, 0, &error_reply(e));
        }
    }
    res
}

fn run<R: BufRead>(
    reader: &mut R,
    stream: &mut TcpStream,
    store: &VolumeStore,
) -> Result<(Identity, Msg)> {
    let (version, kind, user, client_id, epoch, client_nonce) = match next_msg(reader, "Hello")? {
        Msg::Hello {
            version,
            kind,
            user,
            client_id,
            epoch,
            client_nonce,
        } => (version, kind, user, client_id, epoch, client_nonce),
        other => {
            return Err(Error::Protocol(format!(
                "expected Hello, got message type {:#04x}",
                other.kind()
            )))
        }
    };
    if version != PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "protocol version {version} not supported (server speaks {PROTOCOL_VERSION})"
        )));
    }
    let server_nonce: [u8; 32] = random_bytes();
    send(stream, 0, &Msg::Challenge { server_nonce })?;
    let mac = match next_msg(reader, "Auth")? {
        Msg::Auth { mac } => mac,
        other => {
            return Err(Error::Protocol(format!(
                "expected Auth, got message type {:#04x}",
                other.kind()
            )))
        }
    };
    let t = Transcript {
        user: &user,
        client_id: &client_id,
        epoch,
        kind,
        client_nonce: &client_nonce,
        server_nonce: &server_nonce,
    };
    // An unknown user is checked against a random key, so the answer (and
    // its timing) does not tell which users exist.
    let known = store.user_secret(&user)?;
    let secret = known.unwrap_or_else(random_bytes);
    if !mac_eq(&mac, &client_mac(&secret, &t)) || known.is_none() {
        return Err(Error::Auth(format!(
            "user {user:?}: unknown user or wrong secret"
        )));
    }
    // Only now, with the user proven: the id is someone's from here on, so
    // a user presenting another's id is refused before it touches anything.
    store.claim_client(&client_id, &user, kind == ConnKind::Control)?;
    let welcome = Msg::Welcome {
        server_id: store.server_id(),
        root: store.root_fid(),
        server_mac: server_mac(&secret, &t),
    };
    Ok((
        Identity {
            user,
            client_id,
            epoch,
            kind,
        },
        welcome,
    ))
}

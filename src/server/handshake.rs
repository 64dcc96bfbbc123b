//! The handshake of every connection (PROTOCOL.md "Handshake"): Hello,
//! Challenge with a fresh nonce, Auth checked in constant time, Welcome
//! proving the server knows the secret too. The message logic is
//! `proto::handshake::ServerHandshake`; this drives it over the socket and
//! adds what needs the store (secrets, the client id's owner).

use std::io::BufRead;
use std::time::Duration;

use super::volume::{ClientId, VolumeStore};
use super::wire::{error_reply, send};
use crate::proto::auth::random_bytes;
use crate::proto::frame::{read_frame_max, MAX_HANDSHAKE_FRAME};
use crate::proto::handshake::ServerHandshake;
use crate::proto::{ConnKind, Msg};
use crate::tls::Stream;
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
/// closes. `claim_here`: a control connection's claim of its client id is
/// committed here (a lone server); otherwise the id is only checked.
#[allow(clippy::too_many_arguments)] // the connection, and the server's settings
pub fn accept<R: BufRead>(
    reader: &mut R,
    stream: &mut Stream,
    store: &VolumeStore,
    binding: [u8; 32],
    break_timeout: Duration,
    seen_refresh: u64,
    claim_here: bool,
) -> Result<(Identity, Msg)> {
    let res = run(
        reader,
        stream,
        store,
        binding,
        break_timeout,
        seen_refresh,
        claim_here,
    );
    if let Err(e) = &res {
        // Timeouts and resets cannot be answered; everything else can.
        if !matches!(e, Error::Io { .. }) {
            let _ = send(stream, 0, &error_reply(e));
        }
    }
    res
}

#[allow(clippy::too_many_arguments)]
fn run<R: BufRead>(
    reader: &mut R,
    stream: &mut Stream,
    store: &VolumeStore,
    binding: [u8; 32],
    break_timeout: Duration,
    seen_refresh: u64,
    claim_here: bool,
) -> Result<(Identity, Msg)> {
    let mut hs = ServerHandshake::new(random_bytes(), binding);
    let challenge = hs.hello(next_msg(reader, hs.expecting())?)?;
    send(stream, 0, &challenge)?;
    let proven = hs.auth(next_msg(reader, hs.expecting())?, |user| {
        store.user_secret(user)
    })?;
    // Only now, with the user proven: the id is someone's from here on, so
    // a user presenting another's id is refused before it touches anything.
    // A group member only checks here: its leader claims through the log
    // once its leadership is confirmed (replication::machine::claim_client).
    store.claim_client(
        &proven.client_id,
        &proven.user,
        claim_here && proven.kind == ConnKind::Control,
        seen_refresh,
    )?;
    let timeout_ms = u32::try_from(break_timeout.as_millis()).unwrap_or(u32::MAX);
    let welcome = proven.welcome(store.server_id(), store.root_fid(), timeout_ms);
    Ok((
        Identity {
            user: proven.user,
            client_id: proven.client_id,
            epoch: proven.epoch,
            kind: proven.kind,
        },
        welcome,
    ))
}

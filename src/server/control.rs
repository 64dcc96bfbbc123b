//! A control connection: its reader thread answers Ping and takes BreakAck
//! inline (liveness never waits behind work), hands every other request to
//! the worker pool, and a writer thread owns the socket's sending side so
//! frames from many threads never interleave and no worker blocks on a
//! slow peer.

use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;

use crossbeam_channel::{unbounded, Receiver, Sender};

use super::handshake::Identity;
use super::log;
use super::sessions::{ClientCtx, ControlLink};
use super::wire::{close_after_error, error_reply, error_reply_at, frame_for, Out};
use super::Shared;
use crate::proto::codec::ATTR_LEN;
use crate::proto::{read_frame, Msg, MAX_FRAME};
use crate::{Error, Result};

/// Most fids one GetAttrs may name: every slot of the reply must fit in one
/// frame (MAX_FIDS slots would not).
pub const MAX_ATTRS_REPLY: usize = (MAX_FRAME - 9 - 4) / (1 + ATTR_LEN);

pub fn serve(shared: Arc<Shared>, mut reader: BufReader<TcpStream>, ident: Identity, welcome: Msg) {
    // A silent connection is reaped (see ServerConfig::idle_timeout).
    let _ = reader.get_ref().set_read_timeout(Some(shared.idle_timeout));
    let mut stream = reader.get_ref().try_clone();
    let (sock_w, sock_s) = match (reader.get_ref().try_clone(), reader.get_ref().try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => {
            log::warn(format_args!("cannot clone a socket; dropping connection"));
            return;
        }
    };
    let (tx, rx) = unbounded::<Out>();
    let writer = match std::thread::Builder::new()
        .name("coda-ctl-writer".into())
        .spawn(move || writer_loop(sock_w, rx))
    {
        Ok(h) => h,
        Err(e) => {
            log::warn(format_args!("cannot spawn a writer thread: {e}"));
            return;
        }
    };
    let ctx = shared.registry.open_control(
        ident.client_id,
        ident.epoch,
        ControlLink {
            out: tx.clone(),
            sock: sock_s,
        },
    );
    // Welcome goes out only now that the session exists (see handshake).
    let _ = tx.send(Out::Frame(frame_for(0, &welcome)));
    log::info(format_args!(
        "{} (user {}) connected: control from {}",
        ctx.name(),
        ident.user,
        reader
            .get_ref()
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    ));

    let (why, protocol_error) = read_loop(&shared, &mut reader, &ctx, &tx);
    if protocol_error {
        log::info(format_args!("{}: protocol error: {why}", ctx.name()));
    }
    // Callbacks and staged uploads go at once; the socket closes below,
    // after the writer flushed any last error frame.
    shared.registry.leave(&ctx.id, ctx.gen, &why);
    let _ = tx.send(Out::Close);
    drop(tx);
    let _ = writer.join();
    if let Ok(s) = stream.as_mut() {
        if protocol_error {
            close_after_error(s);
        } else {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Returns why the connection ended and whether it was the peer's fault.
fn read_loop(
    shared: &Arc<Shared>,
    reader: &mut BufReader<TcpStream>,
    ctx: &ClientCtx,
    tx: &Sender<Out>,
) -> (String, bool) {
    loop {
        let frame = match read_frame(reader) {
            Ok(Some(f)) => f,
            Ok(None) => return ("connection closed".into(), false),
            Err(Error::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let ms = shared.idle_timeout.as_millis();
                return (format!("silent for {ms} ms"), false);
            }
            Err(Error::Io { source, .. }) => return (format!("connection lost: {source}"), false),
            Err(e) => {
                let _ = tx.send(Out::Frame(frame_for(0, &error_reply(&e))));
                return (e.to_string(), true);
            }
        };
        let id = frame.id;
        let msg = match Msg::decode(&frame) {
            Ok(m) => m,
            Err(e) => {
                let _ = tx.send(Out::Frame(frame_for(id, &error_reply(&e))));
                return (e.to_string(), true);
            }
        };
        match msg {
            Msg::Ping => {
                let _ = tx.send(Out::Frame(frame_for(id, &Msg::Pong)));
            }
            Msg::BreakAck => shared.registry.break_ack(ctx, id),
            m @ (Msg::GetAttrs { .. }
            | Msg::ReadDir { .. }
            | Msg::AllocFids { .. }
            | Msg::ValidateVolume { .. }
            | Msg::Reintegrate { .. }) => {
                let (shared2, ctx2, tx2) = (Arc::clone(shared), *ctx, tx.clone());
                shared.pool.submit(move || {
                    let reply = handle(&shared2, &ctx2, m).unwrap_or_else(|e| error_reply(&e));
                    let _ = tx2.send(Out::Frame(frame_for(id, &reply)));
                });
            }
            other => {
                let e = Error::Protocol(format!(
                    "message type {:#04x} is not a control-connection request",
                    other.kind()
                ));
                let _ = tx.send(Out::Frame(frame_for(id, &error_reply(&e))));
                return (e.to_string(), true);
            }
        }
    }
}

/// One request on a worker thread.
fn handle(shared: &Shared, ctx: &ClientCtx, msg: Msg) -> Result<Msg> {
    match msg {
        Msg::GetAttrs { fids } => {
            if fids.len() > MAX_ATTRS_REPLY {
                return Err(Error::Invalid(format!(
                    "{} fids in one GetAttrs; at most {MAX_ATTRS_REPLY} fit in a reply",
                    fids.len()
                )));
            }
            // Callback first, then read: a commit after the read is
            // followed by a break (PROTOCOL "Callbacks").
            shared.registry.register(ctx, &fids);
            let items = shared.store.get_attrs(&fids)?;
            let missing: Vec<_> = fids
                .iter()
                .zip(&items)
                .filter(|(_, it)| it.is_err())
                .map(|(f, _)| *f)
                .collect();
            if !missing.is_empty() {
                shared.registry.unregister(ctx, &missing);
            }
            Ok(Msg::Attrs { items })
        }
        Msg::ReadDir { fid, cursor } => {
            shared.registry.register(ctx, &[fid]);
            match shared.store.read_dir(fid, cursor) {
                Ok((attr, entries, next)) => Ok(Msg::DirPage {
                    attr,
                    entries,
                    next,
                }),
                Err(e) => {
                    shared.registry.unregister(ctx, &[fid]);
                    Err(e)
                }
            }
        }
        Msg::AllocFids { volume, count } => {
            let first_vnode = shared.store.alloc_fids(&ctx.id, volume, count)?;
            Ok(Msg::FidRange {
                volume,
                first_vnode,
                count,
            })
        }
        Msg::ValidateVolume { volume, stamp } => {
            // Callback first, then read (as for GetAttrs).
            let vf = super::meta::volume_fid(volume);
            shared.registry.register(ctx, &[vf]);
            match shared.store.volume_stamp(volume, &ctx.id) {
                Ok((now, foreign)) => Ok(Msg::VolumeStamp {
                    volume,
                    stamp: now,
                    valid: foreign <= stamp,
                }),
                Err(e) => {
                    shared.registry.unregister(ctx, &[vf]);
                    Err(e)
                }
            }
        }
        Msg::Reintegrate { records } => {
            let lookup = |up: u64| shared.registry.staged(ctx, up);
            match shared.store.reintegrate(&ctx.id, &records, &lookup) {
                Ok(out) => {
                    shared.registry.consume_uploads(ctx, &out.consumed_uploads);
                    if !out.replayed {
                        shared.registry.break_callbacks(
                            ctx,
                            &out.changed,
                            &out.deleted,
                            shared.break_timeout,
                        );
                    }
                    Ok(Msg::Reintegrated {
                        results: out.results,
                    })
                }
                Err(b) => {
                    if matches!(b.error, Error::Io { .. } | Error::Eio(_)) {
                        log::warn(format_args!("{}: batch failed: {}", ctx.name(), b.error));
                    }
                    Ok(error_reply_at(&b.error, b.index))
                }
            }
        }
        other => Err(Error::Protocol(format!(
            "unexpected message {:#04x}",
            other.kind()
        ))),
    }
}

/// Owns the sending side: writes queued frames in order. A write that fails
/// (peer gone, or stuck past the socket's send timeout) cuts the socket so
/// the reader notices and the session ends.
fn writer_loop(mut sock: TcpStream, rx: Receiver<Out>) {
    for out in rx {
        match out {
            Out::Frame(bytes) => {
                if sock.write_all(&bytes).is_err() {
                    let _ = sock.shutdown(Shutdown::Both);
                    return;
                }
            }
            Out::Close => {
                let _ = sock.flush();
                let _ = sock.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

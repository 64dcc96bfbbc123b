//! A bulk connection: one transfer at a time, on the connection's own
//! thread. Fetch streams an object file with `sendfile` from an fd opened
//! under the metadata snapshot (no lock held while sending); Upload streams
//! raw bytes into a staging file in chunks and replies once they are
//! written. The staged file is not fsynced here: staged uploads do not
//! survive a restart anyway, and the batch whose Store uses one fsyncs its
//! data before that batch commits (reintegrate.rs), so a file costs one
//! data fsync, shared with the rest of its group commit.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::handshake::Identity;
use super::log;
use super::objects;
use super::sessions::ClientCtx;
use super::volume::FetchData;
use super::wire::{close_after_error, error_reply, frame_for, send};
use super::Shared;
use crate::proto::{read_frame, Fid, Msg, BULK_CHUNK};
use crate::tls::Stream;
use crate::{Error, Result};

/// A peer silent this long in the middle of raw upload bytes is dropped.
const RAW_READ_TIMEOUT: Duration = Duration::from_secs(60);

static TMP_SERIAL: AtomicU64 = AtomicU64::new(0);

pub fn serve(
    shared: Arc<Shared>,
    mut reader: BufReader<Stream>,
    ident: Identity,
    welcome: Msg,
    serial: u64,
) {
    let mut stream = match reader.get_ref().try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let attached = stream
        .tcp()
        .try_clone()
        .map_err(|e| Error::io("clone socket", e))
        .and_then(|s| {
            shared
                .registry
                .attach_bulk(ident.client_id, ident.epoch, serial, s)
        });
    let ctx = match attached {
        Ok(c) => c,
        Err(e) => {
            log::info(format_args!(
                "bulk connection of client {} epoch {} refused: {e}",
                objects::hex(&ident.client_id),
                ident.epoch
            ));
            let _ = send(&mut stream, 0, &error_reply(&e));
            close_after_error(&mut stream);
            return;
        }
    };
    if send(&mut stream, 0, &welcome).is_err() {
        shared.registry.detach_bulk(&ctx, serial);
        return;
    }
    let protocol_error = loop {
        let frame = match read_frame(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) | Err(Error::Io { .. }) => break false,
            Err(e) => {
                log::info(format_args!("{}: protocol error on bulk: {e}", ctx.name()));
                let _ = send(&mut stream, 0, &error_reply(&e));
                break true;
            }
        };
        let id = frame.id;
        let step = match Msg::decode(&frame) {
            Ok(Msg::Ping) => send(&mut stream, id, &Msg::Pong),
            Ok(Msg::Fetch { fid }) => match super::control::leader_lease(&shared, &ctx) {
                Ok(()) => fetch(&shared, &ctx, &ident.user, &mut stream, id, fid),
                Err(e) => {
                    let _ = send(&mut stream, id, &error_reply(&e));
                    break false;
                }
            },
            Ok(Msg::Upload {
                upload_id,
                length,
                extents,
            }) => upload(
                &shared,
                &ctx,
                &mut reader,
                &mut stream,
                id,
                upload_id,
                length,
                &extents,
            ),
            Ok(other) => Err(Error::Protocol(format!(
                "message type {:#04x} is not a bulk-connection request",
                other.kind()
            ))),
            Err(e) => Err(e),
        };
        match step {
            Ok(()) => {}
            Err(e @ Error::Protocol(_)) => {
                log::info(format_args!("{}: protocol error on bulk: {e}", ctx.name()));
                let _ = send(&mut stream, id, &error_reply(&e));
                break true;
            }
            Err(e) => {
                // The stream is out of step (a transfer broke mid-way).
                log::info(format_args!("{}: bulk connection dropped: {e}", ctx.name()));
                break false;
            }
        }
    };
    shared.registry.detach_bulk(&ctx, serial);
    if protocol_error {
        close_after_error(&mut stream);
    } else {
        let _ = stream.shutdown(Shutdown::Both);
    }
}

/// [`send_file`] through TLS: read a chunk, write it sealed.
fn seal_file(file: &File, stream: &mut Stream, from: u64, length: u64) -> Result<()> {
    let mut buf = vec![0u8; TLS_CHUNK.min(length as usize)];
    let mut off = 0u64;
    // Bounded: each turn sends bytes or fails.
    while off < length {
        let want = (length - off).min(buf.len() as u64) as usize;
        let n = match file.read_at(&mut buf[..want], from + off) {
            Ok(0) => {
                return Err(Error::Eio(format!(
                    "object file ended {} bytes early",
                    length - off
                )))
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("reading an object file", e)),
        };
        stream
            .write_all(&buf[..n])
            .map_err(|e| Error::io("sending fetch data", e))?;
        off += n as u64;
    }
    Ok(())
}

/// Bytes read from an object file per TLS write: sixteen full records.
const TLS_CHUNK: usize = 256 * 1024;

/// Answer a Fetch. Errors about the object are replied and the connection
/// goes on; only a broken socket is returned as an error.
fn fetch(
    shared: &Shared,
    ctx: &ClientCtx,
    user: &str,
    stream: &mut Stream,
    id: u64,
    fid: Fid,
) -> Result<()> {
    // Data needs `r` (a symlink's target `l`) and the owner's read bit.
    let allowed = shared
        .store
        .who(user)
        .and_then(|who| shared.store.check_fetch(&who, fid));
    if let Err(e) = allowed {
        return send(stream, id, &error_reply(&e));
    }
    shared.registry.register(ctx, &[fid]);
    // What it read is shown only once durable (`wal::Unsynced`).
    let read = shared
        .store
        .open_data(fid)
        .and_then(|x| shared.store.durable_for_reply().map(|()| x));
    let (attr, data) = match read {
        Ok(x) => x,
        Err(e) => {
            shared.registry.unregister(ctx, &[fid]);
            return send(stream, id, &error_reply(&e));
        }
    };
    match data {
        FetchData::Bytes(b) => {
            let length = b.len() as u64;
            let mut out = frame_for(
                id,
                &Msg::FetchReply {
                    attr,
                    length,
                    extents: if b.is_empty() {
                        vec![]
                    } else {
                        vec![(0, length)]
                    },
                },
            );
            out.extend_from_slice(&b);
            stream
                .write_all(&out)
                .map_err(|e| Error::io("sending fetch data", e))
        }
        FetchData::File(file, length) => {
            // Holes stay holes: only the data extents travel.
            let extents = crate::sparse::data_extents(&file, length);
            send(
                stream,
                id,
                &Msg::FetchReply {
                    attr,
                    length,
                    extents: extents.clone(),
                },
            )?;
            for (off, len) in extents {
                send_file(&file, stream, off, len)?;
            }
            Ok(())
        }
    }
}

/// Stream exactly `length` bytes of `file` from offset `from`: on a
/// plaintext stream with sendfile(2), from the page cache to the socket
/// without passing through user space; on TLS through the record layer, a
/// chunk at a time (the file is never whole in memory).
fn send_file(file: &File, stream: &mut Stream, from: u64, length: u64) -> Result<()> {
    if stream.is_tls() {
        return seal_file(file, stream, from, length);
    }
    let mut offset = from as libc::off_t;
    let mut left = length;
    while left > 0 {
        let want = left.min(1 << 30) as usize;
        // SAFETY: both fds are open for the duration of the call and
        // `offset` is a valid pointer to a local.
        let n = unsafe { libc::sendfile(stream.as_raw_fd(), file.as_raw_fd(), &mut offset, want) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("sendfile", err));
        }
        if n == 0 {
            // The file is shorter than its committed size: never expected,
            // and the stream cannot be completed honestly.
            return Err(Error::Eio(format!("object file ended {left} bytes early")));
        }
        left -= n as u64;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn upload(
    shared: &Shared,
    ctx: &ClientCtx,
    reader: &mut BufReader<Stream>,
    stream: &mut Stream,
    id: u64,
    upload_id: u64,
    length: u64,
    extents: &[(u64, u64)],
) -> Result<()> {
    // What arrives and is kept: the data extents (holes cost nothing).
    let data = crate::proto::extent_bytes(extents);
    // Admission before any byte is written. A refused upload's bytes are
    // still read and discarded so the stream stays in step and the peer
    // reads a clear error; one longer than any file the server would keep
    // is not worth reading: the reply is sent and the connection closed.
    let max = shared.store.max_file_size;
    let admitted = if length > max {
        Err(Error::Invalid(format!(
            "upload of {length} bytes exceeds the server's maximum file size {max}"
        )))
    } else {
        shared.registry.admit_upload(ctx, data)
    };
    let claim = match admitted {
        Ok(c) => c,
        Err(e) => {
            log::info(format_args!(
                "{}: upload {upload_id} of {length} bytes refused: {e}",
                ctx.name()
            ));
            if length > max {
                send(stream, id, &error_reply(&e))?;
                return Err(Error::Protocol(format!(
                    "refused upload of {length} bytes not drained"
                )));
            }
            let _ = reader.get_ref().set_read_timeout(Some(RAW_READ_TIMEOUT));
            let drained = discard(reader, data);
            let _ = reader.get_ref().set_read_timeout(None);
            drained?;
            return send(stream, id, &error_reply(&e));
        }
    };
    let tmp: PathBuf = objects::staging_dir(&shared.root).join(format!(
        "tmp-{}-{}",
        objects::hex(&ctx.id),
        TMP_SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = reader.get_ref().set_read_timeout(Some(RAW_READ_TIMEOUT));
    let received = receive(reader, &tmp, length, extents);
    let _ = reader.get_ref().set_read_timeout(None);
    let result = match received {
        // The peer stopped inside the raw bytes: this transfer is lost and
        // the stream is out of step, so the connection ends.
        Err(Received::Broken(e)) => {
            objects::remove_quietly(&tmp);
            shared.registry.release_upload(ctx, claim);
            return Err(e);
        }
        // All bytes were read but could not be kept (disk full, ...): the
        // stream is still in step, so reply and go on.
        Err(Received::NotKept(e)) => {
            objects::remove_quietly(&tmp);
            shared.registry.release_upload(ctx, claim);
            Err(super::volume::clear_space_error(e))
        }
        Ok(()) => shared.registry.finish_upload(ctx, upload_id, &tmp, claim),
    };
    match result {
        Ok(()) => send(stream, id, &Msg::Uploaded { upload_id }),
        Err(e) => send(stream, id, &error_reply(&e)),
    }
}

/// Read and drop exactly `length` raw bytes of a refused upload.
fn discard(reader: &mut BufReader<Stream>, length: u64) -> Result<()> {
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut left = length;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        match reader.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(Error::Protocol(format!(
                    "connection ended {left} bytes before the end of an upload"
                )))
            }
            Ok(n) => left -= n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("receiving upload", e)),
        }
    }
    Ok(())
}

enum Received {
    Broken(Error),
    NotKept(Error),
}

/// Copy exactly `length` raw bytes from the connection into a new file (not
/// fsynced: see the module comment). After a write error the rest is still read (and discarded) so
/// the connection stays usable.
fn receive(
    reader: &mut BufReader<Stream>,
    tmp: &PathBuf,
    length: u64,
    extents: &[(u64, u64)],
) -> std::result::Result<(), Received> {
    // The file has its full length from the start; each extent's bytes
    // are written where they belong and the rest stays a hole.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .and_then(|f| f.set_len(length).map(|_| f))
        .map_err(|e| Error::io(format!("create {}", tmp.display()), e));
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut write_err = None;
    for &(at, len) in extents {
        let mut left = len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = match reader.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(Received::Broken(Error::Protocol(format!(
                        "connection ended {left} bytes before the end of an upload"
                    ))))
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Received::Broken(Error::io("receiving upload", e))),
            };
            let pos = at + (len - left);
            left -= n as u64;
            if let (Ok(f), None) = (&mut file, &write_err) {
                if let Err(e) = f.write_all_at(&buf[..n], pos) {
                    write_err = Some(Error::io(format!("write {}", tmp.display()), e));
                }
            }
        }
    }
    file.map_err(Received::NotKept)?;
    match write_err {
        Some(e) => Err(Received::NotKept(e)),
        None => Ok(()),
    }
}

//! `coda_failover` / `coda_failback`: repoint a symlink atomically and, with a
//! client, fail (or stop failing) its remote operations.

use std::ffi::{c_char, c_int};
use std::path::Path;

use super::client::coda_client;
use super::{boundary, c_str, handle};
use crate::client::failover::swap_link;
use crate::client::Client;

/// Atomically repoint the symlink `link` to `target` (refusing anything that
/// is not a symlink). With a client (which may be NULL, for scripts that hold
/// none), then make every pending and later remote operation of it return
/// `-EIO` until `coda_failback`. Returns promptly even while a server hangs.
#[no_mangle]
pub extern "C" fn coda_failover(
    client: *mut coda_client,
    link: *const c_char,
    target: *const c_char,
) -> c_int {
    swap(client, link, target, Client::failover)
}

/// Undo a failover: repoint `link` to `target` (the remote tree) and let
/// remote operations through again. With a client, refuses with `-EAGAIN`
/// while no server answers, and swaps the link only after revalidating.
#[no_mangle]
pub extern "C" fn coda_failback(
    client: *mut coda_client,
    link: *const c_char,
    target: *const c_char,
) -> c_int {
    swap(client, link, target, Client::failback)
}

/// The shared body: without a client only the link is swapped; with one,
/// `with_client` (failover or failback) does the swap and the rest.
fn swap(
    client: *mut coda_client,
    link: *const c_char,
    target: *const c_char,
    with_client: fn(&Client, &Path, &Path) -> crate::Result<()>,
) -> c_int {
    boundary(|| {
        let link = Path::new(c_str(link, "link")?);
        let target = Path::new(c_str(target, "target")?);
        if client.is_null() {
            swap_link(link, target)?;
        } else {
            with_client(
                &handle(client as *const coda_client, "client")?.inner,
                link,
                target,
            )?;
        }
        Ok(0)
    })
}

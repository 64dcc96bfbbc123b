//! A reply that reaches the client late vouches only for the moment its
//! request was written, not for its arrival: the server may have dropped
//! the client's callbacks since, and the break may never come on this
//! connection (a deposed group leader stopped between taking a request
//! and answering it, then resumed: the breaks go to the new leader's
//! sessions). A proxy the test controls holds the server's frames back,
//! then delivers only the one written before the break.

mod client_util;
mod common;

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coda::client::{Client, ClientState};
use common::TestServer;

/// Forwards client connections to `to`. Once `hold` is set, frames from the
/// server on connections opened before it are kept back (`held` once a
/// whole frame is); `release` then delivers the first one held on each, drops the
/// rest, and closes the connection at the client's next bytes.
struct Proxy {
    addr: SocketAddr,
    hold: Arc<AtomicBool>,
    released: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    // Dropped after `drop` below has released and stopped the pumps.
    _tcp: common::proxy::Proxy,
}

impl Proxy {
    fn start(to: SocketAddr) -> Proxy {
        let hold: Arc<AtomicBool> = Arc::default();
        let released: Arc<AtomicBool> = Arc::default();
        let held: Arc<AtomicUsize> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let (h, r, n, st) = (hold.clone(), released.clone(), held.clone(), stop.clone());
        let tcp = common::proxy::Proxy::start(move |c, socks| {
            let Ok(s) = TcpStream::connect(to) else {
                return;
            };
            socks.keep(&s);
            serve(c, s, &h, &r, &n, &st);
        });
        Proxy {
            addr: tcp.addr,
            hold,
            released,
            held,
            stop,
            _tcp: tcp,
        }
    }
}

/// One connection, client `c` and server `s` (see `Proxy`).
fn serve(
    c: TcpStream,
    s: TcpStream,
    hold: &Arc<AtomicBool>,
    released: &Arc<AtomicBool>,
    held: &Arc<AtomicUsize>,
    stop: &Arc<AtomicBool>,
) {
    // Only connections opened before the hold are held.
    let holdable = !hold.load(Ordering::SeqCst);
    let (c2, s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
    let released2 = released.clone();
    // Client to server: after the release, the client's next
    // bytes close its connection.
    std::thread::spawn(move || {
        let (mut c, mut s) = (c2, s2);
        let mut buf = [0u8; 65536];
        loop {
            let n = match std::io::Read::read(&mut c, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if holdable && released2.load(Ordering::SeqCst) {
                break;
            }
            // A server gone meanwhile: swallow until released.
            let _ = std::io::Write::write_all(&mut s, &buf[..n]);
        }
        let _ = c.shutdown(Shutdown::Both);
        let _ = s.shutdown(Shutdown::Both);
    });
    // Bytes from the server held back (frames: u32 length, then
    // that many bytes; bulk data is not framed, but nothing
    // comes on a bulk connection while held).
    let kept: Arc<Mutex<Vec<u8>>> = Arc::default();
    let first = |b: &[u8]| {
        let len = u32::from_be_bytes(b.get(..4)?.try_into().unwrap()) as usize;
        b.get(..4 + len).map(|f| f.to_vec())
    };
    if holdable {
        // Delivers the first frame held, once released.
        let (kept, released, stop) = (kept.clone(), released.clone(), stop.clone());
        let mut c = c.try_clone().unwrap();
        std::thread::spawn(move || {
            while !released.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(f) = first(&kept.lock().unwrap()) {
                let _ = std::io::Write::write_all(&mut c, &f);
            }
        });
    }
    let (hold, released, held) = (hold.clone(), released.clone(), held.clone());
    std::thread::spawn(move || {
        let (mut c, mut s) = (c, s);
        let mut buf = [0u8; 65536];
        // Bounded by the server's connection: EOF or error ends it.
        loop {
            let n = match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if holdable && hold.load(Ordering::SeqCst) {
                if !released.load(Ordering::SeqCst) {
                    let mut k = kept.lock().unwrap();
                    k.extend_from_slice(&buf[..n]);
                    if first(&k).is_some() {
                        held.store(1, Ordering::SeqCst);
                    }
                }
                continue;
            }
            if std::io::Write::write_all(&mut c, &buf[..n]).is_err() {
                break;
            }
        }
        if !holdable || !hold.load(Ordering::SeqCst) {
            let _ = c.shutdown(Shutdown::Both);
        }
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.released.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn wait_until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Client B holds a callback on `/f`. Its Ping is answered by the server
/// but the Pong is held on its way; meanwhile client A writes `/f`, the
/// server breaks B's callback (that frame is held too), waits out its break
/// timeout and acknowledges A. The Pong alone then reaches B: B must not
/// take it as a fresh round trip (it trusted `/f` and read "old" from its
/// cache, 0 ms, after A's write was acknowledged), and its next read of
/// `/f` returns A's value.
#[test]
fn a_late_reply_does_not_renew_trust_in_callbacks() {
    let s = TestServer::start_with(&["--insecure-plaintext", "--break-timeout-ms", "1000"]);
    let dir = common::TempDir::new("late-reply");
    let mut cfg_a = client_util::config(&s, &dir.path().join("a"));
    cfg_a.set("insecure_plaintext", "true").unwrap();
    let a = Client::new(cfg_a).unwrap();
    client_util::put(&a, "/f", b"old");
    let proxy = Proxy::start(s.addr());
    let mut cfg_b = client_util::config(&s, &dir.path().join("b"));
    cfg_b.set("insecure_plaintext", "true").unwrap();
    cfg_b.set("servers", &proxy.addr.to_string()).unwrap();
    // No heartbeat during the test: the one Ping in flight is the test's.
    cfg_b.set("heartbeat_ms", "60000").unwrap();
    cfg_b.set("dead_after_ms", "120000").unwrap();
    cfg_b.set("rpc_timeout_ms", "20000").unwrap();
    let b = Client::new(cfg_b).unwrap();
    assert_eq!(client_util::get(&b, "/f"), b"old");
    let fid = b.stat("/f").unwrap().fid;
    // Past the trust window (half the 1 s break timeout) since B's last
    // answered request, asking whether /f is trusted makes a round trip.
    std::thread::sleep(Duration::from_millis(600));
    proxy.hold.store(true, Ordering::SeqCst);
    let trusted = std::thread::scope(|sc| {
        let t = sc.spawn(|| b.trusts_cached(fid));
        wait_until("the Pong held", 20, || {
            (proxy.held.load(Ordering::SeqCst) >= 1).then_some(())
        });
        // A's store waits for B's break acknowledgement (held) for the
        // break timeout, then drops B's session and is acknowledged.
        client_util::put(&a, "/f", b"new");
        proxy.released.store(true, Ordering::SeqCst);
        t.join().unwrap()
    });
    assert!(
        !trusted,
        "a Pong held for longer than the trust window renewed the trust in /f"
    );
    assert_eq!(
        String::from_utf8(client_util::get(&b, "/f")).unwrap(),
        "new",
        "B read its cached copy after A's write was acknowledged"
    );
    assert_eq!(b.state(), ClientState::Connected);
}

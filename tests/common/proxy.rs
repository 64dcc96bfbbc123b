//! A TCP proxy on a loopback port in front of a server, for tests that
//! hold, alter or watch what passes between a client and it. The test says
//! what to do with each accepted connection (`serve`); the proxy accepts
//! until dropped, and its drop shuts down every socket kept (`Socks`), so
//! no pumping thread outlives the test's wait for it.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The sockets a proxy shuts down when dropped.
#[derive(Clone, Default)]
pub struct Socks(Arc<Mutex<Vec<TcpStream>>>);

impl Socks {
    /// Shut `s` down with the proxy.
    pub fn keep(&self, s: &TcpStream) {
        if let Ok(s) = s.try_clone() {
            self.0.lock().unwrap().push(s);
        }
    }
}

pub struct Proxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    socks: Socks,
}

impl Proxy {
    /// Accept on a fresh loopback port. Each connection is kept (`Socks`)
    /// and given to `serve` on the accepting thread, in order; `serve`
    /// starts the threads that pump it and keeps the sockets it opens.
    pub fn start(serve: impl Fn(TcpStream, &Socks) + Send + 'static) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = Proxy {
            addr: l.local_addr().unwrap(),
            stop: Arc::default(),
            socks: Socks::default(),
        };
        let (stop, socks) = (p.stop.clone(), p.socks.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = c else { continue };
                socks.keep(&c);
                serve(c, &socks);
            }
        });
        p
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = TcpStream::connect(self.addr);
        for s in self.socks.0.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

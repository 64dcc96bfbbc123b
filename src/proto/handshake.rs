//! The handshake (PROTOCOL.md "Handshake") as two state machines without
//! sockets: each takes a received message and returns what to send next or
//! the outcome. The server and the client drive them over their own sockets,
//! so the order of messages, the version check and both MAC checks are
//! written once and can be tested without a network.
//!
//! C → S Hello, S → C Challenge, C → S Auth, S → C Welcome (or Error).

use super::auth::{client_mac, mac_eq, random_bytes, server_mac, Transcript};
use super::message::{ConnKind, Msg};
use super::types::Fid;
use super::PROTOCOL_VERSION;
use crate::{Error, Result};

/// The fields of a client's Hello that the MACs cover.
#[derive(Debug, Clone)]
struct Hello {
    user: String,
    client_id: [u8; 16],
    epoch: u64,
    kind: ConnKind,
    client_nonce: [u8; 32],
}

impl Hello {
    fn transcript<'a>(
        &'a self,
        server_nonce: &'a [u8; 32],
        binding: &'a [u8; 32],
    ) -> Transcript<'a> {
        Transcript {
            binding,
            user: &self.user,
            client_id: &self.client_id,
            epoch: self.epoch,
            kind: self.kind,
            client_nonce: &self.client_nonce,
            server_nonce,
        }
    }
}

fn unexpected(expected: &str, got: &Msg) -> Error {
    Error::Protocol(format!(
        "expected {expected}, got message type {:#04x}",
        got.kind()
    ))
}

// ---------------------------------------------------------------------------
// Server side.

enum ServerState {
    AwaitHello,
    AwaitAuth(Hello),
    /// Proven, or failed: nothing more is accepted.
    Finished,
}

/// The server's side: `receive(Hello)` → send Challenge; `auth(Auth, ..)` →
/// the proven identity and the Welcome's MAC. Any failure is final and is
/// the `Error` the server sends back (scrubbed by the caller).
pub struct ServerHandshake {
    server_nonce: [u8; 32],
    binding: [u8; 32],
    state: ServerState,
}

/// A client that proved it knows its user's secret.
#[derive(Debug, Clone)]
pub struct Proven {
    /// The user the client proved it is.
    pub user: String,
    /// The persistent client id it presented (ownership is checked by the
    /// server after this, against its store).
    pub client_id: [u8; 16],
    /// The client's epoch: new at every client start.
    pub epoch: u64,
    /// Control or bulk connection.
    pub kind: ConnKind,
    /// The MAC that proves the server knows the secret too.
    pub server_mac: [u8; 32],
}

impl Proven {
    /// The Welcome that ends a successful handshake.
    pub fn welcome(&self, server_id: [u8; 16], root: Fid, break_timeout_ms: u32) -> Msg {
        Msg::Welcome {
            server_id,
            root,
            server_mac: self.server_mac,
            break_timeout_ms,
        }
    }
}

impl ServerHandshake {
    /// `server_nonce` must be fresh for every connection (it is what makes a
    /// recorded handshake useless); tests pass a fixed one. `binding` is
    /// the connection's TLS channel binding (zeros in plaintext): both MACs
    /// cover it, so they hold for this TLS session only.
    pub fn new(server_nonce: [u8; 32], binding: [u8; 32]) -> Self {
        ServerHandshake {
            server_nonce,
            binding,
            state: ServerState::AwaitHello,
        }
    }

    /// The message the machine waits for, for "connection closed before X".
    pub fn expecting(&self) -> &'static str {
        match self.state {
            ServerState::AwaitHello => "Hello",
            ServerState::AwaitAuth(_) => "Auth",
            ServerState::Finished => "nothing",
        }
    }

    /// Take the first message; on success returns the Challenge to send.
    pub fn hello(&mut self, msg: Msg) -> Result<Msg> {
        if !matches!(self.state, ServerState::AwaitHello) {
            self.state = ServerState::Finished;
            return Err(unexpected(self.expecting(), &msg));
        }
        self.state = ServerState::Finished;
        let hello = match msg {
            Msg::Hello {
                version,
                kind,
                user,
                client_id,
                epoch,
                client_nonce,
            } => {
                if version != PROTOCOL_VERSION {
                    return Err(Error::Protocol(format!(
                        "protocol version {version} not supported (server speaks {PROTOCOL_VERSION})"
                    )));
                }
                Hello {
                    user,
                    client_id,
                    epoch,
                    kind,
                    client_nonce,
                }
            }
            other => return Err(unexpected("Hello", &other)),
        };
        self.state = ServerState::AwaitAuth(hello);
        Ok(Msg::Challenge {
            server_nonce: self.server_nonce,
        })
    }

    /// Take the client's Auth. `secret_of` looks the user's secret up
    /// (None: no such user); it is called only once the message is an Auth.
    /// An unknown user is checked against a random key, so neither the
    /// answer nor its timing tells which users exist.
    pub fn auth<F>(&mut self, msg: Msg, secret_of: F) -> Result<Proven>
    where
        F: FnOnce(&str) -> Result<Option<[u8; 32]>>,
    {
        let expected = self.expecting();
        let hello = match std::mem::replace(&mut self.state, ServerState::Finished) {
            ServerState::AwaitAuth(h) => h,
            _ => return Err(unexpected(expected, &msg)),
        };
        let mac = match msg {
            Msg::Auth { mac } => mac,
            other => return Err(unexpected("Auth", &other)),
        };
        let t = hello.transcript(&self.server_nonce, &self.binding);
        let known = secret_of(&hello.user)?;
        let secret = known.unwrap_or_else(random_bytes);
        if !mac_eq(&mac, &client_mac(&secret, &t)) || known.is_none() {
            return Err(Error::Auth(format!(
                "user {:?}: unknown user or wrong secret",
                hello.user
            )));
        }
        let server_mac = server_mac(&secret, &t);
        Ok(Proven {
            user: hello.user,
            client_id: hello.client_id,
            epoch: hello.epoch,
            kind: hello.kind,
            server_mac,
        })
    }
}

// ---------------------------------------------------------------------------
// Client side.

enum ClientState {
    AwaitChallenge,
    AwaitWelcome { server_nonce: [u8; 32] },
    Finished,
}

/// What the client does after a message it received.
#[derive(Debug)]
pub enum ClientStep {
    /// Send this and wait for the next message.
    Send(Msg),
    /// The server proved itself: the handshake is done.
    Welcome {
        /// The server's persistent id.
        server_id: [u8; 16],
        /// The root directory's fid.
        root: Fid,
        /// The server's callback break timeout (see `Msg::Welcome`).
        break_timeout: std::time::Duration,
    },
}

/// Why the client gave up. The caller turns it into an `Error` naming the
/// server ([`ClientFailure::into_error`]).
#[derive(Debug)]
pub enum ClientFailure {
    /// The server answered `after` with something else than the next step:
    /// usually its `Error` (refused), carried as received.
    Unexpected {
        /// The message of ours it answered.
        after: &'static str,
        /// What it sent instead.
        msg: Box<Msg>,
    },
    /// Welcome's MAC does not prove the server knows the secret.
    ServerNotProven,
    /// A message after the handshake ended (or after it failed).
    Finished,
}

impl ClientFailure {
    /// The failure as the crate's error, naming `server`: a refusal keeps
    /// the server's own code and message.
    pub fn into_error(self, server: &str) -> Error {
        match self {
            ClientFailure::Unexpected { after, msg } => match *msg {
                Msg::Error { code, message, .. } => Error::from_wire(code, message),
                msg => Error::Protocol(format!("server {server} answered {after} with {msg:?}")),
            },
            ClientFailure::ServerNotProven => Error::Auth(format!(
                "server {server} failed to prove it knows the secret"
            )),
            ClientFailure::Finished => Error::Protocol(format!(
                "server {server} sent a message after the handshake ended"
            )),
        }
    }
}

/// The client's side: `start` gives the Hello; each received message gives
/// the Auth to send, then the Welcome's data once the server proved itself.
pub struct ClientHandshake {
    hello: Hello,
    binding: [u8; 32],
    secret: [u8; 32],
    state: ClientState,
}

impl ClientHandshake {
    /// `client_nonce` must be fresh for every connection; tests pass a fixed
    /// one. `binding` is the connection's TLS channel binding (zeros in
    /// plaintext), as on the server's side.
    pub fn start(
        user: &str,
        client_id: [u8; 16],
        epoch: u64,
        kind: ConnKind,
        secret: [u8; 32],
        client_nonce: [u8; 32],
        binding: [u8; 32],
    ) -> (Self, Msg) {
        let hello = Hello {
            user: user.to_string(),
            client_id,
            epoch,
            kind,
            client_nonce,
        };
        let msg = Msg::Hello {
            version: PROTOCOL_VERSION,
            kind,
            user: hello.user.clone(),
            client_id,
            epoch,
            client_nonce,
        };
        (
            ClientHandshake {
                hello,
                binding,
                secret,
                state: ClientState::AwaitChallenge,
            },
            msg,
        )
    }

    /// Take the server's next message: what to send next, or the end.
    pub fn receive(&mut self, msg: Msg) -> std::result::Result<ClientStep, ClientFailure> {
        match std::mem::replace(&mut self.state, ClientState::Finished) {
            ClientState::AwaitChallenge => match msg {
                Msg::Challenge { server_nonce } => {
                    let t = self.hello.transcript(&server_nonce, &self.binding);
                    let mac = client_mac(&self.secret, &t);
                    self.state = ClientState::AwaitWelcome { server_nonce };
                    Ok(ClientStep::Send(Msg::Auth { mac }))
                }
                msg => Err(ClientFailure::Unexpected {
                    after: "Hello",
                    msg: Box::new(msg),
                }),
            },
            ClientState::AwaitWelcome { server_nonce } => match msg {
                Msg::Welcome {
                    server_id,
                    root,
                    server_mac: mac,
                    break_timeout_ms,
                } => {
                    let t = self.hello.transcript(&server_nonce, &self.binding);
                    if !mac_eq(&mac, &server_mac(&self.secret, &t)) {
                        return Err(ClientFailure::ServerNotProven);
                    }
                    Ok(ClientStep::Welcome {
                        server_id,
                        root,
                        break_timeout: std::time::Duration::from_millis(break_timeout_ms.into()),
                    })
                }
                msg => Err(ClientFailure::Unexpected {
                    after: "Auth",
                    msg: Box::new(msg),
                }),
            },
            ClientState::Finished => Err(ClientFailure::Finished),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::WireCode;

    const SECRET: [u8; 32] = [5; 32];
    const ID: [u8; 16] = [1; 16];

    fn root() -> Fid {
        Fid {
            volume: 1,
            vnode: 1,
            unique: 1,
        }
    }

    fn client(secret: [u8; 32]) -> (ClientHandshake, Msg) {
        ClientHandshake::start("alice", ID, 7, ConnKind::Control, secret, [2; 32], [8; 32])
    }

    fn secrets(user: &str) -> Result<Option<[u8; 32]>> {
        Ok((user == "alice").then_some(SECRET))
    }

    /// Both machines talking to each other, as the wire would carry it.
    #[test]
    fn a_good_secret_proves_both_sides() {
        let (mut c, hello) = client(SECRET);
        let mut s = ServerHandshake::new([3; 32], [8; 32]);
        assert_eq!(s.expecting(), "Hello");
        let challenge = s.hello(hello).unwrap();
        assert!(matches!(challenge, Msg::Challenge { server_nonce } if server_nonce == [3; 32]));
        assert_eq!(s.expecting(), "Auth");
        let auth = match c.receive(challenge).unwrap() {
            ClientStep::Send(m @ Msg::Auth { .. }) => m,
            other => panic!("{other:?}"),
        };
        let proven = s.auth(auth, secrets).unwrap();
        assert_eq!(proven.user, "alice");
        assert_eq!(proven.client_id, ID);
        assert_eq!(proven.epoch, 7);
        assert_eq!(proven.kind, ConnKind::Control);
        match c.receive(proven.welcome([9; 16], root(), 750)).unwrap() {
            ClientStep::Welcome {
                server_id,
                root: r,
                break_timeout,
            } => {
                assert_eq!(break_timeout, std::time::Duration::from_millis(750));
                assert_eq!(server_id, [9; 16]);
                assert_eq!(r, root());
            }
            other => panic!("{other:?}"),
        }
        // Nothing more is accepted by either side.
        assert!(matches!(c.receive(Msg::Pong), Err(ClientFailure::Finished)));
        assert!(matches!(
            s.auth(Msg::Auth { mac: [0; 32] }, secrets),
            Err(Error::Protocol(_))
        ));
    }

    fn run_to_auth(
        secret: [u8; 32],
        user_secrets: fn(&str) -> Result<Option<[u8; 32]>>,
    ) -> Result<Proven> {
        let (mut c, hello) = client(secret);
        let mut s = ServerHandshake::new([3; 32], [8; 32]);
        let challenge = s.hello(hello).unwrap();
        let auth = match c.receive(challenge).unwrap() {
            ClientStep::Send(m) => m,
            other => panic!("{other:?}"),
        };
        s.auth(auth, user_secrets)
    }

    #[test]
    fn a_wrong_secret_is_refused_with_auth() {
        let e = run_to_auth([6; 32], secrets).unwrap_err();
        assert!(
            matches!(&e, Error::Auth(m) if m.contains("unknown user or wrong secret")),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_user_gets_the_same_answer_as_a_wrong_secret() {
        let e = run_to_auth(SECRET, |_| Ok(None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "authentication failed: user \"alice\": unknown user or wrong secret"
        );
        // Even a MAC made with a zero key (what an unknown user's random key
        // could never be relied on to be) does not pass.
        let e = run_to_auth([0; 32], |_| Ok(None)).unwrap_err();
        assert!(matches!(e, Error::Auth(_)));
    }

    #[test]
    fn a_failing_secret_lookup_is_passed_on() {
        let e = run_to_auth(SECRET, |_| Err(Error::Eio("index".into()))).unwrap_err();
        assert!(matches!(e, Error::Eio(_)));
    }

    #[test]
    fn another_version_is_refused() {
        let mut s = ServerHandshake::new([3; 32], [8; 32]);
        let e = s
            .hello(Msg::Hello {
                version: PROTOCOL_VERSION + 1,
                kind: ConnKind::Bulk,
                user: "alice".into(),
                client_id: ID,
                epoch: 1,
                client_nonce: [2; 32],
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "protocol error: protocol version {} not supported (server speaks {PROTOCOL_VERSION})",
                PROTOCOL_VERSION + 1
            )
        );
        // Failed is final: a correct Hello afterwards is not taken.
        let (_, hello) = client(SECRET);
        assert!(s.hello(hello).is_err());
    }

    #[test]
    fn messages_out_of_order_are_refused() {
        // Auth before Hello.
        let mut s = ServerHandshake::new([3; 32], [8; 32]);
        let e = s.hello(Msg::Auth { mac: [0; 32] }).unwrap_err();
        assert!(
            matches!(&e, Error::Protocol(m) if m.starts_with("expected Hello")),
            "{e}"
        );
        let mut s = ServerHandshake::new([3; 32], [8; 32]);
        let e = s.auth(Msg::Auth { mac: [0; 32] }, secrets).unwrap_err();
        assert!(
            matches!(&e, Error::Protocol(m) if m.starts_with("expected Hello")),
            "{e}"
        );
        // A second Hello where Auth belongs; the secret is never looked up.
        let mut s = ServerHandshake::new([3; 32], [8; 32]);
        let (_, hello) = client(SECRET);
        s.hello(hello.clone()).unwrap();
        let e = s
            .auth(hello, |_| panic!("looked up a secret for a non-Auth"))
            .unwrap_err();
        assert!(
            matches!(&e, Error::Protocol(m) if m.starts_with("expected Auth")),
            "{e}"
        );
        // The client: a Welcome where the Challenge belongs.
        let (mut c, _) = client(SECRET);
        let f = c
            .receive(Msg::Welcome {
                server_id: [0; 16],
                root: root(),
                server_mac: [0; 32],
                break_timeout_ms: 1000,
            })
            .unwrap_err();
        assert!(matches!(
            f,
            ClientFailure::Unexpected { after: "Hello", .. }
        ));
        assert!(matches!(
            f.into_error("s:1"),
            Error::Protocol(m) if m.starts_with("server s:1 answered Hello with Welcome")
        ));
    }

    #[test]
    fn a_server_refusal_reaches_the_client_as_its_error() {
        let (mut c, _) = client(SECRET);
        c.receive(Msg::Challenge {
            server_nonce: [3; 32],
        })
        .unwrap();
        let f = c
            .receive(Msg::Error {
                code: WireCode::Auth,
                index: u32::MAX,
                message: "no".into(),
            })
            .unwrap_err();
        assert!(matches!(f, ClientFailure::Unexpected { after: "Auth", .. }));
        assert!(matches!(f.into_error("s:1"), Error::Auth(m) if m == "no"));
    }

    #[test]
    fn a_server_that_does_not_know_the_secret_is_dropped() {
        let (mut c, hello) = client(SECRET);
        // An impostor runs the server side with another secret for alice.
        let mut s = ServerHandshake::new([3; 32], [8; 32]);
        let challenge = s.hello(hello).unwrap();
        let auth = match c.receive(challenge).unwrap() {
            ClientStep::Send(m) => m,
            other => panic!("{other:?}"),
        };
        // It cannot pass auth honestly; forge the rest with its own key.
        assert!(s.auth(auth, |_| Ok(Some([6; 32]))).is_err());
        let f = c
            .receive(Msg::Welcome {
                server_id: [9; 16],
                root: root(),
                server_mac: [0; 32],
                break_timeout_ms: 1000,
            })
            .unwrap_err();
        assert!(matches!(f, ClientFailure::ServerNotProven));
        assert!(matches!(
            f.into_error("s:1"),
            Error::Auth(m) if m == "server s:1 failed to prove it knows the secret"
        ));
    }

    /// A relay that terminates TLS towards each side sees two sessions with
    /// two channel bindings: the client's proof, made for its session, does
    /// not pass on the relay's session to the server.
    #[test]
    fn a_proof_made_for_another_tls_session_is_refused() {
        let (mut c, hello) = client(SECRET); // binding [8; 32]
        let mut s = ServerHandshake::new([3; 32], [7; 32]);
        let challenge = s.hello(hello).unwrap();
        let auth = match c.receive(challenge).unwrap() {
            ClientStep::Send(m) => m,
            other => panic!("{other:?}"),
        };
        let e = s.auth(auth, secrets).unwrap_err();
        assert_eq!(
            e.to_string(),
            "authentication failed: user \"alice\": unknown user or wrong secret"
        );
    }
}

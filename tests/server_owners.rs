//! The client-id ownership table is bounded (SERVER.md "Forgotten client
//! ids"): an id its owner has not presented for `--forget-clients-after`
//! is forgotten by the server's sweep, with its store-id watermark, so the
//! next user to present it starts afresh and inherits nothing; an id whose
//! session is live is never forgotten. Real `coda-server`, raw sockets as
//! two real users.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use coda::error::WireCode;
use coda::proto::acl::parse_rights;
use coda::proto::auth::read_secret_file;
use coda::proto::{ConnKind, Msg};
use common::raw::{rec, Raw};
use common::{TestServer, SERVER_BIN};

#[allow(clippy::result_large_err)] // a refusal is the message itself
fn connect(srv: &TestServer, user: &str, id: u8) -> Result<Raw, Msg> {
    let secret = read_secret_file(&srv.root().join(format!("{user}.secret")))
        .unwrap_or_else(|e| panic!("{user}'s secret: {e}"));
    Raw::connect(srv.addr(), user, &secret, ConnKind::Control, [id; 16], 1)
}

fn refused_as_anothers<T>(r: &Result<T, Msg>) -> bool {
    matches!(r, Err(Msg::Error { code: WireCode::Auth, message, .. })
        if message.contains("belongs to another user"))
}

#[test]
fn an_id_not_seen_for_the_expiry_is_forgotten_with_its_watermark_but_never_a_live_one() {
    let srv = TestServer::start_with(&["--forget-clients-after", "3s"]);
    let out = Command::new(SERVER_BIN)
        .args(["user", "add", "bob", "--root"])
        .arg(srv.root())
        .output()
        .expect("run coda-server user add");
    assert!(out.status.success(), "{out:?}");

    // A directory bob may write in (the root's list gives him rl only),
    // made on a connection of its own.
    const LIVE: u8 = 0x11;
    const GONE: u8 = 0x22;
    let mut setup = connect(&srv, "admin", 0x33).expect("admin");
    let root = setup.root;
    let d = setup.alloc(1)[0];
    setup.apply(vec![rec::mkdir(1, root, "shared", d)]);
    let (rights, negative) = parse_rights("rlidw").unwrap();
    match setup.call(&Msg::SetAcl {
        fid: d,
        name: "bob".into(),
        rights,
        negative,
    }) {
        Msg::AclReply { .. } => {}
        m => panic!("setacl: {m:?}"),
    }
    drop(setup);
    // A session that stays open and asks nothing (so it holds no callback
    // whose break it would have to acknowledge).
    let mut live = connect(&srv, "admin", LIVE).expect("admin's first id");

    // The second id is claimed after the first, so it is never seen more
    // recently than the first; it commits store ids up to 5, then goes.
    let mut gone = connect(&srv, "admin", GONE).expect("admin's second id");
    let f = gone.alloc(1)[0];
    gone.apply(vec![rec::create(5, d, "from-admin", f)]);
    drop(gone);

    assert!(
        refused_as_anothers(&connect(&srv, "bob", LIVE).map(|_| ())),
        "a live id is admin's"
    );

    // Once forgotten, the gone id is bob's to claim (a bounded wait: the
    // sweep runs every second, the expiry is 3 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut bob = loop {
        match connect(&srv, "bob", GONE) {
            Ok(c) => break c,
            Err(m) => {
                let r: Result<(), Msg> = Err(m);
                assert!(refused_as_anothers(&r), "bob presenting admin's id: {r:?}");
                assert!(
                    Instant::now() < deadline,
                    "admin's unused id not forgotten within 60 s"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };

    // The live id was swept at the same time (it is no more recent), yet
    // kept: its session lives.
    assert!(
        refused_as_anothers(&connect(&srv, "bob", LIVE).map(|_| ())),
        "an id with a live session is never forgotten"
    );
    match live.call(&Msg::WhoAmI) {
        Msg::WhoReply { user, .. } => assert_eq!(user, "admin"),
        m => panic!("admin's live session: {m:?}"),
    }

    // The watermark went with the owner: bob's store id 1 is applied, not
    // answered as a replay of admin's 5.
    let g = bob.alloc(1)[0];
    bob.apply(vec![rec::create(1, d, "from-bob", g)]);
    let names: Vec<String> = bob.list(d).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["from-admin", "from-bob"]);

    // And the id is bob's now: admin coming back with it is refused.
    assert!(refused_as_anothers(
        &connect(&srv, "admin", GONE).map(|_| ())
    ));
}

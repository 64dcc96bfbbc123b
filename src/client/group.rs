//! A replicated group as the client sees it (docs/CLIENT.md "Group
//! events"): which member leads, and which members the leader hears. A
//! client of several servers asks the leader every [`GROUP_POLL`] on a
//! thread of its own (the prober is never held up by it) and reports each
//! change as an event: the leader changed, a member was lost, a member is
//! back. The loss of every member stays the prober's `ServerDown`.

use std::sync::Weak;
use std::time::Duration;

use crossbeam_channel::{select, Receiver};

use super::event::{Event, EventBus};
use super::probe::Watched;
use super::stats::Counters;
use crate::proto::Msg;
use crate::{Error, Result};

/// How often the leader is asked how the group stands.
pub const GROUP_POLL: Duration = Duration::from_millis(500);
/// How often while the servers answer that they are no group (several
/// lone servers listed) or do not know the request (an older server).
const NOT_A_GROUP_POLL: Duration = Duration::from_secs(60);

/// One member of a replicated group, as its leader reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// The member's id in the group (1-based).
    pub id: u64,
    /// Its group address, as the group's configuration lists it.
    pub addr: String,
    /// Whether the leader heard from it within the last second (the
    /// leader itself is always up).
    pub up: bool,
    /// Whether it is the leader.
    pub leader: bool,
}

/// A replicated group's state, as its leader reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    /// The leader's term: it grows with every election.
    pub term: u64,
    /// Every voting member, by id.
    pub members: Vec<GroupMember>,
}

impl GroupView {
    /// The leader's entry.
    pub fn leader(&self) -> Option<&GroupMember> {
        self.members.iter().find(|m| m.leader)
    }

    pub(crate) fn from_reply(msg: Msg) -> Result<GroupView> {
        match msg {
            Msg::GroupView {
                term,
                leader,
                members,
            } => Ok(GroupView {
                term,
                members: members
                    .into_iter()
                    .map(|m| GroupMember {
                        leader: m.id == leader,
                        id: m.id,
                        addr: m.addr,
                        up: m.up,
                    })
                    .collect(),
            }),
            m => Err(Error::Protocol(format!("GroupStatus answered with {m:?}"))),
        }
    }
}

/// The events between two views of the group, in order: a new leader
/// first, then each member lost or back. The first view (`before` None)
/// is only the baseline: nothing changed that this client saw.
pub(crate) fn changes(before: Option<&GroupView>, now: &GroupView) -> Vec<Event> {
    let Some(before) = before else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(l) = now.leader() {
        if before.leader().map(|b| b.id) != Some(l.id) {
            out.push(Event::LeaderChanged {
                leader: l.addr.clone(),
                term: now.term,
            });
        }
    }
    for m in &now.members {
        let Some(was) = before.members.iter().find(|b| b.id == m.id) else {
            continue; // a member added since: not a recovery
        };
        match (was.up, m.up) {
            (true, false) => out.push(Event::MemberDown {
                member: m.addr.clone(),
            }),
            (false, true) => out.push(Event::MemberUp {
                member: m.addr.clone(),
            }),
            _ => {}
        }
    }
    out
}

/// Start the group watcher: only for a client of several servers. It holds
/// the client weakly and ends when `stop` is dropped (with the client).
pub(crate) fn spawn<C: Watched>(inner: Weak<C>, stop: Receiver<()>) -> Result<()> {
    std::thread::Builder::new()
        .name("coda-group".into())
        .spawn(move || {
            let mut last: Option<GroupView> = None;
            let mut wait = GROUP_POLL;
            loop {
                select! {
                    recv(stop) -> _ => return,
                    default(wait) => {}
                }
                let Some(inner) = inner.upgrade() else { return };
                wait = GROUP_POLL;
                match poll(&*inner) {
                    Some(Ok(view)) => {
                        Counters::add(&inner.counters().group_views, 1);
                        emit_all(inner.events(), changes(last.as_ref(), &view));
                        last = Some(view);
                    }
                    Some(Err(Error::Invalid(_) | Error::Protocol(_))) => {
                        Counters::add(&inner.counters().group_refusals, 1);
                        wait = NOT_A_GROUP_POLL;
                    }
                    _ => {}
                }
            }
        })
        .map_err(|e| Error::io("spawning the group watcher thread", e))?;
    Ok(())
}

/// One look at the group, on the live session only (None without one):
/// this thread never connects (the prober and callers do). A member that is
/// not the leader any more, or no answer within the poll, skips the round.
fn poll(inner: &impl Watched) -> Option<Result<GroupView>> {
    let servers = inner.servers();
    let s = servers.current().filter(|s| !s.is_dead())?;
    Some(
        s.call_within(&Msg::GroupStatus, &inner.health().interrupt, GROUP_POLL)
            .and_then(GroupView::from_reply),
    )
}

fn emit_all(events: &EventBus, list: Vec<Event>) {
    for e in list {
        events.emit(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(term: u64, leader: u64, up: &[bool]) -> GroupView {
        GroupView {
            term,
            members: up
                .iter()
                .enumerate()
                .map(|(i, up)| GroupMember {
                    id: i as u64 + 1,
                    addr: format!("h{}:1", i + 1),
                    up: *up,
                    leader: i as u64 + 1 == leader,
                })
                .collect(),
        }
    }

    #[test]
    fn the_first_view_is_a_baseline_and_each_change_is_one_event() {
        let a = view(3, 1, &[true, true, false]);
        assert!(changes(None, &a).is_empty(), "no event for the baseline");
        assert!(changes(Some(&a), &a).is_empty(), "nothing changed");
        // Member 1 (the leader) lost, 2 elected, 3 back.
        let b = view(4, 2, &[false, true, true]);
        assert_eq!(
            changes(Some(&a), &b),
            vec![
                Event::LeaderChanged {
                    leader: "h2:1".into(),
                    term: 4
                },
                Event::MemberDown {
                    member: "h1:1".into()
                },
                Event::MemberUp {
                    member: "h3:1".into()
                },
            ]
        );
    }

    #[test]
    fn a_member_added_since_is_no_recovery() {
        let a = view(3, 1, &[true, true]);
        let b = view(3, 1, &[true, true, true]);
        assert!(changes(Some(&a), &b).is_empty());
    }
}

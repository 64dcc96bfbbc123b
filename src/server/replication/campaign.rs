//! After a campaign that elected no one, the next one comes soon.
//!
//! The engine draws a whole new election timeout (0.6–1 s, node.rs) after
//! a campaign that failed: a split vote between the two members left when
//! the leader died (both stood within a round trip of each other and each
//! voted for itself), or pre-votes refused. No leader has been heard for
//! that long already, so another 0.6–1 s only lengthens the outage: one
//! `kill -9` of the leader in 20 took 2.4 s to the next acknowledged write
//! (docs/BENCHMARKS.md). A member that campaigned and knows no leader
//! lowers what is left of its wait to a random 100–250 ms instead.
//!
//! Votes are judged as before: a member that heard a leader within
//! `ELECTION_TICKS` still refuses them (the rule the leader's lease rests
//! on), so an early retry can elect a leader sooner only where one could be
//! elected at all. The first campaign after a leader falls silent still
//! waits the full random timeout.

use raft::{Raft, StateRole, Storage, INVALID_ID};

/// The retry comes after a random number of ticks in this range (ticks of
/// 50 ms: 100–250 ms). Wide enough that the two members left rarely stand
/// within a round trip of each other again (the first to stand usually
/// wins), short enough that a failover with one split vote stays within
/// 1.5 s: up to 1.05 s until the first campaign, 0.25 s to the retry.
/// (With 100–400 ms, one of 20 `kill -9` failovers took 1,455 ms.)
pub const RETRY_TICKS: std::ops::Range<usize> = 2..5;

pub struct Campaigns {
    /// This member stood (pre-candidate or candidate) since it last knew a
    /// leader.
    campaigned: bool,
    /// xorshift state (no rand dependency for one draw per campaign).
    rng: u64,
}

impl Campaigns {
    pub fn new(seed: u64) -> Campaigns {
        Campaigns {
            campaigned: false,
            rng: seed | 1,
        }
    }

    fn draw(&mut self) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        RETRY_TICKS.start + (self.rng % (RETRY_TICKS.end - RETRY_TICKS.start) as u64) as usize
    }

    /// After each step of the engine: while this member campaigns, or has
    /// campaigned and knows no leader, its next campaign is at most
    /// `RETRY_TICKS` away.
    pub fn after_step<S: Storage>(&mut self, raft: &mut Raft<S>) {
        match raft.state {
            StateRole::Candidate | StateRole::PreCandidate => self.campaigned = true,
            StateRole::Leader => {
                self.campaigned = false;
                return;
            }
            StateRole::Follower => {
                if raft.leader_id != INVALID_ID {
                    self.campaigned = false;
                }
                if !self.campaigned {
                    return;
                }
            }
        }
        let timeout = raft.randomized_election_timeout();
        let left = timeout.saturating_sub(raft.election_elapsed);
        if left > RETRY_TICKS.end {
            // Once per wait: the lowered one is within the range.
            raft.election_elapsed = timeout - self.draw();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_stay_in_the_range_and_vary() {
        let mut c = Campaigns::new(42);
        let draws: Vec<usize> = (0..200).map(|_| c.draw()).collect();
        assert!(draws.iter().all(|d| RETRY_TICKS.contains(d)));
        for t in RETRY_TICKS {
            assert!(draws.contains(&t), "{t} never drawn");
        }
    }
}

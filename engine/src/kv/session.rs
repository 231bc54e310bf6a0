//! The table of client sessions: what exactly-once execution remembers per client.
//!
//! Following the Raft thesis (§6.3) and Dragonboat: per client, the last sequence number applied
//! and its outcome; sessions expire after a TTL of *log time* (the leaders' timestamps carried in
//! the entries, never a replica's clock) and, when the table is full, the least recently active
//! session is evicted. Every decision depends only on the entries applied, so every replica keeps
//! the same table. Both maps are `BTree`s, so iteration — and hence the snapshot — is in a
//! fixed order.

use std::collections::{BTreeMap, BTreeSet};

use super::state_machine::Outcome;

/// One client's session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Session {
    /// Log time of the last request that named this session.
    pub(crate) last_active_ms: u64,
    /// The last sequence applied and its outcome; `None` until the first command.
    pub(crate) last: Option<(u64, Outcome)>,
}

/// Sessions by client id, plus an index by activity for expiry and eviction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sessions {
    by_client: BTreeMap<u64, Session>,
    /// `(last_active_ms, client_id)` of every session: the first is the least recently active.
    by_activity: BTreeSet<(u64, u64)>,
}

impl Sessions {
    pub(crate) fn len(&self) -> usize {
        self.by_client.len()
    }

    pub(crate) fn get(&self, client_id: u64) -> Option<&Session> {
        self.by_client.get(&client_id)
    }

    /// Sessions in client-id order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &Session)> {
        self.by_client.iter().map(|(client_id, session)| (*client_id, session))
    }

    /// Adds a session; `client_id` must be new.
    pub(crate) fn insert(&mut self, client_id: u64, session: Session) {
        let inserted = self.by_activity.insert((session.last_active_ms, client_id));
        assert!(inserted, "client id {client_id} is already in the activity index");
        let previous = self.by_client.insert(client_id, session);
        assert!(previous.is_none(), "client id {client_id} is already registered");
    }

    pub(crate) fn remove(&mut self, client_id: u64) -> Option<Session> {
        let session = self.by_client.remove(&client_id)?;
        let removed = self.by_activity.remove(&(session.last_active_ms, client_id));
        assert!(removed, "session {client_id} was missing from the activity index");
        Some(session)
    }

    /// Records activity at `now_ms` and returns the session, or `None` if it does not exist.
    pub(crate) fn touch(&mut self, client_id: u64, now_ms: u64) -> Option<&mut Session> {
        let session = self.by_client.get_mut(&client_id)?;
        if session.last_active_ms != now_ms {
            let removed = self.by_activity.remove(&(session.last_active_ms, client_id));
            assert!(removed, "session {client_id} was missing from the activity index");
            self.by_activity.insert((now_ms, client_id));
            session.last_active_ms = now_ms;
        }
        Some(session)
    }

    /// Removes every session idle for more than `ttl_ms` at `now_ms`; returns how many.
    pub(crate) fn expire(&mut self, now_ms: u64, ttl_ms: u64) -> usize {
        let mut expired = 0;
        while let Some(&(last_active_ms, client_id)) = self.by_activity.first() {
            if now_ms.saturating_sub(last_active_ms) <= ttl_ms {
                break;
            }
            self.remove(client_id);
            expired += 1;
        }
        expired
    }

    /// Evicts least recently active sessions (ties: lowest client id) until fewer than
    /// `sessions_max` remain, making room for one more; returns how many.
    pub(crate) fn make_room(&mut self, sessions_max: usize) -> usize {
        let mut evicted = 0;
        while self.len() >= sessions_max {
            let Some(&(_, client_id)) = self.by_activity.first() else { break };
            self.remove(client_id);
            evicted += 1;
        }
        evicted
    }

    /// Checks that the two maps describe the same sessions and that no session is active in the
    /// future of `now_ms`.
    pub(crate) fn check_invariants(&self, now_ms: u64) {
        assert_eq!(self.by_client.len(), self.by_activity.len(), "index sizes differ");
        for (client_id, session) in &self.by_client {
            assert!(
                self.by_activity.contains(&(session.last_active_ms, *client_id)),
                "session {client_id} is missing from the activity index"
            );
            assert!(session.last_active_ms <= now_ms, "session {client_id} active in the future");
            if let Some((sequence, _)) = session.last {
                assert!(sequence > 0, "session {client_id} cached sequence 0");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(last_active_ms: u64) -> Session {
        Session { last_active_ms, last: None }
    }

    #[test]
    fn expiry_removes_only_sessions_idle_longer_than_the_ttl() {
        let mut sessions = Sessions::default();
        sessions.insert(1, fresh(0));
        sessions.insert(2, fresh(5));
        sessions.insert(3, fresh(10));
        assert_eq!(sessions.expire(15, 10), 1);
        assert!(sessions.get(1).is_none());
        assert!(sessions.get(2).is_some(), "idle for exactly the ttl is still alive");
        assert_eq!(sessions.expire(100, 10), 2);
        assert_eq!(sessions.len(), 0);
        sessions.check_invariants(100);
    }

    #[test]
    fn eviction_takes_the_least_recently_active_then_lowest_id() {
        let mut sessions = Sessions::default();
        sessions.insert(5, fresh(1));
        sessions.insert(3, fresh(1));
        sessions.insert(1, fresh(2));
        sessions.touch(5, 3);
        assert_eq!(sessions.make_room(3), 1);
        assert!(sessions.get(3).is_none());
        assert_eq!(sessions.make_room(1), 2);
        assert_eq!(sessions.len(), 0);
        sessions.check_invariants(3);
    }

    #[test]
    fn touch_moves_a_session_in_the_activity_order() {
        let mut sessions = Sessions::default();
        sessions.insert(1, fresh(0));
        sessions.insert(2, fresh(1));
        assert!(sessions.touch(1, 7).is_some());
        assert!(sessions.touch(9, 7).is_none());
        assert_eq!(sessions.expire(8, 6), 1);
        assert!(sessions.get(2).is_none());
        assert_eq!(sessions.get(1).map(|session| session.last_active_ms), Some(7));
        sessions.check_invariants(8);
    }
}

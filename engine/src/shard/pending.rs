//! The requests a shard has accepted and not answered yet, by token, with their deadlines.
//!
//! A shard under load holds thousands of these and turns each over in milliseconds: every
//! proposal is inserted once, removed once when applied, and must time out at its deadline if
//! it is not. A hash map plus a heap of deadlines touched three unrelated cache lines per request
//! (the map's bucket on insert and on remove, the heap's tail on push), which showed as ~5 % of a
//! 64-group run's CPU. Here tokens are issued in order and index a ring, so inserts are
//! sequential writes and a removal touches the one slot; deadlines live in the slots, and since
//! requests with the default timeout arrive with their deadlines in token order, a cursor walks
//! the ring to find the expired ones. The rest — a deadline out of that order, or beyond the
//! default timeout — go in a small heap as well, and a request that outlives the requests around
//! it (a long custom timeout) moves to an overflow map once the ring around it has emptied, so the
//! ring's length stays within a small multiple of what is pending.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::core::Token;

struct Slot<T> {
    /// When the request times out: its own deadline, or for a regular slot up to
    /// [`PendingTable::tolerance`] later (see [`PendingTable::insert`]).
    deadline: Instant,
    /// In the ring's deadline order: no earlier than any regular slot before it, and within the
    /// default timeout of its insertion. Irregular slots are also listed in the heap.
    regular: bool,
    value: T,
}

/// Pending requests by token. See the module documentation.
pub(super) struct PendingTable<T> {
    /// Slot `i` holds token `base + i`; `None` once removed (or moved to `overflow`).
    ring: VecDeque<Option<Slot<T>>>,
    base: Token,
    /// Slots in the ring that are `Some`.
    in_ring: usize,
    /// Requests moved out of a sparse ring's front.
    overflow: HashMap<Token, Slot<T>>,
    /// Deadlines of irregular requests (and of those moved to `overflow`), earliest first;
    /// entries of removed requests linger until they reach the top or the heap is pruned.
    heap: BinaryHeap<Reverse<(Instant, Token)>>,
    /// Where the next [`PendingTable::expired`] resumes its walk: every regular slot before
    /// this token has been removed or already listed as expired (the slot at it, if regular,
    /// was not yet due when the walk stopped there).
    cursor: Token,
    /// The deadline of the last regular slot inserted.
    regular_until: Option<Instant>,
    /// Deadlines up to this far past insertion count as regular (the default timeout).
    horizon: Duration,
    /// A deadline up to this much before the last regular one still counts as regular, and
    /// times out with it: callers on several threads set their deadlines before their requests
    /// reach the shard's inbox, slightly out of order. The shard checks deadlines once per
    /// tick, so a tick's tolerance delays no timeout by more than the check already does.
    tolerance: Duration,
    /// Empty slots the ring (and stale deadlines the heap) may hold beyond twice what is
    /// pending before they are cleared out.
    slack: usize,
}

impl<T> PendingTable<T> {
    /// An empty table; `horizon` is the default request timeout, the longest a regular deadline
    /// lies ahead, and `tolerance` how far out of order regular deadlines may arrive (the
    /// shard's tick). Tokens start at `first`.
    pub(super) fn new(horizon: Duration, tolerance: Duration, first: Token) -> Self {
        Self::with_slack(horizon, tolerance, first, 1024)
    }

    fn with_slack(horizon: Duration, tolerance: Duration, first: Token, slack: usize) -> Self {
        PendingTable {
            ring: VecDeque::new(),
            base: first,
            in_ring: 0,
            overflow: HashMap::new(),
            heap: BinaryHeap::new(),
            cursor: first,
            regular_until: None,
            horizon,
            tolerance,
            slack,
        }
    }

    /// Requests pending.
    pub(super) fn len(&self) -> usize {
        self.in_ring + self.overflow.len()
    }

    /// The token the next [`PendingTable::insert`] returns. A request is handed it before it is
    /// inserted: the core registers a token only when it accepts the request, so one it refuses
    /// leaves the token to the next.
    pub(super) fn next_token(&self) -> Token {
        self.base + self.ring.len() as Token
    }

    /// Adds a request due at `deadline`, accepted at `now`; returns its token. It is listed by
    /// [`PendingTable::expired`] once its deadline has passed, at most `tolerance` later.
    pub(super) fn insert(&mut self, value: T, deadline: Instant, now: Instant) -> Token {
        let token = self.next_token();
        let regular = deadline <= now + self.horizon
            && self.regular_until.is_none_or(|until| deadline + self.tolerance >= until);
        let deadline = if regular {
            // Kept in order: a deadline a little early times out with the one before it.
            let deadline = self.regular_until.map_or(deadline, |until| deadline.max(until));
            self.regular_until = Some(deadline);
            deadline
        } else {
            self.heap.push(Reverse((deadline, token)));
            deadline
        };
        self.ring.push_back(Some(Slot { deadline, regular, value }));
        self.in_ring += 1;
        self.compact();
        token
    }

    /// Takes the request `token` out, if it is pending.
    pub(super) fn remove(&mut self, token: Token) -> Option<T> {
        if token < self.base {
            return self.overflow.remove(&token).map(|slot| slot.value);
        }
        let slot = self.ring.get_mut(usize::try_from(token - self.base).ok()?)?.take()?;
        self.in_ring -= 1;
        self.trim_front();
        Some(slot.value)
    }

    /// Whether `token` is pending.
    pub(super) fn contains(&self, token: Token) -> bool {
        is_pending(&self.ring, self.base, &self.overflow, token)
    }

    /// The tokens of the pending requests whose deadline is at or before `now`, each once (they
    /// stay pending until removed).
    pub(super) fn expired(&mut self, now: Instant) -> Vec<Token> {
        let mut expired = Vec::new();
        // Regular slots are in deadline order: walk them from the cursor to the first one
        // still to come. Irregular ones on the way are the heap's.
        let mut at = self.cursor.max(self.base);
        while let Some(slot) = usize::try_from(at - self.base).ok().and_then(|i| self.ring.get(i)) {
            match slot {
                Some(slot) if slot.regular => {
                    if slot.deadline > now {
                        break;
                    }
                    expired.push(at);
                }
                _ => {}
            }
            at += 1;
        }
        self.cursor = at;
        while let Some(Reverse((deadline, token))) = self.heap.peek().copied() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            // Removed requests leave their deadline behind: skip those. A regular slot the
            // walk above listed is never in the heap, so nothing is listed twice.
            if self.contains(token) {
                expired.push(token);
            }
        }
        if self.heap.len() > 2 * self.len() + self.slack {
            // In place, keeping the capacity (see `compact`).
            let (ring, base, overflow) = (&self.ring, self.base, &self.overflow);
            self.heap.retain(|Reverse((_, token))| is_pending(ring, base, overflow, *token));
        }
        expired
    }

    /// Removes and returns every pending request. Tokens go on from where they were.
    pub(super) fn drain(&mut self) -> Vec<(Token, T)> {
        let (base, next) = (self.base, self.next_token());
        let mut all: Vec<(Token, T)> =
            self.overflow.drain().map(|(token, slot)| (token, slot.value)).collect();
        all.extend(
            self.ring
                .drain(..)
                .enumerate()
                .filter_map(|(i, slot)| slot.map(|slot| (base + i as Token, slot.value))),
        );
        self.base = next;
        self.cursor = next;
        self.in_ring = 0;
        self.heap.clear();
        all
    }

    /// The tokens pending.
    pub(super) fn tokens(&self) -> impl Iterator<Item = Token> + '_ {
        let base = self.base;
        self.overflow.keys().copied().chain(
            self.ring
                .iter()
                .enumerate()
                .filter(|(_, slot)| slot.is_some())
                .map(move |(i, _)| base + i as Token),
        )
    }

    /// Moves requests from the front of a ring mostly emptied behind them to `overflow`, so one
    /// long-lived request does not hold the ring at its token while thousands turn over. The
    /// ring keeps its allocation: under load it is rewritten in place rather than regrown
    /// through fresh memory.
    fn compact(&mut self) {
        if self.ring.len() <= 2 * self.in_ring + self.slack {
            return;
        }
        while self.ring.len() > self.in_ring + self.in_ring / 2 + self.slack / 2 {
            let Some(front) = self.ring.pop_front() else { break };
            let token = self.base;
            self.base += 1;
            if let Some(slot) = front {
                self.in_ring -= 1;
                if slot.regular && token >= self.cursor {
                    // Out of the ring, out of the walk: the heap keeps its deadline. (One the
                    // walk passed was listed as expired already.)
                    self.heap.push(Reverse((slot.deadline, token)));
                }
                self.overflow.insert(token, slot);
            }
        }
        self.trim_front();
    }

    /// Drops the answered slots at the ring's front.
    fn trim_front(&mut self) {
        while matches!(self.ring.front(), Some(None)) {
            self.ring.pop_front();
            self.base += 1;
        }
    }
}

fn is_pending<T>(
    ring: &VecDeque<Option<Slot<T>>>,
    base: Token,
    overflow: &HashMap<Token, Slot<T>>,
    token: Token,
) -> bool {
    if token < base {
        return overflow.contains_key(&token);
    }
    usize::try_from(token - base).ok().and_then(|at| ring.get(at)).is_some_and(Option::is_some)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Insert with a timeout of this many ms (the horizon is 100), after advancing the
        /// clock by the second value.
        Insert(u64, u64),
        /// Remove the pending request at this position in token order (modulo), if any.
        Remove(usize),
        /// Remove the most recent request.
        RemoveNewest,
        /// Remove a token that is not pending: never issued, answered, or below the first.
        RemoveStale(u64),
        /// Advance the clock by this many ms and collect what expired.
        Expire(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (prop_oneof![4 => Just(100u64), 1 => 0u64..300], 0u64..3)
                .prop_map(|(timeout, step)| Op::Insert(timeout, step)),
            4 => any::<usize>().prop_map(Op::Remove),
            2 => Just(Op::RemoveNewest),
            1 => any::<u64>().prop_map(Op::RemoveStale),
            1 => (0u64..60).prop_map(Op::Expire),
        ]
    }

    proptest! {
        /// Against a plain map: the same requests pending, tokens never issued twice, and
        /// `expired` lists each pending request once, never before its deadline and never more
        /// than the tolerance after it.
        #[test]
        fn matches_a_map(
            ops in proptest::collection::vec(op(), 1..3000),
            slack in 0usize..16,
            tolerance in 0u64..4,
        ) {
            let start = Instant::now();
            let ms = |n: u64| start + Duration::from_millis(n);
            let tolerance = Duration::from_millis(tolerance);
            // A small slack, so the ring is compacted (and the heap pruned) all the time.
            let mut table =
                PendingTable::with_slack(Duration::from_millis(100), tolerance, 7, slack);
            let mut last_issued: Option<Token> = None;
            let mut model: BTreeMap<Token, (Instant, u64)> = BTreeMap::new();
            let mut listed: BTreeSet<Token> = BTreeSet::new();
            let mut now = 0u64;
            let mut value = 0u64;
            for op in ops {
                match op.clone() {
                    Op::Insert(timeout, step) => {
                        now += step;
                        value += 1;
                        let token = table.insert(value, ms(now + timeout), ms(now));
                        prop_assert!(token >= 7);
                        prop_assert!(last_issued.is_none_or(|last| token > last), "tokens increase");
                        last_issued = Some(token);
                        model.insert(token, (ms(now + timeout), value));
                    }
                    Op::Remove(i) => {
                        if model.is_empty() { continue; }
                        let token = *model.keys().nth(i % model.len()).unwrap();
                        prop_assert_eq!(table.remove(token), Some(model.remove(&token).unwrap().1));
                        prop_assert_eq!(table.remove(token), None);
                        listed.remove(&token);
                    }
                    Op::RemoveNewest => {
                        if let Some((&token, _)) = model.iter().next_back() {
                            prop_assert_eq!(table.remove(token), Some(model.remove(&token).unwrap().1));
                            listed.remove(&token);
                        }
                    }
                    Op::RemoveStale(token) => {
                        if !model.contains_key(&token) {
                            prop_assert_eq!(table.remove(token), None);
                        }
                    }
                    Op::Expire(step) => {
                        now += step;
                        let got = table.expired(ms(now));
                        for token in &got {
                            prop_assert!(listed.insert(*token), "listed twice");
                            let (deadline, _) = model.get(token).expect("listed while pending");
                            prop_assert!(*deadline <= ms(now), "listed before its deadline");
                        }
                        for (token, (deadline, _)) in &model {
                            if *deadline + tolerance <= ms(now) {
                                prop_assert!(listed.contains(token), "{} not listed", token);
                            }
                        }
                        prop_assert!(table.heap.len() <= 2 * table.len() + slack);
                    }
                }
                prop_assert_eq!(table.len(), model.len());
                if matches!(op, Op::Insert(..)) {
                    // Bounded: the ring never grows far beyond what is pending (only inserts
                    // grow it).
                    prop_assert!(table.ring.len() <= 2 * table.in_ring + slack);
                }
                let mut tokens: Vec<Token> = table.tokens().collect();
                tokens.sort_unstable();
                prop_assert_eq!(tokens, model.keys().copied().collect::<Vec<_>>());
            }
            let mut drained = table.drain();
            drained.sort_unstable();
            let expected: Vec<(Token, u64)> = model.iter().map(|(t, (_, v))| (*t, *v)).collect();
            prop_assert_eq!(drained, expected);
            prop_assert_eq!(table.len(), 0);
            let after = table.insert(0, ms(now), ms(now));
            prop_assert!(last_issued.is_none_or(|last| after > last), "no token twice after a drain");
        }
    }

    /// One request with a long timeout among thousands answered quickly: the ring moves it
    /// aside instead of growing, and it still expires on time.
    #[test]
    fn a_long_lived_request_does_not_hold_the_ring() {
        let start = Instant::now();
        let ms = |n: u64| start + Duration::from_millis(n);
        let mut table = PendingTable::new(Duration::from_millis(100), Duration::ZERO, 0);
        let long = table.insert("long", ms(10_000), ms(0));
        for i in 0..100_000u64 {
            let token = table.insert("short", ms(i / 100 + 100), ms(i / 100));
            assert_eq!(table.remove(token), Some("short"));
        }
        assert!(table.ring.len() < 2048, "ring of {} slots for one request", table.ring.len());
        // Only the long one has its deadline in the heap: the rest were regular.
        assert_eq!(table.heap.len(), 1);
        assert!(table.expired(ms(9_999)).is_empty());
        assert_eq!(table.expired(ms(10_000)), vec![long]);
        assert_eq!(table.remove(long), Some("long"));
        assert_eq!(table.len(), 0);
    }

    /// A regular request (default timeout) left behind while thousands after it are answered
    /// moves to the overflow map and still times out at its deadline, once.
    #[test]
    fn a_regular_request_moved_aside_still_expires() {
        let start = Instant::now();
        let ms = |n: u64| start + Duration::from_millis(n);
        let mut table = PendingTable::new(Duration::from_millis(100), Duration::ZERO, 0);
        let stuck = table.insert("stuck", ms(100), ms(0));
        for _ in 0..10_000 {
            let token = table.insert("short", ms(100), ms(0));
            assert_eq!(table.remove(token), Some("short"));
        }
        assert!(table.overflow.contains_key(&stuck), "moved out of the ring");
        assert!(table.expired(ms(99)).is_empty());
        assert_eq!(table.expired(ms(100)), vec![stuck]);
        assert!(table.expired(ms(200)).is_empty(), "listed once");
        assert_eq!(table.remove(stuck), Some("stuck"));
    }
}

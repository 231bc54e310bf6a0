//! Raft's safety properties, checked from the outside after every step of the simulation.
//!
//! The checker sees what each replica reports (role, term, commit index, the entries it hands out
//! to be persisted, the entries it hands out to be applied) and keeps, per replica, a view of its
//! log: the durable log plus every entry handed out since. From that it checks:
//!
//! - election safety: at most one leader per term, ever (across restarts);
//! - log matching: two entries with the same index and term carry the same payload and follow the
//!   same term at the previous index (so, by induction, the logs agree up to there);
//! - a replica never overwrites an entry at or below its own commit index, and its commit index
//!   never goes back;
//! - leader completeness: a leader of term `T` holds every entry committed in a term below `T`,
//!   both when it takes office and when an entry is committed while it leads;
//! - state machine safety: every replica is handed the same entry at each committed index, and
//!   every state machine has the same history of applied entries at each index.

use std::collections::{BTreeMap, HashMap};

/// An entry as the checker sees it: index, term, and a hash of kind and payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryFact {
    /// Position.
    pub index: u64,
    /// Term of its leader.
    pub term: u64,
    /// Hash of kind and payload.
    pub hash: u64,
}

/// A replica's log as the checker believes it to be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogView {
    /// The last index covered by a snapshot (0: none); entries start right after it.
    pub snapshot_index: u64,
    /// The term at `snapshot_index`.
    pub snapshot_term: u64,
    /// `(term, hash)` of the entries from `snapshot_index + 1`.
    pub entries: Vec<(u64, u64)>,
}

impl LogView {
    /// The index of the last entry.
    pub fn last_index(&self) -> u64 {
        self.snapshot_index + self.entries.len() as u64
    }

    /// Term and hash at `index`, if the view holds that entry.
    fn entry(&self, index: u64) -> Option<(u64, u64)> {
        let offset = index.checked_sub(self.snapshot_index + 1)?;
        self.entries.get(usize::try_from(offset).ok()?).copied()
    }

    /// The term at `index`: 0 before the log, `None` if compacted away or past the end.
    fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.snapshot_index {
            Some(self.snapshot_term)
        } else {
            self.entry(index).map(|(term, _)| term)
        }
    }

    /// Truncates at `fact.index` and appends `fact`; the caller checked there is no gap.
    fn put(&mut self, fact: EntryFact) {
        let offset = (fact.index - self.snapshot_index - 1) as usize;
        self.entries.truncate(offset);
        self.entries.push((fact.term, fact.hash));
    }
}

#[derive(Clone, Copy, Debug)]
struct Committed {
    term: u64,
    hash: u64,
    /// The lowest term any replica was in when it reported this entry committed: the entry was
    /// committed in this term or an earlier one.
    commit_term: u64,
}

/// The checker's memory of the whole run.
#[derive(Debug, Default)]
pub struct RaftInvariants {
    /// Term → the node that led it.
    leaders: BTreeMap<u64, u64>,
    /// Node → the term it currently leads.
    leading: BTreeMap<u64, u64>,
    /// (index, term) → (hash, term at index - 1), for log matching.
    facts: HashMap<(u64, u64), (u64, u64)>,
    /// Committed entries by index (position `index - 1`).
    committed: Vec<Option<Committed>>,
    /// Applied-history hash chain by index (position `index - 1`).
    chains: Vec<Option<u64>>,
    views: BTreeMap<u64, LogView>,
    /// Node → commit index last reported (in its current incarnation).
    commits: BTreeMap<u64, u64>,
}

impl RaftInvariants {
    /// A checker that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// `node` (re)starts from its durable state: `view` is its durable log, `commit` its durable
    /// commit index.
    pub fn start(&mut self, node: u64, view: LogView, commit: u64) -> Result<(), String> {
        for index in view.snapshot_index + 1..=view.last_index() {
            let (term, hash) = view.entry(index).expect("in range");
            let prev = view.term_at(index - 1).expect("contiguous");
            self.fact(node, EntryFact { index, term, hash }, prev)?;
        }
        self.views.insert(node, view);
        self.leading.remove(&node);
        self.commits.insert(node, commit);
        Ok(())
    }

    fn fact(&mut self, node: u64, fact: EntryFact, prev_term: u64) -> Result<(), String> {
        let known = *self.facts.entry((fact.index, fact.term)).or_insert((fact.hash, prev_term));
        if known != (fact.hash, prev_term) {
            return Err(format!(
                "log matching: n{node} holds entry i{} t{} with (payload hash {:#x}, previous term \
                 {prev_term}) but another replica had (payload hash {:#x}, previous term {})",
                fact.index, fact.term, fact.hash, known.0, known.1
            ));
        }
        Ok(())
    }

    /// `node` handed out `entries` to be persisted: its log now ends with them.
    pub fn append(&mut self, node: u64, entries: &[EntryFact]) -> Result<(), String> {
        let commit = self.commits.get(&node).copied().unwrap_or(0);
        let mut view = self.views.remove(&node).unwrap_or_default();
        let result = (|| {
            for (position, &fact) in entries.iter().enumerate() {
                if position > 0 && fact.index != entries[position - 1].index + 1 {
                    return Err(format!("n{node} appended non-consecutive entries: {entries:?}"));
                }
                if fact.index <= view.snapshot_index || fact.index > view.last_index() + 1 {
                    return Err(format!(
                        "n{node} appended i{} to a log holding i{}..=i{}",
                        fact.index,
                        view.snapshot_index + 1,
                        view.last_index()
                    ));
                }
                if fact.index <= commit && view.entry(fact.index) != Some((fact.term, fact.hash)) {
                    return Err(format!(
                        "n{node} overwrote i{} (committed, commit index i{commit}) with t{}",
                        fact.index, fact.term
                    ));
                }
                let prev_term = view.term_at(fact.index - 1).expect("checked: no gap");
                if fact.term < prev_term {
                    return Err(format!(
                        "n{node}: entry i{} has term t{} below its predecessor's t{prev_term}",
                        fact.index, fact.term
                    ));
                }
                self.fact(node, fact, prev_term)?;
                view.put(fact);
            }
            Ok(())
        })();
        self.views.insert(node, view);
        result
    }

    /// `node` installed a snapshot covering up to `index` (of term `term`).
    pub fn snapshot(&mut self, node: u64, index: u64, term: u64) {
        let view = self.views.entry(node).or_default();
        if view.term_at(index) == Some(term) && index >= view.snapshot_index {
            let drop = (index - view.snapshot_index) as usize;
            view.entries.drain(..drop);
        } else {
            view.entries.clear();
        }
        view.snapshot_index = index;
        view.snapshot_term = term;
    }

    /// `node` is in `term`, leads or not, with commit index `commit`.
    pub fn status(
        &mut self,
        node: u64,
        term: u64,
        leader: bool,
        commit: u64,
    ) -> Result<(), String> {
        let last_commit = self.commits.entry(node).or_insert(0);
        if commit < *last_commit {
            return Err(format!(
                "n{node}: commit index went back from i{last_commit} to i{commit}"
            ));
        }
        *last_commit = commit;
        if !leader {
            self.leading.remove(&node);
            return Ok(());
        }
        let holder = *self.leaders.entry(term).or_insert(node);
        if holder != node {
            return Err(format!("election safety: n{holder} and n{node} both led term t{term}"));
        }
        if self.leading.insert(node, term) == Some(term) {
            return Ok(());
        }
        // A new leader: it must hold everything committed in earlier terms.
        for index in 1..=self.committed.len() as u64 {
            self.check_leader_holds(node, term, index)?;
        }
        Ok(())
    }

    fn check_leader_holds(&self, node: u64, term: u64, index: u64) -> Result<(), String> {
        let Some(committed) = self.committed[(index - 1) as usize] else { return Ok(()) };
        if committed.commit_term >= term {
            return Ok(());
        }
        let view = &self.views[&node];
        if index <= view.snapshot_index {
            return Ok(());
        }
        if view.entry(index) != Some((committed.term, committed.hash)) {
            return Err(format!(
                "leader completeness: n{node} leads t{term} without entry i{index} t{} committed \
                 by t{} (its log: {:?})",
                committed.term,
                committed.commit_term,
                view.entry(index)
            ));
        }
        Ok(())
    }

    /// `node`, in `term`, handed out `fact` as committed, to apply.
    pub fn committed(&mut self, node: u64, term: u64, fact: EntryFact) -> Result<(), String> {
        let view = &self.views[&node];
        if fact.index > view.snapshot_index
            && view.entry(fact.index) != Some((fact.term, fact.hash))
        {
            return Err(format!(
                "n{node} applies i{} t{} which its log does not hold ({:?})",
                fact.index,
                fact.term,
                view.entry(fact.index)
            ));
        }
        let position = (fact.index - 1) as usize;
        if self.committed.len() <= position {
            self.committed.resize(position + 1, None);
        }
        let slot = &mut self.committed[position];
        match slot {
            None => *slot = Some(Committed { term: fact.term, hash: fact.hash, commit_term: term }),
            Some(known) if (known.term, known.hash) != (fact.term, fact.hash) => {
                return Err(format!(
                    "state machine safety: n{node} applies i{} t{} (hash {:#x}) but t{} (hash \
                     {:#x}) was applied there before",
                    fact.index, fact.term, fact.hash, known.term, known.hash
                ));
            }
            Some(known) => known.commit_term = known.commit_term.min(term),
        }
        let leaders: Vec<(u64, u64)> = self.leading.iter().map(|(&n, &t)| (n, t)).collect();
        for (leader, leader_term) in leaders {
            self.check_leader_holds(leader, leader_term, fact.index)?;
        }
        Ok(())
    }

    /// `node`'s state machine applied up to `index` with history hash `chain`.
    pub fn applied(&mut self, node: u64, index: u64, chain: u64) -> Result<(), String> {
        let position = (index - 1) as usize;
        if self.chains.len() <= position {
            self.chains.resize(position + 1, None);
        }
        match self.chains[position] {
            None => self.chains[position] = Some(chain),
            Some(known) if known != chain => {
                return Err(format!(
                    "n{node}'s state machine history differs from another's at i{index}"
                ));
            }
            Some(_) => {}
        }
        Ok(())
    }
}

//! A linearizability checker in the style of Wing & Gong / Lowe and Porcupine.
//!
//! A history is linearizable if every operation can be given a point in time between its
//! invocation and its return such that the operations, applied in the order of those points to a
//! sequential [`Model`], produce the answers the clients saw. An operation that failed or timed out
//! may or may not have taken effect: it has no return time (it returns "at infinity") and no known
//! output, so it may be placed anywhere after its invocation, or nowhere. When something outside
//! the client knows that an unanswered operation did take effect by some time (a simulator saw it
//! applied), [`Outcome::TookEffect`] says so: it must be placed before then, with any output.
//!
//! The search is the WGL depth-first search: repeatedly pick an operation that may come next (one
//! invoked no later than the earliest return among the operations not yet placed; those with an
//! outcome first, earliest return first), apply it to the model, and backtrack when the model
//! refuses. Configurations (placed operations, model state) already explored are remembered and
//! never explored again, and one is also skipped when an explored one had the same state and the
//! same answered operations placed but fewer unknown ones (it could do everything this one can).
//! A read-only operation the model accepts in the current state is placed at once, without
//! branching (see `Entries::next_moves`).
//! The whole search is bounded by [`CheckOptions::max_steps`]: past it the answer is
//! [`Verdict::Unknown`], never a hang. With maybe-applied operations, a first incomplete search
//! places them only where they let a refused answered operation go next (finding a
//! linearization quickly when there is one); if it fails, the complete search decides. Proving a
//! history with dozens of concurrent maybe-applied writes *not* linearizable can still exhaust a
//! reasonable budget: a simulator should resolve what it can with `TookEffect` (or leave out
//! requests it knows never took effect).
//! Histories of objects whose operations each touch one part (a key) are checked part by part
//! ([`check_partitioned`]): linearizability is compositional (Herlihy & Wing), and the parts are
//! exponentially cheaper to search than the whole.
//!
//! Time is whatever the caller counts in (`u64`); operation `a` precedes `b` in real time only if
//! `a` returned strictly before `b` was invoked. A simulator that wants two events at the same tick
//! to be ordered should number events, not ticks.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Debug, Write as _};
use std::hash::Hash;

use super::model::{KvInput, KvModel, KvOutput, Model};

/// The position of an operation in its [`History`] (or in the slice given to a check).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub usize);

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// How an operation ended, as its client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<O> {
    /// The client received `output` at time `at`.
    Returned {
        /// The answer received.
        output: O,
        /// When it was received; not before the invocation.
        at: u64,
    },
    /// The request failed, timed out or was never answered: it may or may not have taken effect,
    /// at any time after its invocation, with any output.
    Unknown,
    /// The client saw no answer, but the operation is known (from outside the client, e.g. a
    /// simulator that saw it applied) to have taken effect no later than `by`, with an unknown
    /// output: it must be placed, before `by`, and the model accepts any output for it.
    TookEffect {
        /// A time by which it had taken effect.
        by: u64,
    },
}

/// One client request and its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation<I, O> {
    /// Who asked; only used in explanations.
    pub client: u64,
    /// What was asked.
    pub input: I,
    /// When the request was sent.
    pub invoke: u64,
    /// How it ended.
    pub outcome: Outcome<O>,
}

impl<I, O> Operation<I, O> {
    /// The time by which the operation took effect (its return time), or `None` for an
    /// operation that may or may not have taken effect.
    pub fn return_time(&self) -> Option<u64> {
        match self.outcome {
            Outcome::Returned { at, .. } => Some(at),
            Outcome::TookEffect { by } => Some(by),
            Outcome::Unknown => None,
        }
    }

    /// The output, or `None` if unknown.
    pub fn output(&self) -> Option<&O> {
        match &self.outcome {
            Outcome::Returned { output, .. } => Some(output),
            Outcome::TookEffect { .. } | Outcome::Unknown => None,
        }
    }
}

/// A history recorded as it happens: invoke, then complete (or never complete).
///
/// Operations never completed stay [`Outcome::Unknown`]: maybe applied.
#[derive(Clone, Debug)]
pub struct History<I, O> {
    operations: Vec<Operation<I, O>>,
}

impl<I, O> Default for History<I, O> {
    fn default() -> Self {
        History { operations: Vec::new() }
    }
}

impl<I, O> History<I, O> {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `client` sent `input` at time `at`.
    pub fn invoke(&mut self, client: u64, input: I, at: u64) -> OpId {
        self.operations.push(Operation { client, input, invoke: at, outcome: Outcome::Unknown });
        OpId(self.operations.len() - 1)
    }

    /// Records that operation `id`, never answered, is known to have taken effect by `by`.
    ///
    /// Panics if it already returned or `by` is before its invocation.
    pub fn took_effect(&mut self, id: OpId, by: u64) {
        let operation = &mut self.operations[id.0];
        assert!(matches!(operation.outcome, Outcome::Unknown), "{id} already has an outcome");
        assert!(by >= operation.invoke, "{id} took effect at {by} before its invocation");
        operation.outcome = Outcome::TookEffect { by };
    }

    /// Records that operation `id` returned `output` at time `at`.
    ///
    /// Panics if it already returned or `at` is before its invocation: both are harness bugs.
    pub fn complete(&mut self, id: OpId, output: O, at: u64) {
        let operation = &mut self.operations[id.0];
        assert!(matches!(operation.outcome, Outcome::Unknown), "{id} completed twice");
        assert!(at >= operation.invoke, "{id} returned at {at} before its invocation");
        operation.outcome = Outcome::Returned { output, at };
    }

    /// All operations, in invocation-recording order; `OpId(i)` is the `i`-th.
    pub fn operations(&self) -> &[Operation<I, O>] {
        &self.operations
    }

    /// Number of operations recorded.
    pub fn len(&self) -> usize {
        self.operations.len()
    }

    /// True if nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
    }
}

/// Limits on a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckOptions {
    /// Model steps tried, over all partitions, before giving up with [`Verdict::Unknown`].
    pub max_steps: u64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions { max_steps: 10_000_000 }
    }
}

/// The answer of a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A linearization exists.
    Linearizable,
    /// No linearization exists.
    NotLinearizable(Box<Violation>),
    /// The step budget ran out before an answer.
    Unknown(Exhausted),
}

impl Verdict {
    /// True for [`Verdict::Linearizable`].
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }

    /// The violation, if the history is not linearizable.
    pub fn violation(&self) -> Option<&Violation> {
        match self {
            Verdict::NotLinearizable(violation) => Some(violation),
            Verdict::Linearizable | Verdict::Unknown(_) => None,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Linearizable => f.write_str("linearizable"),
            Verdict::NotLinearizable(violation) => fmt::Display::fmt(violation, f),
            Verdict::Unknown(exhausted) => fmt::Display::fmt(exhausted, f),
        }
    }
}

/// Why a history is not linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The partition (`Debug` of its key) that has no linearization; `None` for an unpartitioned
    /// check.
    pub partition: Option<String>,
    /// The longest sequence of operations of that partition the search could linearize, in
    /// linearization order.
    pub longest_prefix: Vec<OpId>,
    /// After that prefix, the operation that could not be placed: of the operations with a known
    /// output not yet placed, the one that returned first (every operation invoked after its return
    /// has to wait for it).
    pub stuck: OpId,
    /// A human-readable account: the prefix, the model state after it, and each operation that
    /// could have come next with why it could not.
    pub explanation: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.explanation)
    }
}

/// The step budget ran out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exhausted {
    /// The partition being searched when it ran out (`None` for an unpartitioned check).
    pub partition: Option<String>,
    /// Steps taken in all.
    pub steps: u64,
    /// Where the search had got furthest in that partition: the longest prefix it linearized
    /// and the operation it could not place after it (as in [`Violation::explanation`]).
    pub explanation: String,
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "linearizability unknown: gave up after {} model steps", self.steps)?;
        if let Some(partition) = &self.partition {
            write!(f, " in partition {partition}")?;
        }
        write!(f, "; the search got furthest here:{}", self.explanation)
    }
}

/// Checks a whole history against `model` as one object.
pub fn check<M: Model>(
    model: &M,
    operations: &[Operation<M::Input, M::Output>],
    options: &CheckOptions,
) -> Verdict {
    let all: Vec<usize> = (0..operations.len()).collect();
    let mut steps = 0;
    match search(model, operations, &all, &mut steps, options.max_steps) {
        Search::Linearizable => Verdict::Linearizable,
        Search::Exhausted(furthest) => Verdict::Unknown(Exhausted {
            partition: None,
            steps,
            explanation: furthest.explanation,
        }),
        Search::Failed(failure) => Verdict::NotLinearizable(Box::new(failure.into_violation(None))),
    }
}

/// Checks a history partition by partition: `partition_of` names the part each input touches.
///
/// Sound only if the model's state is a product of independent parts and every operation touches
/// exactly the part it is mapped to (P-compositionality), as for [`KvModel`] by key. Partitions are
/// checked in key order; the first violation found is returned, otherwise `Unknown` if any
/// partition exhausted the (shared) budget.
pub fn check_partitioned<M, K, F>(
    model: &M,
    operations: &[Operation<M::Input, M::Output>],
    partition_of: F,
    options: &CheckOptions,
) -> Verdict
where
    M: Model,
    K: Ord + Debug,
    F: Fn(&M::Input) -> K,
{
    let mut partitions: BTreeMap<K, Vec<usize>> = BTreeMap::new();
    for (index, operation) in operations.iter().enumerate() {
        partitions.entry(partition_of(&operation.input)).or_default().push(index);
    }
    let mut steps = 0;
    let mut exhausted = None;
    for (key, members) in &partitions {
        match search(model, operations, members, &mut steps, options.max_steps) {
            Search::Linearizable => {}
            Search::Exhausted(furthest) => {
                exhausted.get_or_insert_with(|| (format!("{key:?}"), furthest.explanation));
            }
            Search::Failed(failure) => {
                let violation = failure.into_violation(Some(format!("{key:?}")));
                return Verdict::NotLinearizable(Box::new(violation));
            }
        }
    }
    match exhausted {
        None => Verdict::Linearizable,
        Some((partition, explanation)) => {
            Verdict::Unknown(Exhausted { partition: Some(partition), steps, explanation })
        }
    }
}

/// Checks a key-value history against [`KvModel`], key by key.
pub fn check_kv<K, V>(
    operations: &[Operation<KvInput<K, V>, KvOutput<V>>],
    options: &CheckOptions,
) -> Verdict
where
    K: Clone + Ord + Hash + Debug,
    V: Clone + Eq + Hash + Debug,
{
    check_partitioned(&KvModel::new(), operations, |input| input.key().clone(), options)
}

/// A fixed-size set of entry indices; part of the memoization key.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bitset(Box<[u64]>);

impl Bitset {
    fn new(len: usize) -> Self {
        Bitset(vec![0; len.div_ceil(64)].into_boxed_slice())
    }

    fn contains(&self, index: usize) -> bool {
        self.0[index / 64] & (1 << (index % 64)) != 0
    }

    fn insert(&mut self, index: usize) {
        self.0[index / 64] |= 1 << (index % 64);
    }

    fn remove(&mut self, index: usize) {
        self.0[index / 64] &= !(1 << (index % 64));
    }

    /// True if every member of `self` is in `other` (same length).
    fn is_subset(&self, other: &Bitset) -> bool {
        self.0.iter().zip(other.0.iter()).all(|(mine, theirs)| mine & !theirs == 0)
    }

    /// The smallest index not in the set (may be past the end).
    fn first_absent(&self) -> usize {
        self.0
            .iter()
            .position(|word| *word != u64::MAX)
            .map_or(self.0.len() * 64, |word| word * 64 + self.0[word].trailing_ones() as usize)
    }
}

/// The configurations explored, for memoization with subsumption.
///
/// A configuration is (placed operations with a known outcome, placed operations with an unknown
/// one, model state). Of two configurations that differ only in their unknown parts, the one that
/// placed fewer unknown operations can do everything the other can: unknown operations constrain
/// no one and may always be placed later or never. So a configuration is skipped if one with the
/// same known part and state, and a subset of its unknown part, was seen. Without unknown
/// operations this is plain WGL memoization.
struct Seen<S> {
    /// (known part, state) → the minimal unknown parts seen with them.
    minimal_unknown: HashMap<(Bitset, S), Vec<Bitset>>,
}

impl<S> Default for Seen<S> {
    fn default() -> Self {
        Seen { minimal_unknown: HashMap::new() }
    }
}

impl<S: Clone + Eq + Hash> Seen<S> {
    /// Records the configuration; false if it (or one that subsumes it) was seen before.
    fn visit(&mut self, definite: &Bitset, unknown: &Bitset, state: &S) -> bool {
        let minimal = self.minimal_unknown.entry((definite.clone(), state.clone())).or_default();
        if minimal.iter().any(|seen| seen.is_subset(unknown)) {
            return false;
        }
        minimal.retain(|seen| !unknown.is_subset(seen));
        minimal.push(unknown.clone());
        true
    }
}

/// An operation as the search sees it.
struct Entry {
    /// Index in the caller's slice.
    op: usize,
    invoke: u64,
    /// `u64::MAX` for an operation with unknown outcome.
    ret: u64,
    definite: bool,
}

/// One level of the depth-first search: the state reached and the operations to try next.
struct Frame<S> {
    state: S,
    candidates: Vec<usize>,
    next: usize,
}

enum Search {
    Linearizable,
    /// The budget ran out; what the search had found furthest.
    Exhausted(Failure),
    Failed(Failure),
}

/// What the search learnt about a partition without a linearization.
struct Failure {
    longest_prefix: Vec<OpId>,
    stuck: OpId,
    explanation: String,
}

impl Failure {
    fn into_violation(self, partition: Option<String>) -> Violation {
        let mut explanation = String::from("not linearizable");
        if let Some(partition) = &partition {
            let _ = write!(explanation, " (partition {partition})");
        }
        explanation.push_str(&self.explanation);
        Violation { partition, longest_prefix: self.longest_prefix, stuck: self.stuck, explanation }
    }
}

/// The operations of one search, sorted for candidate selection.
struct Entries {
    /// Sorted by invocation time.
    by_invoke: Vec<Entry>,
    /// Indices into `by_invoke` of the operations with a known outcome, by return time.
    by_return: Vec<usize>,
}

impl Entries {
    fn new<M: Model>(
        model: &M,
        operations: &[Operation<M::Input, M::Output>],
        members: &[usize],
    ) -> Self {
        let mut by_invoke: Vec<Entry> = members
            .iter()
            .map(|&op| (op, &operations[op]))
            // An unknown read changes nothing and shows nothing: it can always be left out.
            .filter(|(_, operation)| {
                operation.return_time().is_some() || !model.is_read_only(&operation.input)
            })
            .map(|(op, operation)| {
                let ret = operation.return_time().unwrap_or(u64::MAX);
                assert!(ret >= operation.invoke, "{} returned before its invocation", OpId(op));
                Entry {
                    op,
                    invoke: operation.invoke,
                    ret,
                    definite: operation.return_time().is_some(),
                }
            })
            .collect();
        by_invoke.sort_by_key(|entry| (entry.invoke, entry.op));
        let mut by_return: Vec<usize> =
            (0..by_invoke.len()).filter(|&index| by_invoke[index].definite).collect();
        by_return.sort_by_key(|&index| (by_invoke[index].ret, index));
        Entries { by_invoke, by_return }
    }

    /// The entry with a known outcome, not yet placed, that returned first.
    fn first_unplaced_return(&self, placed: &Bitset) -> Option<usize> {
        self.by_return.iter().copied().find(|&index| !placed.contains(index))
    }

    /// The entries that may be placed next: invoked no later than the earliest return among the
    /// entries not yet placed. Those with a known output come first, by return time: they must be
    /// placed anyway, while the others usually need not be.
    fn candidates(&self, placed: &Bitset) -> Vec<usize> {
        let deadline =
            self.first_unplaced_return(placed).map_or(u64::MAX, |index| self.by_invoke[index].ret);
        let mut definite = Vec::new();
        let mut unknown = Vec::new();
        for index in placed.first_absent()..self.by_invoke.len() {
            let entry = &self.by_invoke[index];
            if entry.invoke > deadline {
                break;
            }
            if placed.contains(index) {
                continue;
            }
            if entry.definite {
                definite.push(index);
            } else {
                unknown.push(index);
            }
        }
        // Earliest return first: operations tend to take effect in the order they return, and an
        // operation invoked long before it returned is more often placed late than early.
        definite.sort_by_key(|&index| self.by_invoke[index].ret);
        definite.append(&mut unknown);
        definite
    }
}

impl Entries {
    /// The candidates to try from a configuration, reduced to one when a read can go now.
    ///
    /// A read-only operation with a known output that the model accepts in the current state can
    /// be placed next without loss: in any linearization from here, moving it to the front keeps
    /// every other operation's state (it changes none) and every real-time order (being a
    /// candidate, nothing unplaced returned before it was invoked). Placing such reads at once
    /// keeps the search from trying every order of the writes concurrent with them first.
    /// Each read tried counts as a step.
    fn next_moves<M: Model>(
        &self,
        model: &M,
        operations: &[Operation<M::Input, M::Output>],
        placed: &Bitset,
        state: &M::State,
        steps: &mut u64,
        enabling_only: bool,
    ) -> Vec<usize> {
        let mut candidates = self.candidates(placed);
        let forced = candidates.iter().copied().find(|&index| {
            let entry = &self.by_invoke[index];
            let operation = &operations[entry.op];
            if !entry.definite || !model.is_read_only(&operation.input) {
                return false;
            }
            *steps += 1;
            model.step(state, &operation.input, operation.output()).is_some()
        });
        if let Some(index) = forced {
            candidates.clear();
            candidates.push(index);
        } else if enabling_only {
            self.keep_enabling(model, operations, state, steps, &mut candidates);
        }
        candidates
    }

    /// Drops the unknown-outcome candidates that would not, placed now, let some answered
    /// candidate the model refuses in `state` go next.
    fn keep_enabling<M: Model>(
        &self,
        model: &M,
        operations: &[Operation<M::Input, M::Output>],
        state: &M::State,
        steps: &mut u64,
        candidates: &mut Vec<usize>,
    ) {
        let refused: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&index| {
                let entry = &self.by_invoke[index];
                let operation = &operations[entry.op];
                *steps += 1;
                entry.definite && model.step(state, &operation.input, operation.output()).is_none()
            })
            .collect();
        candidates.retain(|&index| {
            let entry = &self.by_invoke[index];
            if entry.definite {
                return true;
            }
            *steps += 1;
            let Some(next) = model.step(state, &operations[entry.op].input, None) else {
                return false;
            };
            refused.iter().any(|&other| {
                let operation = &operations[self.by_invoke[other].op];
                *steps += 1;
                model.step(&next, &operation.input, operation.output()).is_some()
            })
        });
    }
}

/// The WGL search over the operations `members` of `operations`.
///
/// With operations of unknown outcome, a first, incomplete search places one only where it lets
/// a refused answered operation go next. A linearization it finds is a linearization; if it finds
/// none within half the remaining budget, the complete search decides.
fn search<M: Model>(
    model: &M,
    operations: &[Operation<M::Input, M::Output>],
    members: &[usize],
    steps: &mut u64,
    max_steps: u64,
) -> Search {
    let entries = Entries::new(model, operations, members);
    if entries.by_return.len() < entries.by_invoke.len() {
        let budget = *steps + (max_steps - (*steps).min(max_steps)) / 2;
        if let Search::Linearizable =
            search_entries(model, operations, &entries, steps, budget, true)
        {
            return Search::Linearizable;
        }
    }
    search_entries(model, operations, &entries, steps, max_steps, false)
}

/// The search proper; `enabling_only` makes it incomplete (see [`search`]).
fn search_entries<M: Model>(
    model: &M,
    operations: &[Operation<M::Input, M::Output>],
    entries: &Entries,
    steps: &mut u64,
    max_steps: u64,
    enabling_only: bool,
) -> Search {
    let count = entries.by_invoke.len();
    let mut unplaced_definite = entries.by_return.len();
    if unplaced_definite == 0 {
        return Search::Linearizable;
    }
    // All placed entries; the placed entries with a known outcome; the others.
    let mut placed = Bitset::new(count);
    let mut placed_definite = Bitset::new(count);
    let mut placed_unknown = Bitset::new(count);
    let mut path: Vec<usize> = Vec::new();
    let mut longest: Vec<usize> = Vec::new();
    let mut seen = Seen::default();
    let state = model.init();
    let candidates = entries.next_moves(model, operations, &placed, &state, steps, enabling_only);
    let mut stack = vec![Frame { state, candidates, next: 0 }];
    while let Some(frame) = stack.last_mut() {
        let Some(&index) = frame.candidates.get(frame.next) else {
            // Every way on from here failed: undo the placement that led here.
            stack.pop();
            if let Some(index) = path.pop() {
                placed.remove(index);
                if entries.by_invoke[index].definite {
                    placed_definite.remove(index);
                    unplaced_definite += 1;
                } else {
                    placed_unknown.remove(index);
                }
            }
            continue;
        };
        frame.next += 1;
        if *steps >= max_steps {
            return Search::Exhausted(explain(model, operations, entries, &longest));
        }
        *steps += 1;
        let entry = &entries.by_invoke[index];
        let operation = &operations[entry.op];
        let Some(state) = model.step(&frame.state, &operation.input, operation.output()) else {
            continue;
        };
        let (kind, other) = if entry.definite {
            (&mut placed_definite, &placed_unknown)
        } else {
            (&mut placed_unknown, &placed_definite)
        };
        kind.insert(index);
        let (definite_set, unknown_set) =
            if entry.definite { (&*kind, other) } else { (other, &*kind) };
        if !seen.visit(definite_set, unknown_set, &state) {
            kind.remove(index);
            continue;
        }
        placed.insert(index);
        path.push(index);
        if entry.definite {
            unplaced_definite -= 1;
            if unplaced_definite == 0 {
                return Search::Linearizable;
            }
        }
        if path.len() > longest.len() {
            longest.clone_from(&path);
        }
        let candidates =
            entries.next_moves(model, operations, &placed, &state, steps, enabling_only);
        stack.push(Frame { state, candidates, next: 0 });
    }
    Search::Failed(explain(model, operations, entries, &longest))
}

/// Replays the longest prefix found and says why nothing could follow it.
fn explain<M: Model>(
    model: &M,
    operations: &[Operation<M::Input, M::Output>],
    entries: &Entries,
    longest: &[usize],
) -> Failure {
    /// Prefix operations shown; the rest are elided (they are in `longest_prefix`).
    const SHOWN_MAX: usize = 20;
    let describe = |index: usize| describe(operations, entries.by_invoke[index].op);
    let mut placed = Bitset::new(entries.by_invoke.len());
    let mut state = model.init();
    for &index in longest {
        let operation = &operations[entries.by_invoke[index].op];
        state = model
            .step(&state, &operation.input, operation.output())
            .expect("a prefix the search accepted replays");
        placed.insert(index);
    }
    let stuck = entries
        .first_unplaced_return(&placed)
        .expect("a failed search leaves an operation with a known outcome unplaced");
    let mut text = String::new();
    let _ = write!(text, "\nlongest linearizable prefix: {} operations", longest.len());
    if longest.len() > SHOWN_MAX {
        let _ = write!(text, " (the first {} not shown)", longest.len() - SHOWN_MAX);
    }
    for &index in &longest[longest.len().saturating_sub(SHOWN_MAX)..] {
        let _ = write!(text, "\n  {}", describe(index));
    }
    let _ = write!(text, "\nstate after it: {state:?}");
    let _ = write!(text, "\ncannot place: {}", describe(stuck));
    for index in entries.candidates(&placed) {
        let operation = &operations[entries.by_invoke[index].op];
        let why = match model.step(&state, &operation.input, operation.output()) {
            None => "the model refuses its output in that state",
            Some(_) => "allowed, but nothing linearizable follows",
        };
        let _ = write!(text, "\n  next could be {}: {why}", describe(index));
    }
    Failure {
        longest_prefix: longest.iter().map(|&index| OpId(entries.by_invoke[index].op)).collect(),
        stuck: OpId(entries.by_invoke[stuck].op),
        explanation: text,
    }
}

/// One line for an operation: id, client, interval, input and output.
fn describe<I: Debug, O: Debug>(operations: &[Operation<I, O>], op: usize) -> String {
    let operation = &operations[op];
    match &operation.outcome {
        Outcome::Returned { output, at } => format!(
            "{} client {} [{}, {}] {:?} -> {:?}",
            OpId(op),
            operation.client,
            operation.invoke,
            at,
            operation.input,
            output
        ),
        Outcome::TookEffect { by } => format!(
            "{} client {} [{}, {}] {:?} -> unknown (took effect)",
            OpId(op),
            operation.client,
            operation.invoke,
            by,
            operation.input
        ),
        Outcome::Unknown => format!(
            "{} client {} [{}, unknown] {:?} -> unknown",
            OpId(op),
            operation.client,
            operation.invoke,
            operation.input
        ),
    }
}

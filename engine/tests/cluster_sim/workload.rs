//! Simulated clients: each runs one operation at a time (get, put or compare-and-set on a key of
//! some group) against the node it believes leads that group, follows refusals' leader hints,
//! resends unanswered reads elsewhere, gives up after a timeout, and records everything in a
//! [`History`] for the linearizability checker.
//!
//! Every write carries a value no other write uses (its operation id), written unsessioned: a
//! write accepted by a node is never sent again, so each operation is in some log at most once
//! and the [`Oracle`](super::machine::Oracle) can tell when an unanswered one took effect.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use flotilla::kv::{
    Command, Outcome as KvOutcome, Proposal, QueryResult, Reply, Request as KvRequest,
};
use flotilla::raftgroup::NodeId;
use flotilla::raftgroup::testkit::{History, KvInput, KvOutput, OpId, Operation, Outcome, SimRng};
use flotilla::shard::{Completion, RequestError, Token};
use flotilla::wal::GroupId;

use super::machine::{Oracle, TracedKv, op_of};

/// An operation of the checked history: keys are `group * KEY_SPACE + key`, values operation ids.
pub type KvOperation = Operation<KvInput<u64, u64>, KvOutput<u64>>;

/// Keys per group are numbered below this.
pub const KEY_SPACE: u64 = 1_000;

/// How the workload reaches the cluster.
pub trait Frontend {
    /// A history timestamp for an event now (increasing, shared with the cluster's events).
    fn stamp(&mut self) -> u64;
    /// Current time.
    fn now(&self) -> u64;
    /// Asks `node` to propose `payload` to `group`; the answer comes back as a completion.
    fn propose(
        &mut self,
        node: NodeId,
        group: GroupId,
        payload: Bytes,
        token: Token,
    ) -> Result<(), RequestError>;
    /// Asks `node` for a linearizable read of `key` in `group`.
    fn read(
        &mut self,
        node: NodeId,
        group: GroupId,
        key: Bytes,
        token: Token,
    ) -> Result<(), RequestError>;
    /// The client stopped waiting for `tokens` at `node`.
    fn expire(&mut self, node: NodeId, tokens: &[Token]);
}

/// The shape of the load.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadConfig {
    /// Concurrent clients.
    pub clients: u64,
    /// Operations in all.
    pub operations: usize,
    /// Groups (ids 1..=groups).
    pub groups: u64,
    /// Keys per group; few keys, much contention.
    pub keys_per_group: u64,
    /// Time after which an operation is abandoned (then maybe applied).
    pub timeout: u64,
    /// Time after which an unanswered read is sent again elsewhere.
    pub read_retry: u64,
    /// Longest pause before retrying a refused request.
    pub backoff_max: u64,
    /// Longest pause between two operations of a client.
    pub think_max: u64,
}

/// What the clients did.
#[derive(Clone, Copy, Debug, Default)]
pub struct WorkloadStats {
    /// Operations invoked.
    pub issued: u64,
    /// Operations answered.
    pub answered: u64,
    /// Operations abandoned at their timeout.
    pub timed_out: u64,
    /// Proposals reported dropped by a leader change.
    pub dropped: u64,
    /// Requests refused and retried.
    pub refused: u64,
    /// Reads sent again.
    pub read_resends: u64,
}

#[derive(Debug)]
struct Pending {
    op: OpId,
    group: GroupId,
    input: KvInput<u64, u64>,
    /// Tokens sent, with the node holding each.
    tokens: Vec<(Token, NodeId)>,
    /// Whether a node holds the request now.
    sent: bool,
    retry_at: u64,
    deadline: u64,
}

#[derive(Debug)]
struct Client {
    id: u64,
    /// Where requests for each group go next.
    guess: BTreeMap<GroupId, NodeId>,
    pending: Option<Pending>,
    next_at: u64,
    /// The last value this client saw per key.
    seen: BTreeMap<u64, u64>,
}

/// All clients and their history.
#[derive(Debug)]
pub struct Workload {
    config: WorkloadConfig,
    nodes: Vec<NodeId>,
    rng: SimRng,
    clients: Vec<Client>,
    history: History<KvInput<u64, u64>, KvOutput<u64>>,
    /// Operations reported dropped (never applied, the core says).
    dropped: Vec<(OpId, u64)>,
    tokens: HashMap<Token, usize>,
    next_token: Token,
    latest: BTreeMap<u64, u64>,
    stats: WorkloadStats,
}

/// The bytes of a key.
pub fn key_bytes(key: u64) -> Bytes {
    Bytes::from(format!("k{key:05}"))
}

/// The group a history key lives in.
pub fn group_of(key: u64) -> GroupId {
    GroupId(key / KEY_SPACE)
}

fn value_bytes(op: u64) -> Bytes {
    Bytes::copy_from_slice(&op.to_le_bytes())
}

impl Workload {
    /// Clients for `nodes`.
    pub fn new(config: WorkloadConfig, nodes: Vec<NodeId>, mut rng: SimRng) -> Self {
        let clients = (1..=config.clients)
            .map(|id| Client {
                id,
                guess: (1..=config.groups)
                    .map(|group| (GroupId(group), nodes[rng.index(nodes.len())]))
                    .collect(),
                pending: None,
                next_at: rng.below(config.think_max + 1),
                seen: BTreeMap::new(),
            })
            .collect();
        Workload {
            config,
            nodes,
            rng,
            clients,
            history: History::new(),
            dropped: Vec::new(),
            tokens: HashMap::new(),
            // Operation ids are history positions + 1; tokens come from their own counter.
            next_token: 1,
            latest: BTreeMap::new(),
            stats: WorkloadStats::default(),
        }
    }

    /// What the clients did.
    pub fn stats(&self) -> WorkloadStats {
        self.stats
    }

    /// Every operation issued and ended.
    pub fn is_done(&self) -> bool {
        self.history.len() >= self.config.operations
            && self.clients.iter().all(|client| client.pending.is_none())
    }

    /// Every key the workload may touch.
    pub fn keys(&self) -> Vec<u64> {
        (1..=self.config.groups)
            .flat_map(|group| (0..self.config.keys_per_group).map(move |k| group * KEY_SPACE + k))
            .collect()
    }

    /// Lets every client act now.
    pub fn step(&mut self, frontend: &mut impl Frontend) {
        let now = frontend.now();
        for index in 0..self.clients.len() {
            let client = &self.clients[index];
            match &client.pending {
                Some(pending) if now >= pending.deadline => self.abandon(index, frontend),
                Some(pending) => {
                    let resend = if pending.sent {
                        matches!(pending.input, KvInput::Get { .. }) && now >= pending.retry_at
                    } else {
                        now >= pending.retry_at
                    };
                    if resend {
                        if pending.sent {
                            self.stats.read_resends += 1;
                            self.redirect(index, None);
                        }
                        self.send(index, frontend);
                    }
                }
                None if self.history.len() < self.config.operations && now >= client.next_at => {
                    self.start(index, frontend);
                    self.send(index, frontend);
                }
                None => {}
            }
        }
    }

    fn start(&mut self, index: usize, frontend: &mut impl Frontend) {
        let group = 1 + self.rng.below(self.config.groups);
        // Skewed towards key 0 of each group: contention.
        let key = group * KEY_SPACE
            + if self.rng.percent(50) { 0 } else { self.rng.below(self.config.keys_per_group) };
        let op_id = self.history.len() as u64 + 1;
        let input = match self.rng.below(10) {
            0..=3 => KvInput::Get { key },
            4..=7 => KvInput::Put { key, value: op_id },
            _ => {
                let expected = match self.rng.below(4) {
                    0 => None,
                    1 => self.latest.get(&key).copied(),
                    _ => self.clients[index].seen.get(&key).copied(),
                };
                KvInput::CompareAndSet { key, expected, new: op_id }
            }
        };
        if !matches!(input, KvInput::Get { .. }) {
            self.latest.insert(key, op_id);
        }
        let at = frontend.stamp();
        let now = frontend.now();
        let client = &mut self.clients[index];
        let op = self.history.invoke(client.id, input.clone(), at);
        debug_assert_eq!(op.0 as u64 + 1, op_id);
        client.pending = Some(Pending {
            op,
            group: GroupId(group),
            input,
            tokens: Vec::new(),
            sent: false,
            retry_at: now,
            deadline: now + self.config.timeout,
        });
        self.stats.issued += 1;
    }

    fn send(&mut self, index: usize, frontend: &mut impl Frontend) {
        let token = self.next_token;
        self.next_token += 1;
        let now = frontend.now();
        let client = &mut self.clients[index];
        let pending = client.pending.as_mut().expect("an operation to send");
        let node = client.guess[&pending.group];
        let result = match &pending.input {
            KvInput::Get { key } => frontend.read(node, pending.group, key_bytes(*key), token),
            KvInput::Put { key, value } => {
                let command = Command::Put { key: key_bytes(*key), value: value_bytes(*value) };
                frontend.propose(node, pending.group, payload(command), token)
            }
            KvInput::CompareAndSet { key, expected, new } => {
                let command = Command::CompareAndSet {
                    key: key_bytes(*key),
                    expected: expected.map(value_bytes),
                    new: Some(value_bytes(*new)),
                };
                frontend.propose(node, pending.group, payload(command), token)
            }
        };
        match result {
            Ok(()) => {
                pending.sent = true;
                pending.tokens.push((token, node));
                pending.retry_at = now + self.config.read_retry;
                self.tokens.insert(token, index);
            }
            Err(error) => self.refused(index, now, &error),
        }
    }

    /// The request was not accepted (never appended): try again, maybe elsewhere.
    fn refused(&mut self, index: usize, now: u64, error: &RequestError) {
        self.stats.refused += 1;
        let backoff = 1 + self.rng.below(self.config.backoff_max);
        let pending = self.clients[index].pending.as_mut().expect("pending");
        pending.sent = false;
        pending.retry_at = now + backoff;
        match error {
            RequestError::Busy => {}
            RequestError::NotLeader { leader_hint } => self.redirect(index, *leader_hint),
            _ => self.redirect(index, None),
        }
    }

    fn redirect(&mut self, index: usize, hint: Option<NodeId>) {
        let group = self.clients[index].pending.as_ref().expect("pending").group;
        let current = self.clients[index].guess[&group];
        let next = match hint {
            Some(hint) if hint != current && self.nodes.contains(&hint) => hint,
            _ => {
                let others: Vec<NodeId> =
                    self.nodes.iter().copied().filter(|node| *node != current).collect();
                others[self.rng.index(others.len())]
            }
        };
        let client = &mut self.clients[index];
        client.guess.insert(group, next);
        client.pending.as_mut().expect("pending").sent = false;
    }

    fn finish(&mut self, index: usize, now: u64) -> Pending {
        let client = &mut self.clients[index];
        let pending = client.pending.take().expect("pending");
        client.next_at = now + self.rng.below(self.config.think_max + 1);
        for (token, _) in &pending.tokens {
            self.tokens.remove(token);
        }
        pending
    }

    /// Gives up: the operation stays maybe-applied.
    fn abandon(&mut self, index: usize, frontend: &mut impl Frontend) {
        self.stats.timed_out += 1;
        let pending = self.finish(index, frontend.now());
        let mut by_node: BTreeMap<NodeId, Vec<Token>> = BTreeMap::new();
        for (token, node) in &pending.tokens {
            by_node.entry(*node).or_default().push(*token);
        }
        for (node, tokens) in by_node {
            frontend.expire(node, &tokens);
        }
    }

    /// Hands the cluster's answers to the clients.
    pub fn on_completions(
        &mut self,
        frontend: &mut impl Frontend,
        completions: Vec<Completion<TracedKv>>,
        refusals: Vec<(Token, RequestError)>,
    ) {
        let now = frontend.now();
        for (token, error) in refusals {
            if let Some(&index) = self.tokens.get(&token) {
                self.tokens.remove(&token);
                let pending = self.clients[index].pending.as_mut().expect("token of a pending");
                pending.tokens.retain(|(t, _)| *t != token);
                if pending.tokens.is_empty() {
                    self.refused(index, now, &error);
                }
            }
        }
        for completion in completions {
            let token = match &completion {
                Completion::Applied { token, .. }
                | Completion::Read { token, .. }
                | Completion::Failed { token, .. } => *token,
            };
            let Some(&index) = self.tokens.get(&token) else { continue };
            let output = match completion {
                Completion::Applied { response, .. } => match response {
                    Ok(Reply::Done(KvOutcome::Written)) => KvOutput::Put,
                    Ok(Reply::Done(KvOutcome::Swapped)) => KvOutput::CompareAndSet(true),
                    Ok(Reply::Done(KvOutcome::Mismatch { .. })) => KvOutput::CompareAndSet(false),
                    other => panic!("unexpected answer to a client write: {other:?}"),
                },
                Completion::Read { result, .. } => match result {
                    QueryResult::Value(value) => {
                        KvOutput::Get(value.map(|v| op_of(&v).expect("values are operation ids")))
                    }
                    other @ QueryResult::Range { .. } => panic!("a get answered {other:?}"),
                },
                Completion::Failed { error, .. } => {
                    let pending = self.clients[index].pending.as_ref().expect("pending");
                    if super::node::debug() {
                        eprintln!(
                            "t{now} token {token} of #{} ({:?}) failed: {error:?}, held by {:?}",
                            pending.op.0, pending.input, pending.tokens
                        );
                    }
                    if error == RequestError::ProposalDropped {
                        // Not applied, the core says: the oracle checks that at the end.
                        self.stats.dropped += 1;
                        let op_id = pending.op.0 as u64 + 1;
                        self.dropped.push((pending.op, op_id));
                    }
                    self.stats.timed_out += 1;
                    let pending = self.finish(index, now);
                    let mut by_node: BTreeMap<NodeId, Vec<Token>> = BTreeMap::new();
                    for (token, node) in &pending.tokens {
                        by_node.entry(*node).or_default().push(*token);
                    }
                    for (node, tokens) in by_node {
                        frontend.expire(node, &tokens);
                    }
                    continue;
                }
            };
            let at = frontend.stamp();
            let pending = self.finish(index, now);
            let known = match (&pending.input, &output) {
                (KvInput::Get { key }, KvOutput::Get(Some(value))) => Some((*key, *value)),
                (KvInput::Put { key, value }, _)
                | (KvInput::CompareAndSet { key, new: value, .. }, KvOutput::CompareAndSet(true)) => {
                    Some((*key, *value))
                }
                _ => None,
            };
            if let Some((key, value)) = known {
                self.clients[index].seen.insert(key, value);
            }
            // Answers from other nodes still holding this operation's tokens are not needed.
            let others: Vec<(Token, NodeId)> =
                pending.tokens.iter().copied().filter(|(t, _)| *t != token).collect();
            for (other, node) in others {
                frontend.expire(node, &[other]);
            }
            self.history.complete(pending.op, output, at);
            self.stats.answered += 1;
        }
    }

    /// Records a final read of `key` that returned `value` between `invoke` and `at`.
    pub fn record_final_read(&mut self, key: u64, value: Option<u64>, invoke: u64, at: u64) {
        let op = self.history.invoke(0, KvInput::Get { key }, invoke);
        self.history.complete(op, KvOutput::Get(value), at);
    }

    /// The history to check, with unanswered writes resolved by what the oracle saw: applied
    /// ones took effect by their first application, never-applied ones are left out (after the
    /// heal every committed entry was applied everywhere, so they never will be). Also returns
    /// how many were left out. Panics if an operation the core reported dropped was applied.
    pub fn resolved_history(&self, oracle: &Oracle) -> (Vec<KvOperation>, usize) {
        for (op, op_id) in &self.dropped {
            if let Some(at) = oracle.took_effect(*op_id) {
                panic!(
                    "operation {op} was reported dropped (ProposalDropped: not applied) but was \
                     applied at stamp {at}"
                );
            }
        }
        let mut history = self.history.clone();
        let mut never_applied = Vec::new();
        for (index, operation) in self.history.operations().iter().enumerate() {
            if operation.return_time().is_some() || matches!(operation.input, KvInput::Get { .. }) {
                continue;
            }
            match oracle.took_effect(index as u64 + 1) {
                Some(by) => history.took_effect(OpId(index), by),
                None => never_applied.push(index),
            }
        }
        let left_out = never_applied.len();
        let operations = history
            .operations()
            .iter()
            .enumerate()
            .filter(|(index, _)| never_applied.binary_search(index).is_err())
            .map(|(_, operation)| operation.clone())
            .collect();
        (operations, left_out)
    }

    /// Durability: for every key, the final value must come from a write that was applied, and
    /// no acknowledged write may be lost — the final value's writer must not have finished
    /// before an acknowledged write to that key started (else that write was overwritten by
    /// nothing). `finals` maps keys to their converged values.
    pub fn check_durability(
        &self,
        oracle: &Oracle,
        finals: &BTreeMap<u64, Option<u64>>,
    ) -> Result<(), String> {
        let operations = self.history.operations();
        for (index, operation) in operations.iter().enumerate() {
            let acked_write = match (&operation.input, &operation.outcome) {
                (KvInput::Put { key, .. }, Outcome::Returned { .. })
                | (
                    KvInput::CompareAndSet { key, .. },
                    Outcome::Returned { output: KvOutput::CompareAndSet(true), .. },
                ) => Some(*key),
                _ => None,
            };
            let Some(key) = acked_write else { continue };
            let Some(final_op) = finals[&key] else {
                return Err(format!(
                    "acknowledged write #{index} to key {key} lost: the key is absent"
                ));
            };
            if oracle.took_effect(final_op).is_none() {
                return Err(format!("key {key} holds {final_op}, which no replica applied"));
            }
            if final_op == index as u64 + 1 {
                continue;
            }
            let writer = &operations[(final_op - 1) as usize];
            if let Some(returned) = writer.return_time()
                && matches!(writer.outcome, Outcome::Returned { .. })
                && returned < operation.invoke
            {
                return Err(format!(
                    "acknowledged write #{index} to key {key} lost: the key holds the value of \
                     #{}, which finished before #{index} started",
                    final_op - 1
                ));
            }
        }
        Ok(())
    }
}

fn payload(command: Command) -> Bytes {
    Proposal { leader_time_ms: 0, request: KvRequest::Unsessioned(command) }.to_bytes()
}

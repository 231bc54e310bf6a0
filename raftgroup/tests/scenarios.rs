//! Data-driven scenario tests: `testdata/*.txt` hold commands and the output they must produce.
//!
//! Format: a command line, `----`, the expected output lines, then a blank line. `#` lines are
//! comments. Run with `REWRITE=1` to regenerate the expected output (then review the diff).
//!
//! Commands (ids are node numbers; `all` means every node):
//! - `cluster voters=1,2,3 [learners=4] [prevote=false] [checkquorum=false] [lease=true]
//!   [election=10] [heartbeat=1] [inflight=N] [batch=BYTES] [uncommitted=BYTES] [cache=BYTES]
//!   [drift=TICKS]`
//! - `tick <ids|all> [N] [nodeliver]`: N rounds (default 1) of one tick per node, then delivery
//!   of every message (unless `nodeliver`: they stay queued)
//! - `tick-fast <ids> [N]`: N rounds in which every node ticks once and `ids` twice (clock
//!   skew), each followed by delivery
//! - `campaign <id>`, `propose <id> <text>`, `read <id> <context>[,<context>..] [quorum|lease]`
//!   (`read_index`, or `read_index_with` that mode),
//!   `transfer <id> <to>`, `conf <id> voters=.. [learners=..]`, `compact <id> <index>`
//! - `deliver [from->to] [N]`: delivers queued messages (matching, up to N) once, printing them
//! - `drop [from->to]`: discards queued messages, printing them
//! - `stabilize [quiet]`: delivers until no message is left, printing them unless quiet
//! - `partition 1 2 | 3`: only nodes on the same side talk; `heal`
//! - `restart <id>`: a new replica from the node's storage (lost: in-memory state)
//! - `set-log <id> term=T entries=t1,t2,..`: rewrites the node's storage, then restarts it
//! - `add-node <id>`: a new empty node (joins through a membership change)
//! - `status`, `log <id>` (terms of the entries), `applied <id>`
//!
//! After every command but the last three, role and term changes print as `id: before -> after`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::mem;
use std::path::Path;

use bytes::Bytes;
use flotilla_raftgroup::{
    Config, Entry, EntryKind, FetchPurpose, HardState, LogIndex, MemStorage, MembershipChange,
    Message, MessageBody, NodeId, ReadMode, Ready, RecoveredState, Replica, Role, Snapshot, Term,
};

struct Node {
    replica: Replica,
    storage: MemStorage,
    config: Config,
    /// Applied payloads (text) by index; the state machine of these tests.
    applied: Vec<(LogIndex, String)>,
    /// With an asynchronous disk: writes (snapshot, entries, hard state, and the messages
    /// waiting for them) not yet synced, oldest first. A crash loses them.
    unsynced: Vec<Ready>,
}

impl Node {
    /// Writes every unsynced Ready to storage, in order; queues the messages that waited for
    /// them. Returns the last entry written.
    fn sync(&mut self, queue: &mut VecDeque<Message>) -> Option<(Term, LogIndex)> {
        let mut last = None;
        for write in self.unsynced.drain(..) {
            last = self.storage.persist(&write).or(last);
            // Durable now: the after-persist messages may go.
            queue.extend(write.persisted_messages.into_messages_after_persist());
        }
        last
    }
}

struct Cluster {
    nodes: BTreeMap<u64, Node>,
    queue: VecDeque<Message>,
    /// Sides of a partition: node -> side. Empty: no partition.
    sides: BTreeMap<u64, usize>,
    template: Config,
    /// Every read state any node produced: (context, index).
    reads: Vec<(u64, LogIndex)>,
    /// Writes become durable only at `sync`, not at once.
    async_disk: bool,
    /// Granted votes seen on the wire: (voter, term) -> candidate.
    votes: BTreeMap<(u64, u64), u64>,
    /// Clock skew in the randomized test: the percentage of rounds in which each node ticks.
    tick_percent: BTreeMap<u64, u64>,
}

fn ids(list: &str) -> Vec<NodeId> {
    list.split(',').filter(|s| !s.is_empty()).map(|s| NodeId(s.parse().expect("node id"))).collect()
}

fn describe(message: &Message) -> String {
    let body = match &message.body {
        MessageBody::PreVote { last_index, last_term } => {
            format!("PreVote last={}@{}", last_index.0, last_term.0)
        }
        MessageBody::Vote { last_index, last_term, transfer } => format!(
            "Vote last={}@{}{}",
            last_index.0,
            last_term.0,
            if *transfer { " transfer" } else { "" }
        ),
        MessageBody::PreVoteResponse { reject } | MessageBody::VoteResponse { reject } => {
            format!("{} {}", message.body.name(), if *reject { "reject" } else { "grant" })
        }
        MessageBody::Append { prev_index, prev_term, entries, commit } => {
            let entries: Vec<String> =
                entries.iter().map(|e| format!("{}@{}", e.index.0, e.term.0)).collect();
            format!(
                "Append prev={}@{} commit={} [{}]",
                prev_index.0,
                prev_term.0,
                commit.0,
                entries.join(" ")
            )
        }
        MessageBody::AppendResponse { reject: false, index, .. } => {
            format!("AppendResponse ok index={}", index.0)
        }
        MessageBody::AppendResponse { reject: true, index, hint_index, hint_term } => {
            format!("AppendResponse reject index={} hint={}@{}", index.0, hint_index.0, hint_term.0)
        }
        MessageBody::Heartbeat { commit, seq, .. } => {
            format!("Heartbeat commit={} seq={seq}", commit.0)
        }
        MessageBody::HeartbeatResponse { seq, .. } => format!("HeartbeatResponse seq={seq}"),
        MessageBody::Snapshot { snapshot } => format!(
            "Snapshot index={} term={} voters={:?}",
            snapshot.meta.index.0,
            snapshot.meta.term.0,
            snapshot.meta.membership.voters.iter().map(|id| id.0).collect::<Vec<_>>()
        ),
        MessageBody::ReadIndex { context } => format!("ReadIndex ctx={context}"),
        MessageBody::ReadIndexQuorum { context } => format!("ReadIndexQuorum ctx={context}"),
        MessageBody::ReadIndexResponse { context, index } => {
            format!("ReadIndexResponse ctx={context} index={:?}", index.map(|i| i.0))
        }
        MessageBody::Quiesce { commit } => format!("Quiesce commit={}", commit.0),
        other => other.name().to_owned(),
    };
    format!("{}->{} t{} {}", message.from.0, message.to.0, message.term.0, body)
}

impl Cluster {
    fn new(args: &[&str]) -> Self {
        let mut template = Config::new(NodeId(0), Vec::new());
        template.log_cache_bytes = 1 << 20;
        for arg in args {
            let (key, value) = arg.split_once('=').expect("key=value");
            match key {
                "voters" => template.voters = ids(value),
                "learners" => template.learners = ids(value),
                "prevote" => template.pre_vote = value == "true",
                "checkquorum" => template.check_quorum = value == "true",
                "lease" => template.lease_reads = value == "true",
                "election" => template.election_ticks = value.parse().expect("number"),
                "heartbeat" => template.heartbeat_ticks = value.parse().expect("number"),
                "inflight" => template.max_inflight_messages = value.parse().expect("number"),
                "batch" => template.max_batch_bytes = value.parse().expect("number"),
                "uncommitted" => template.max_uncommitted_bytes = value.parse().expect("number"),
                "cache" => template.log_cache_bytes = value.parse().expect("number"),
                "drift" => template.clock_drift_ticks = value.parse().expect("number"),
                other => panic!("unknown cluster option {other}"),
            }
        }
        let mut cluster = Self {
            nodes: BTreeMap::new(),
            queue: VecDeque::new(),
            sides: BTreeMap::new(),
            template,
            reads: Vec::new(),
            async_disk: false,
            votes: BTreeMap::new(),
            tick_percent: BTreeMap::new(),
        };
        let members: Vec<NodeId> =
            cluster.template.voters.iter().chain(&cluster.template.learners).copied().collect();
        for id in members {
            let config = Config { id, seed: id.0, ..cluster.template.clone() };
            cluster.add(config);
        }
        cluster
    }

    fn add(&mut self, config: Config) {
        let replica = Replica::new(config.clone(), RecoveredState::default()).expect("valid");
        let node = Node {
            replica,
            storage: MemStorage::new(),
            config,
            applied: Vec::new(),
            unsynced: Vec::new(),
        };
        self.nodes.insert(node.config.id.0, node);
    }

    fn node(&mut self, id: &str) -> &mut Node {
        let id: u64 = id.parse().expect("node id");
        self.nodes.get_mut(&id).unwrap_or_else(|| panic!("no node {id}"))
    }

    fn select(&self, which: &str) -> Vec<u64> {
        if which == "all" {
            self.nodes.keys().copied().collect()
        } else {
            ids(which).into_iter().map(|id| id.0).collect()
        }
    }

    /// Handles every pending Ready of every node, as a synchronous driver would.
    fn process(&mut self, out: &mut String) {
        let Self { nodes, queue, reads, async_disk, .. } = self;
        for node in nodes.values_mut() {
            while node.replica.has_ready() {
                let mut ready = node.replica.ready();
                queue.extend(ready.messages.iter().cloned());
                if let Some(snapshot) = &ready.snapshot {
                    node.applied = restore_applied(snapshot);
                    writeln!(
                        out,
                        "{}: installed snapshot {}",
                        node.config.id.0, snapshot.meta.index.0
                    )
                    .unwrap();
                }
                let write = Ready {
                    hard_state: ready.hard_state,
                    snapshot: ready.snapshot.take(),
                    entries: mem::take(&mut ready.entries),
                    persisted_messages: mem::take(&mut ready.persisted_messages),
                    ..Ready::default()
                };
                node.unsynced.push(write);
                let persisted = if *async_disk { None } else { node.sync(queue) };
                for entry in &ready.committed_entries {
                    let text = match entry.kind {
                        EntryKind::Normal => String::from_utf8_lossy(&entry.payload).into_owned(),
                        EntryKind::Membership => "<membership>".to_owned(),
                        EntryKind::Empty => "<noop>".to_owned(),
                    };
                    node.applied.push((entry.index, text));
                    node.replica.on_applied(entry.index);
                }
                for read in &ready.read_states {
                    reads.push((read.context, read.index));
                    writeln!(
                        out,
                        "{}: read ctx={} index={}",
                        node.config.id.0, read.context, read.index.0
                    )
                    .unwrap();
                }
                let fetches = ready.fetches.clone();
                node.replica.advance(ready);
                for fetch in fetches {
                    let purpose = match fetch.purpose {
                        FetchPurpose::Apply => "apply".to_owned(),
                        FetchPurpose::Replicate { to } => format!("replicate to {}", to.0),
                    };
                    writeln!(
                        out,
                        "{}: fetch {purpose} {}..={}",
                        node.config.id.0, fetch.low.0, fetch.high.0
                    )
                    .unwrap();
                    let entries = node.storage.fetch(&fetch);
                    node.replica.on_fetched(fetch, entries).expect("valid fetch");
                }
                if let Some((term, index)) = persisted {
                    node.replica.on_persisted(term, index);
                }
                node.replica.check_invariants().expect("invariants hold");
            }
        }
    }

    /// Makes node `id`'s writes durable, releases the messages that waited for them and reports
    /// persistence.
    fn sync(&mut self, id: u64, out: &mut String) {
        let node = self.nodes.get_mut(&id).expect("node");
        if let Some((term, index)) = node.sync(&mut self.queue) {
            node.replica.on_persisted(term, index);
        }
        self.process(out);
    }

    fn connected(&self, from: u64, to: u64) -> bool {
        self.sides.is_empty() || self.sides.get(&from) == self.sides.get(&to)
    }

    fn matches(message: &Message, filter: Option<(u64, u64)>) -> bool {
        filter.is_none_or(|(from, to)| message.from.0 == from && message.to.0 == to)
    }

    /// One pass over the queued messages: delivers (or loses to a partition) those matching.
    fn deliver(
        &mut self,
        filter: Option<(u64, u64)>,
        limit: usize,
        quiet: bool,
        out: &mut String,
    ) -> usize {
        let mut delivered = 0;
        let pending: Vec<Message> = self.queue.drain(..).collect();
        for message in pending {
            if delivered >= limit || !Self::matches(&message, filter) {
                self.queue.push_back(message);
                continue;
            }
            delivered += 1;
            let (from, to) = (message.from.0, message.to.0);
            if !self.connected(from, to) || !self.nodes.contains_key(&to) {
                if !quiet {
                    writeln!(out, "{} (lost)", describe(&message)).unwrap();
                }
                continue;
            }
            if !quiet {
                writeln!(out, "{}", describe(&message)).unwrap();
            }
            let node = self.nodes.get_mut(&to).expect("checked");
            node.replica.step(message).expect("step");
            node.replica.check_invariants().expect("invariants hold");
        }
        self.process(out);
        delivered
    }

    /// Delivers until no message is left, printing only reads and snapshots.
    fn settle(&mut self, out: &mut String) {
        self.process(out);
        let mut rounds = 0;
        while !self.queue.is_empty() {
            rounds += 1;
            assert!(rounds < 1000, "no quiescence after 1000 rounds");
            self.deliver(None, usize::MAX, true, out);
        }
    }

    fn status(&self, out: &mut String) {
        for (id, node) in &self.nodes {
            let status = node.replica.status();
            let membership = node.replica.membership();
            let list = |ids: &[NodeId]| {
                ids.iter().map(|id| id.0.to_string()).collect::<Vec<_>>().join(",")
            };
            write!(
                out,
                "{id}: {:?} t{} lead={} commit={} last={} applied={} voters={}",
                status.role,
                status.term.0,
                status.leader.map_or(0, |l| l.0),
                status.commit.0,
                status.last_index.0,
                status.applied.0,
                list(&membership.voters),
            )
            .unwrap();
            if membership.is_joint() {
                write!(out, " outgoing={}", list(&membership.outgoing)).unwrap();
            }
            if !membership.learners.is_empty() {
                write!(out, " learners={}", list(&membership.learners)).unwrap();
            }
            if status.snapshot_index > LogIndex::ZERO {
                write!(out, " snapshot={}", status.snapshot_index.0).unwrap();
            }
            out.push('\n');
        }
    }

    /// A crash and restart: in-memory state and unsynced writes are lost.
    fn restart(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("node");
        node.unsynced.clear();
        let applied_index = node.storage.snapshot().map_or(LogIndex::ZERO, |s| s.meta.index);
        node.applied = node.storage.snapshot().map(restore_applied).unwrap_or_default();
        let recovered = node.storage.recover(applied_index, None);
        node.replica = Replica::new(node.config.clone(), recovered).expect("recover");
    }

    #[expect(clippy::too_many_lines, reason = "one match arm per command of the scenario language")]
    fn run(&mut self, line: &str) -> String {
        let mut out = String::new();
        let words: Vec<&str> = line.split_whitespace().collect();
        let roles_before: Vec<(u64, String)> =
            self.nodes.iter().map(|(id, n)| (*id, role_line(&n.replica))).collect();
        match words[0] {
            "tick" => {
                let count = words.get(2).map_or(1, |n| n.parse().expect("count"));
                let deliver = words.get(3) != Some(&"nodeliver");
                let selected = self.select(words[1]);
                for _ in 0..count {
                    for id in &selected {
                        self.nodes.get_mut(id).expect("node").replica.tick();
                    }
                    self.process(&mut out);
                    if deliver {
                        self.settle(&mut out);
                    }
                }
            }
            "tick-fast" => {
                // Clock skew: every node ticks once per round, the listed ones twice.
                let fast = self.select(words[1]);
                let count = words.get(2).map_or(1, |n| n.parse().expect("count"));
                for _ in 0..count {
                    self.tick_all();
                    for id in &fast {
                        self.nodes.get_mut(id).expect("node").replica.tick();
                    }
                    self.settle(&mut out);
                }
            }
            "campaign" => {
                self.node(words[1]).replica.campaign_now();
                self.process(&mut out);
            }
            "propose" => {
                let text = words[2..].join(" ");
                let result = self.node(words[1]).replica.propose(Bytes::from(text));
                match result {
                    Ok(index) => writeln!(out, "ok index={}", index.0).unwrap(),
                    Err(error) => writeln!(out, "error: {error}").unwrap(),
                }
                self.process(&mut out);
            }
            "read" => {
                let mode = words.get(3).map(|mode| match *mode {
                    "quorum" => ReadMode::Quorum,
                    "lease" => ReadMode::Lease,
                    other => panic!("unknown read mode {other}"),
                });
                for context in words[2].split(',') {
                    let context = context.parse().expect("context");
                    let replica = &mut self.node(words[1]).replica;
                    let result = match mode {
                        Some(mode) => replica.read_index_with(context, mode),
                        None => replica.read_index(context),
                    };
                    if let Err(error) = result {
                        writeln!(out, "error: {error}").unwrap();
                    }
                }
                self.process(&mut out);
            }
            "transfer" => {
                let to = NodeId(words[2].parse().expect("id"));
                if let Err(error) = self.node(words[1]).replica.transfer_leadership(to) {
                    writeln!(out, "error: {error}").unwrap();
                }
                self.process(&mut out);
            }
            "conf" => {
                let mut change = MembershipChange::default();
                for arg in &words[2..] {
                    let (key, value) = arg.split_once('=').expect("key=value");
                    match key {
                        "voters" => change.voters = ids(value),
                        "learners" => change.learners = ids(value),
                        other => panic!("unknown conf option {other}"),
                    }
                }
                match self.node(words[1]).replica.propose_membership(&change) {
                    Ok(index) => writeln!(out, "ok index={}", index.0).unwrap(),
                    Err(error) => writeln!(out, "error: {error}").unwrap(),
                }
                self.process(&mut out);
            }
            "compact" => {
                let index = LogIndex(words[2].parse().expect("index"));
                let node = self.node(words[1]);
                let data = snapshot_data(&node.applied, index);
                match node.replica.compact(index, data.clone()) {
                    Ok(meta) => {
                        node.storage.compact(Snapshot { meta, data });
                        writeln!(out, "ok").unwrap();
                    }
                    Err(error) => writeln!(out, "error: {error}").unwrap(),
                }
            }
            "deliver" | "drop" => {
                let mut filter = None;
                let mut limit = usize::MAX;
                for arg in &words[1..] {
                    if let Some((from, to)) = arg.split_once("->") {
                        filter = Some((from.parse().expect("id"), to.parse().expect("id")));
                    } else {
                        limit = arg.parse().expect("count");
                    }
                }
                if words[0] == "deliver" {
                    self.deliver(filter, limit, false, &mut out);
                } else {
                    self.queue.retain(|message| {
                        let drop = Self::matches(message, filter);
                        if drop {
                            writeln!(out, "{} (dropped)", describe(message)).unwrap();
                        }
                        !drop
                    });
                }
            }
            "stabilize" => {
                if words.get(1) == Some(&"quiet") {
                    self.settle(&mut out);
                } else {
                    self.process(&mut out);
                    let mut rounds = 0;
                    while !self.queue.is_empty() {
                        rounds += 1;
                        assert!(rounds < 1000, "no quiescence after 1000 rounds");
                        self.deliver(None, usize::MAX, false, &mut out);
                    }
                }
            }
            "partition" => {
                self.sides.clear();
                for (side, group) in line["partition".len()..].split('|').enumerate() {
                    for id in group.split_whitespace() {
                        self.sides.insert(id.parse().expect("id"), side);
                    }
                }
            }
            "heal" => self.sides.clear(),
            "restart" => {
                let id = words[1].parse().expect("id");
                self.restart(id);
            }
            "set-log" => {
                let id: u64 = words[1].parse().expect("id");
                let mut hard_state = HardState::default();
                let mut entries = Vec::new();
                for arg in &words[2..] {
                    let (key, value) = arg.split_once('=').expect("key=value");
                    match key {
                        "term" => hard_state.term = Term(value.parse().expect("term")),
                        "entries" => {
                            for (i, term) in value.split(',').enumerate() {
                                entries.push(Entry {
                                    index: LogIndex(i as u64 + 1),
                                    term: Term(term.parse().expect("term")),
                                    kind: EntryKind::Normal,
                                    payload: Bytes::from(format!("e{}", i + 1)),
                                });
                            }
                        }
                        other => panic!("unknown set-log option {other}"),
                    }
                }
                let node = self.nodes.get_mut(&id).expect("node");
                let mut storage = MemStorage::new();
                let ready = Ready { hard_state: Some(hard_state), entries, ..Default::default() };
                storage.persist(&ready);
                node.storage = storage;
                self.restart(id);
            }
            "add-node" => {
                let id = NodeId(words[1].parse().expect("id"));
                let config = Config {
                    id,
                    seed: id.0,
                    voters: Vec::new(),
                    learners: Vec::new(),
                    ..self.template.clone()
                };
                self.add(config);
            }
            "quiesce" => {
                // `quiesce <node> [dead=<ids>]`: the leader goes quiet if it may, with the listed
                // members declared down by node-level liveness.
                let dead: Vec<NodeId> = words
                    .get(2)
                    .and_then(|word| word.strip_prefix("dead="))
                    .map(ids)
                    .unwrap_or_default();
                let quiesced = self.node(words[1]).replica.quiesce(|id| !dead.contains(&id));
                writeln!(out, "{}", if quiesced { "quiesced" } else { "refused" }).unwrap();
                self.process(&mut out);
            }
            "leader-down" => {
                // `leader-down <node> <leader> [campaign=<ticks>]`: node-level liveness tells the
                // replica that its leader's node is down.
                let leader = NodeId(words[2].parse().expect("node id"));
                let campaign_in = words
                    .get(3)
                    .and_then(|word| word.strip_prefix("campaign="))
                    .map(|ticks| ticks.parse().expect("ticks"));
                let forgot = self.node(words[1]).replica.leader_down(leader, campaign_in);
                writeln!(out, "{}", if forgot { "forgot" } else { "ignored" }).unwrap();
                self.process(&mut out);
            }
            "wake" => {
                self.node(words[1]).replica.wake();
                self.process(&mut out);
            }
            "status" => self.status(&mut out),
            "log" => {
                let node = self.node(words[1]);
                let last = node.replica.last_index();
                let terms: Vec<String> = (1..=last.0)
                    .map(|i| {
                        node.replica
                            .term_at(LogIndex(i))
                            .map_or("-".to_owned(), |t| t.0.to_string())
                    })
                    .collect();
                writeln!(out, "terms: {}", terms.join(" ")).unwrap();
            }
            "applied" => {
                let node = self.node(words[1]);
                let applied: Vec<String> = node
                    .applied
                    .iter()
                    .map(|(index, text)| format!("{}:{text}", index.0))
                    .collect();
                writeln!(out, "{}", applied.join(" ")).unwrap();
            }
            other => panic!("unknown command {other}"),
        }
        if !matches!(words[0], "status" | "log" | "applied") {
            for (id, before) in roles_before {
                let Some(node) = self.nodes.get(&id) else { continue };
                let after = role_line(&node.replica);
                if after != before {
                    writeln!(out, "{id}: {before} -> {after}").unwrap();
                }
            }
        }
        out
    }
}

fn role_line(replica: &Replica) -> String {
    format!("{:?} t{}", replica.role(), replica.term().0)
}

/// The tests' state machine image: applied payloads as `index:text` lines.
fn snapshot_data(applied: &[(LogIndex, String)], through: LogIndex) -> Bytes {
    let mut data = String::new();
    for (index, text) in applied.iter().filter(|(index, _)| *index <= through) {
        writeln!(data, "{}:{text}", index.0).unwrap();
    }
    Bytes::from(data)
}

fn restore_applied(snapshot: &Snapshot) -> Vec<(LogIndex, String)> {
    std::str::from_utf8(&snapshot.data)
        .expect("utf8")
        .lines()
        .map(|line| {
            let (index, text) = line.split_once(':').expect("index:text");
            (LogIndex(index.parse().expect("index")), text.to_owned())
        })
        .collect()
}

/// Runs one file; returns its rewritten text.
fn run_file(path: &Path) -> (String, Vec<String>) {
    let text = std::fs::read_to_string(path).expect("read testdata");
    let mut cluster: Option<Cluster> = None;
    let mut rewritten = String::new();
    let mut failures = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((number, line)) = lines.next() {
        if line.trim().is_empty() || line.starts_with('#') {
            rewritten.push_str(line);
            rewritten.push('\n');
            continue;
        }
        assert_eq!(
            lines.next().map(|(_, l)| l),
            Some("----"),
            "line {}: expected ----",
            number + 1
        );
        let mut expected = String::new();
        while let Some((_, out)) = lines.peek() {
            if out.is_empty() {
                break;
            }
            expected.push_str(out);
            expected.push('\n');
            lines.next();
        }
        let actual = if line.starts_with("cluster") {
            let words: Vec<&str> = line.split_whitespace().skip(1).collect();
            cluster = Some(Cluster::new(&words));
            "ok\n".to_owned()
        } else {
            let mut actual = cluster.as_mut().expect("cluster first").run(line);
            if actual.is_empty() {
                "ok\n".clone_into(&mut actual);
            }
            actual
        };
        if actual != expected {
            failures.push(format!(
                "{}:{}: {line}\n--- expected\n{expected}--- actual\n{actual}",
                path.display(),
                number + 1
            ));
        }
        rewritten.push_str(line);
        rewritten.push_str("\n----\n");
        rewritten.push_str(&actual);
    }
    (rewritten, failures)
}

#[test]
#[expect(
    clippy::disallowed_methods,
    reason = "the test runner rewrites testdata files (REWRITE=1)"
)]
fn scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let rewrite = std::env::var_os("REWRITE").is_some();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("testdata dir")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "txt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenario files");
    let mut failures = Vec::new();
    for path in files {
        let (rewritten, file_failures) = run_file(&path);
        if rewrite {
            std::fs::write(&path, rewritten).expect("rewrite");
        } else {
            failures.extend(file_failures);
        }
    }
    assert!(failures.is_empty(), "{} scenario failures:\n{}", failures.len(), failures.join("\n"));
}

/// splitmix64, for the randomized test below.
struct TestRng(u64);

impl TestRng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

impl Cluster {
    /// Delivers the queue once in a random order, losing `drop_percent` of the messages.
    fn deliver_randomly(&mut self, rng: &mut TestRng, drop_percent: u64, out: &mut String) {
        let mut pending: Vec<Message> = self.queue.drain(..).collect();
        for i in (1..pending.len()).rev() {
            pending.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for message in pending {
            let (from, to) = (message.from.0, message.to.0);
            if let MessageBody::VoteResponse { reject: false } = message.body {
                // One vote per term, even across crashes: a granted vote, once sent, stands.
                let candidate = *self.votes.entry((from, message.term.0)).or_insert(to);
                assert_eq!(
                    candidate, to,
                    "{from} voted for {candidate} and {to} in {}",
                    message.term
                );
            }
            if rng.chance(drop_percent) || !self.connected(from, to) {
                continue;
            }
            let Some(node) = self.nodes.get_mut(&to) else { continue };
            node.replica.step(message).expect("step");
            node.replica.check_invariants().expect("invariants hold");
        }
        self.process(out);
    }

    /// Safety checks across nodes: one leader per term, and every node applied the same entry
    /// at every index (state machine safety).
    fn check_safety(
        &self,
        leaders: &mut BTreeMap<u64, u64>,
        applied: &mut BTreeMap<u64, String>,
    ) -> Result<(), String> {
        for (id, node) in &self.nodes {
            if node.replica.role() == Role::Leader {
                let term = node.replica.term().0;
                let leader = *leaders.entry(term).or_insert(*id);
                if leader != *id {
                    return Err(format!("two leaders in term {term}: {leader} and {id}"));
                }
            }
            for pair in node.applied.windows(2) {
                if pair[1].0.0 != pair[0].0.0 + 1 {
                    return Err(format!("node {id} applied {} after {}", pair[1].0.0, pair[0].0.0));
                }
            }
            for (index, text) in &node.applied {
                let first = applied.entry(index.0).or_insert_with(|| text.clone());
                if first != text {
                    return Err(format!(
                        "node {id} applied {text:?} at {}, another {first:?}",
                        index.0
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The randomized test's view of one run: what it checks across steps.
#[derive(Default)]
struct Checks {
    leaders: BTreeMap<u64, u64>,
    applied: BTreeMap<u64, String>,
    /// For each read context, the highest index applied anywhere when the read began.
    read_floor: BTreeMap<u64, LogIndex>,
    proposals: u64,
    membership_changes: u64,
}

impl Cluster {
    fn tick_all(&mut self) {
        for node in self.nodes.values_mut() {
            node.replica.tick();
        }
    }

    fn any_node(&self, rng: &mut TestRng) -> u64 {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        ids[rng.below(ids.len() as u64) as usize]
    }

    /// One random action.
    fn random_step(&mut self, rng: &mut TestRng, step: u64, checks: &mut Checks, out: &mut String) {
        let id = self.any_node(rng);
        match rng.below(100) {
            0..=54 => {
                let ids: Vec<u64> = self.nodes.keys().copied().collect();
                for &id in &ids {
                    if rng.chance(60) {
                        self.sync(id, out);
                    }
                }
                for id in ids {
                    if rng.chance(self.tick_percent.get(&id).copied().unwrap_or(100)) {
                        self.nodes.get_mut(&id).expect("node").replica.tick();
                    }
                }
                self.process(out);
                let drop_percent = if self.sides.is_empty() { 5 } else { 20 };
                self.deliver_randomly(rng, drop_percent, out);
            }
            55..=74 => {
                checks.proposals += 1;
                let payload = Bytes::from(format!("p{}", checks.proposals));
                let _ = self.nodes.get_mut(&id).expect("node").replica.propose(payload);
                self.process(out);
            }
            75..=79 => {
                for id in self.nodes.keys() {
                    self.sides.insert(*id, rng.below(2) as usize);
                }
            }
            80..=83 => self.sides.clear(),
            84..=86 => {
                // Messages already sent survive their sender; those sent to it are lost.
                self.queue.retain(|m| m.to.0 != id);
                self.restart(id);
            }
            87..=89 => {
                let node = self.nodes.get_mut(&id).expect("node");
                let index = node.replica.status().applied;
                let data = snapshot_data(&node.applied, index);
                if let Ok(meta) = node.replica.compact(index, data.clone()) {
                    node.storage.compact(Snapshot { meta, data });
                }
            }
            90 => {
                // Everyone stays a member: a random majority-sized set votes, the rest learn.
                let ids: Vec<NodeId> = self.nodes.keys().map(|id| NodeId(*id)).collect();
                let (voters, learners): (Vec<NodeId>, Vec<NodeId>) =
                    ids.iter().partition(|_| rng.chance(70));
                if voters.len() >= 2 {
                    let change = MembershipChange { voters, learners };
                    let replica = &mut self.nodes.get_mut(&id).expect("node").replica;
                    if replica.propose_membership(&change).is_ok() {
                        checks.membership_changes += 1;
                    }
                    self.process(out);
                }
            }
            91 => {
                let to = NodeId(self.any_node(rng));
                let _ = self.nodes.get_mut(&id).expect("node").replica.transfer_leadership(to);
                self.process(out);
            }
            _ => {
                // A read must see every write acknowledged before it began: anything applied
                // anywhere was committed and may have been acknowledged.
                let floor = self.nodes.values().map(|n| n.replica.status().applied).max();
                for (id, node) in &mut self.nodes {
                    let context = step * 10 + id;
                    checks.read_floor.insert(context, floor.expect("nodes"));
                    let _ = node.replica.read_index(context);
                }
                self.process(out);
            }
        }
    }

    /// Heals, then gives a leader a bounded time to commit a new entry on every node.
    fn recovers(&mut self, out: &mut String) -> bool {
        self.sides.clear();
        self.async_disk = false;
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.sync(id, out);
        }
        for _ in 0..200 {
            self.tick_all();
            self.settle(out);
            let leader = self.nodes.values_mut().find(|n| n.replica.role() == Role::Leader);
            let Some(Ok(index)) =
                leader.map(|leader| leader.replica.propose(Bytes::from_static(b"final")))
            else {
                continue;
            };
            for _ in 0..20 {
                self.tick_all();
                self.settle(out);
            }
            let applied_everywhere = self
                .nodes
                .values()
                .all(|n| n.applied.iter().any(|(i, text)| *i == index && text == "final"));
            if applied_everywhere {
                return true;
            }
        }
        false
    }
}

/// Random partitions, message loss and reordering, restarts, compactions, transfers and reads
/// against clusters of 3 and 5: after every step, one leader per term, the same entry applied
/// at each index everywhere, no stale read; after heal, a new entry commits everywhere.
#[test]
fn randomized_clusters_stay_safe_and_recover() {
    // RAFT_SEEDS=n runs more seeds (a soak); CI runs 200.
    let seeds: u64 = std::env::var_os("RAFT_SEEDS")
        .map_or(200, |n| n.to_str().and_then(|n| n.parse().ok()).expect("RAFT_SEEDS=<number>"));
    let mut total_membership_changes = 0;
    let mut quiet_seeds = Vec::new();
    for seed in 0..seeds {
        let mut rng = TestRng(seed);
        let voters = if seed % 2 == 0 { "voters=1,2,3" } else { "voters=1,2,3,4,5" };
        let pre_vote = if rng.chance(70) { "prevote=true" } else { "prevote=false" };
        let check_quorum = rng.chance(70);
        let lease = if check_quorum && rng.chance(50) { "lease=true" } else { "lease=false" };
        let check_quorum = if check_quorum { "checkquorum=true" } else { "checkquorum=false" };
        let cache = if rng.chance(50) { "cache=0" } else { "cache=100000" };
        let args = [voters, pre_vote, check_quorum, lease, cache, "batch=100", "inflight=3"];
        let mut cluster = Cluster::new(&args);
        cluster.async_disk = rng.chance(50);
        // Clock skew within the lease margin (drift 2 of 10 ticks allows rates 100:80).
        for id in cluster.nodes.keys().copied().collect::<Vec<_>>() {
            cluster.tick_percent.insert(id, 85 + rng.below(16));
        }
        let mut out = String::new();
        let mut checks = Checks::default();
        for step in 0..600 {
            cluster.random_step(&mut rng, step, &mut checks, &mut out);
            for (context, index) in cluster.reads.drain(..) {
                let floor = checks.read_floor[&context];
                assert!(index >= floor, "seed {seed}: stale read {context}: {index} < {floor}");
            }
            if let Err(violation) = cluster.check_safety(&mut checks.leaders, &mut checks.applied) {
                panic!("seed {seed} step {step}: {violation}");
            }
        }
        assert!(cluster.recovers(&mut out), "seed {seed}: no progress after heal");
        if let Err(violation) = cluster.check_safety(&mut checks.leaders, &mut checks.applied) {
            panic!("seed {seed} after heal: {violation}");
        }
        if seed % 2 == 0 && checks.leaders.len() <= 1 {
            quiet_seeds.push(seed);
        }
        total_membership_changes += checks.membership_changes;
    }
    // Coverage, not safety: nearly every 3-node run must see a leader change. A rare seed whose
    // faults never hit the leader (seed 1560 of a 2,000-seed soak) is not a failure.
    assert!(
        quiet_seeds.len() * 100 <= seeds.div_ceil(2) as usize,
        "3-node seeds without a leader change: {quiet_seeds:?}"
    );
    assert!(total_membership_changes > 50, "only {total_membership_changes} membership changes");
}

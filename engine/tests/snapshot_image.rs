//! A state machine's snapshot is taken on the shard thread as a cheap view and written to its
//! file off it: while an image is being written (here: held up for as long as the test likes)
//! the shard goes on serving every group, and the log is compacted only once the file is
//! durable — never before, or a crash would leave neither the entries nor the snapshot.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla::kv::{
    Command, KvConfig, KvSnapshot, KvStateMachine, Proposal, Query, QueryResult, Request,
    SnapshotImage, StateMachine,
};
use flotilla::raftgroup::{Entry, LogIndex};
use flotilla::{Consistency, Engine, EngineConfig, GroupId, MachineFactory, NodeId};

/// Holds image writes until opened; records the index of every image it was asked to write.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    open: bool,
    started: Vec<LogIndex>,
}

impl Gate {
    fn open(&self) {
        self.state.lock().unwrap().open = true;
        self.changed.notify_all();
    }

    fn started(&self) -> Vec<LogIndex> {
        self.state.lock().unwrap().started.clone()
    }
}

/// The KV store, with image writes that wait for the gate.
struct GatedKv {
    inner: KvStateMachine,
    gate: Arc<Gate>,
}

struct GatedImage {
    inner: KvSnapshot,
    gate: Arc<Gate>,
}

impl SnapshotImage for GatedImage {
    fn write_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut state = self.gate.state.lock().unwrap();
        state.started.push(self.inner.applied_index());
        self.gate.changed.notify_all();
        // Bounded, so a broken engine fails the test instead of hanging it.
        let (state, _) = self
            .gate
            .changed
            .wait_timeout_while(state, Duration::from_secs(60), |state| !state.open)
            .unwrap();
        drop(state);
        self.inner.write_to(out)
    }
}

impl StateMachine for GatedKv {
    type Response = <KvStateMachine as StateMachine>::Response;
    type Query = Query;
    type QueryResult = QueryResult;
    type RestoreError = <KvStateMachine as StateMachine>::RestoreError;
    type Snapshot = GatedImage;

    fn apply(&mut self, entries: &[Entry], responses: &mut Vec<Self::Response>) {
        self.inner.apply(entries, responses);
    }

    fn query(&self, query: &Query) -> QueryResult {
        self.inner.query(query)
    }

    fn applied_index(&self) -> LogIndex {
        self.inner.applied_index()
    }

    fn snapshot(&self) -> GatedImage {
        GatedImage { inner: self.inner.snapshot(), gate: Arc::clone(&self.gate) }
    }

    fn restore(&mut self, snapshot: &Bytes) -> Result<(), Self::RestoreError> {
        self.inner.restore(snapshot)
    }
}

fn open(dir: &std::path::Path, gate: &Arc<Gate>) -> Engine<GatedKv> {
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut config = EngineConfig::new(NodeId(1), listen, dir);
    config.shards = 1;
    config.tick = Duration::from_millis(2);
    config.snapshot_entries = 50;
    let gate = Arc::clone(gate);
    let factory: MachineFactory<GatedKv> = Arc::new(move |_| GatedKv {
        inner: KvStateMachine::new(KvConfig::default()),
        gate: Arc::clone(&gate),
    });
    Engine::open(config, &factory).unwrap()
}

async fn put(engine: &Engine<GatedKv>, group: GroupId, key: String) {
    let command = Command::Put { key: key.clone().into(), value: key.into() };
    let proposal = Proposal { leader_time_ms: 0, request: Request::Unsessioned(command) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match engine.propose(group, proposal.to_bytes()).await {
            Ok(applied) => {
                applied.response.expect("a put applies");
                return;
            }
            // A single-voter group elects itself within its first election timeout.
            Err(error) if Instant::now() < deadline => {
                eprintln!("retrying a put: {error}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(error) => panic!("put failed: {error}"),
        }
    }
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_shard_serves_while_an_image_is_written_and_compacts_only_once_it_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let engine = open(dir.path(), &gate);
    let (one, two) = (GroupId(1), GroupId(2));
    for group in [one, two] {
        engine.create_group(group, &[NodeId(1)]).await.unwrap();
    }
    for n in 0..60 {
        put(&engine, one, format!("a{n:03}")).await;
    }
    wait_for("an image write to start", async || !gate.started().is_empty()).await;
    let taken = gate.started()[0];
    assert!(taken >= LogIndex(50), "taken at {taken:?}");

    // The image is stuck in its writer: the shard goes on with both groups.
    for n in 0..200 {
        put(&engine, one, format!("b{n:03}")).await;
        put(&engine, two, format!("c{n:03}")).await;
    }
    let read = engine
        .read(one, Query::Get { key: Bytes::from("b199") }, Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(read, QueryResult::Value(Some(Bytes::from("b199"))));
    // Nothing is compacted before the file is durable.
    for group in [one, two] {
        assert_eq!(engine.status(group).await.unwrap().snapshot_index, LogIndex::ZERO);
    }

    gate.open();
    wait_for("group 1 to compact", async || {
        engine.status(one).await.unwrap().snapshot_index > LogIndex::ZERO
    })
    .await;
    // The first compaction is at the index the image was taken at, not where the group is now.
    let started = gate.started();
    assert_eq!(started[0], taken);
    let compacted = engine.status(one).await.unwrap().snapshot_index;
    assert!(started.contains(&compacted), "compacted to {compacted:?}, images {started:?}");
    wait_for("group 2 to compact", async || {
        engine.status(two).await.unwrap().snapshot_index > LogIndex::ZERO
    })
    .await;
    engine.shutdown().unwrap();

    // What restarts is the snapshot plus the log after it: every write is there.
    let engine = open(dir.path(), &gate);
    for (group, prefix, count) in [(one, "a", 60), (one, "b", 200), (two, "c", 200)] {
        for n in [0, count / 2, count - 1] {
            let key = Bytes::from(format!("{prefix}{n:03}"));
            wait_for("the restarted group to answer", async || {
                let query = Query::Get { key: key.clone() };
                let answer = engine.read(group, query, Consistency::Linearizable).await;
                matches!(answer, Ok(QueryResult::Value(Some(value))) if value == key)
            })
            .await;
        }
    }
    engine.shutdown().unwrap();
}

//! S11 against a running engine: strangers and bad bytes on its peer port — garbage, a foreign
//! cluster, an unknown node, a member sending a batch that does not decode — are closed or
//! refused, and the groups it hosts neither change state nor stop serving.

mod common;

use std::time::Duration;

use common::free_addr;
use flotilla::kv::{Command, Request};
use flotilla::raftgroup::NodeId;
use flotilla::transport::ClusterId;
use flotilla::transport::connection::{Connection, ConnectionConfig, ConnectionError};
use flotilla::transport::handshake::Identity;
use flotilla::{Engine, EngineConfig, GroupId, GroupStatus, LogIndex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GROUP: GroupId = GroupId(3);

async fn put(engine: &Engine, value: &str) {
    for _ in 0..3000 {
        let command = Command::Put { key: "k".into(), value: value.to_owned().into() };
        if engine.propose_kv(GROUP, Request::Unsessioned(command)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the group never accepted a write");
}

/// Reads until the engine closes the connection; panics if it keeps it open for 10 s.
async fn closed_by_engine(mut stream: TcpStream) {
    let mut buffer = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    read.await.expect("the engine closes a bad connection");
}

fn stable(status: &GroupStatus) -> (flotilla::raftgroup::Term, Option<NodeId>) {
    (status.term, status.leader)
}

#[tokio::test(flavor = "current_thread")]
async fn bad_peers_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::new(NodeId(1), free_addr(), dir.path());
    config.shards = 2;
    // Node 2 is a member (so its handshake is accepted) that never runs.
    config.peers = [(NodeId(2), free_addr())].into();
    let addr = config.listen;
    let engine = Engine::open_kv(config).unwrap();
    // A single-voter group: it elects itself and commits alone.
    engine.create_group(GROUP, &[NodeId(1)]).await.unwrap();
    put(&engine, "before").await;
    let before = engine.status(GROUP).await.unwrap();

    // Garbage instead of a handshake.
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage.write_all(&[0xAB; 4096]).await.unwrap();
    closed_by_engine(garbage).await;

    // A foreign cluster and an unknown node are refused by the handshake.
    let foreign = ConnectionConfig::new(Identity { cluster: ClusterId(99), node: NodeId(2) });
    let refused = Connection::connect(addr, NodeId(1), foreign).await;
    assert!(matches!(refused, Err(ConnectionError::Handshake(_))), "{refused:?}");
    let stranger = ConnectionConfig::new(Identity { cluster: ClusterId(1), node: NodeId(42) });
    let refused = Connection::connect(addr, NodeId(1), stranger).await;
    assert!(matches!(refused, Err(ConnectionError::Handshake(_))), "{refused:?}");

    // A member whose frame is well-formed but whose batch is not: the connection is dropped.
    let member = ConnectionConfig::new(Identity { cluster: ClusterId(1), node: NodeId(2) });
    let mut connection = Connection::connect(addr, NodeId(1), member).await.unwrap();
    connection.send(&[0xFF; 64]).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.recv()).await;
    assert!(matches!(closed, Ok(Err(_))), "the engine drops a member sending a bad batch");

    // Nothing changed, and the group still serves.
    let after = engine.status(GROUP).await.unwrap();
    assert_eq!(stable(&after), stable(&before));
    assert_eq!(after.commit, before.commit);
    put(&engine, "after").await;
    engine.shutdown().unwrap();
}

/// Snapshot streams from a member that break the protocol are closed; a file that does not
/// verify is refused and not kept; the group's state does not change. A proposal over the
/// limit is refused before it reaches the group.
#[tokio::test(flavor = "current_thread")]
async fn bad_snapshot_streams_and_oversized_proposals_are_refused_and_change_nothing() {
    use bytes::Bytes;
    use flotilla::raftgroup::{Membership, Message, MessageBody, Snapshot, SnapshotMeta, Term};
    use flotilla::transport::snapshot::{RefuseReason, StreamId, StreamMessage};

    let dir = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::new(NodeId(1), free_addr(), dir.path());
    config.shards = 2;
    config.peers = [(NodeId(2), free_addr())].into();
    config.proposal_bytes_max = 1000;
    config.snapshot_bytes_max = 1 << 20;
    let addr = config.listen;
    let engine = Engine::open_kv(config).unwrap();
    engine.create_group(GROUP, &[NodeId(1)]).await.unwrap();
    put(&engine, "before").await;
    let before = engine.status(GROUP).await.unwrap();

    let oversized = engine.propose(GROUP, Bytes::from(vec![0u8; 1001])).await;
    assert!(matches!(oversized, Err(flotilla::Error::TooLarge { bytes: 1001, max: 1000 })));
    // A timeout no clock can reach is a typed refusal, not a panic.
    let endless = engine.propose_with_timeout(GROUP, Bytes::from_static(b"x"), Duration::MAX).await;
    assert!(matches!(endless, Err(flotilla::Error::InvalidArgument(_))), "{endless:?}");

    let member = || ConnectionConfig::new(Identity { cluster: ClusterId(1), node: NodeId(2) });
    let id = StreamId { group: GROUP, index: LogIndex(1000), term: Term(9) };
    let raft = |from: u64| {
        let meta = SnapshotMeta {
            index: id.index,
            term: id.term,
            membership: Membership::new(vec![NodeId(1)], Vec::new()),
        };
        let message = Message {
            from: NodeId(from),
            to: NodeId(1),
            term: id.term,
            body: MessageBody::Snapshot { snapshot: Snapshot { meta, data: Bytes::new() } },
        };
        let mut out = Vec::new();
        flotilla::raftgroup::codec::encode(&message, &mut out);
        Bytes::from(out)
    };
    let encoded = |message: StreamMessage| {
        let mut body = Vec::new();
        message.encode(&mut body);
        body
    };
    let offer = |raft: Bytes| StreamMessage::Offer { id, file_len: 4096, file_crc: 7, raft };

    // Garbage in a snapshot frame.
    let mut connection = Connection::connect(addr, NodeId(1), member()).await.unwrap();
    connection.send_snapshot(&[0xEE; 40]).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.recv()).await;
    assert!(matches!(closed, Ok(Err(_))), "garbage closes the stream");

    // An offer whose Raft message claims another sender.
    let mut connection = Connection::connect(addr, NodeId(1), member()).await.unwrap();
    connection.send_snapshot(&encoded(offer(raft(3)))).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.recv()).await;
    assert!(matches!(closed, Ok(Err(_))), "a forged offer closes the stream");

    // A chunk that does not follow the stream.
    let mut connection = Connection::connect(addr, NodeId(1), member()).await.unwrap();
    connection.send_snapshot(&encoded(offer(raft(2)))).await.unwrap();
    let frame = connection.recv().await.unwrap();
    assert_eq!(StreamMessage::decode(&frame.body), Ok(StreamMessage::Resume { id, offset: 0 }));
    let chunk = StreamMessage::Chunk { id, offset: 100, data: Bytes::from(vec![1u8; 100]) };
    connection.send_snapshot(&encoded(chunk)).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.recv()).await;
    assert!(matches!(closed, Ok(Err(_))), "an out-of-order chunk closes the stream");

    // An offer beyond snapshot_bytes_max: refused before anything is spooled; the connection
    // stays usable.
    let mut connection = Connection::connect(addr, NodeId(1), member()).await.unwrap();
    let huge = StreamMessage::Offer { id, file_len: (1 << 20) + 1, file_crc: 7, raft: raft(2) };
    connection.send_snapshot(&encoded(huge)).await.unwrap();
    let frame = connection.recv().await.unwrap();
    assert_eq!(
        StreamMessage::decode(&frame.body),
        Ok(StreamMessage::Refused { id, reason: RefuseReason::TooLarge })
    );
    assert_eq!(engine.snapshot_transfers().failed, 1);

    // A whole file that is not a snapshot: refused, and its spool removed.
    let mut connection = Connection::connect(addr, NodeId(1), member()).await.unwrap();
    connection.send_snapshot(&encoded(offer(raft(2)))).await.unwrap();
    let frame = connection.recv().await.unwrap();
    // The half-received file above is resumed (same offer), not restarted.
    assert_eq!(StreamMessage::decode(&frame.body), Ok(StreamMessage::Resume { id, offset: 0 }));
    for offset in (0..4096).step_by(1024) {
        let chunk = StreamMessage::Chunk { id, offset, data: Bytes::from(vec![0xAB; 1024]) };
        connection.send_snapshot(&encoded(chunk)).await.unwrap();
    }
    let frame = connection.recv().await.unwrap();
    assert_eq!(
        StreamMessage::decode(&frame.body),
        Ok(StreamMessage::Refused { id, reason: RefuseReason::Corrupt })
    );
    let shard = flotilla::shard_of(GROUP, 2);
    let spool = dir.path().join(format!("shard-{shard}/snapshots/{:016x}.recv", GROUP.0));
    assert!(!spool.exists(), "a file that does not verify is not kept");
    assert_eq!(engine.snapshot_transfers().received, 0);
    assert_eq!(engine.snapshot_transfers().failed, 2);

    let after = engine.status(GROUP).await.unwrap();
    assert_eq!(stable(&after), stable(&before));
    assert_eq!(after.commit, before.commit);
    assert_eq!(after.snapshot_index, before.snapshot_index);
    put(&engine, "after").await;
    engine.shutdown().unwrap();
}

/// A request timeout no deadline can hold is refused when the engine opens, not a panic on the
/// first call.
#[test]
fn an_endless_request_timeout_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::new(NodeId(1), free_addr(), dir.path());
    config.request_timeout = Duration::MAX;
    let opened = Engine::open_kv(config);
    assert!(matches!(opened, Err(flotilla::Error::Config(_))), "{:?}", opened.err());
}

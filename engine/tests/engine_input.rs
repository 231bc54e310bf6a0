//! S11 against a running engine: strangers and bad bytes on its peer port — garbage, a foreign
//! cluster, an unknown node, a member sending a batch that does not decode — are closed or
//! refused, and the groups it hosts neither change state nor stop serving.

use std::time::Duration;

use flotilla::kv::{Command, Request};
use flotilla::raftgroup::NodeId;
use flotilla::transport::ClusterId;
use flotilla::transport::connection::{Connection, ConnectionConfig, ConnectionError};
use flotilla::transport::handshake::Identity;
use flotilla::{Engine, EngineConfig, GroupId, GroupStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GROUP: GroupId = GroupId(3);

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

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

//! The transport over real sockets, on 127.0.0.1 only: handshakes that succeed, are refused or time
//! out, frames both ways, and a garbage-sending client that gets closed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use flotilla::raftgroup::{Message, MessageBody, NodeId, Term};
use flotilla::transport::ClusterId;
use flotilla::transport::batch;
use flotilla::transport::connection::{Connection, ConnectionConfig, ConnectionError};
use flotilla::transport::frame::FrameError;
use flotilla::transport::handshake::{Handshake, HandshakeError, Identity, RejectReason, Verdict};
use flotilla::wal::GroupId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const CLUSTER: ClusterId = ClusterId(0xF107);

fn config(cluster: ClusterId, node: u64) -> ConnectionConfig {
    ConnectionConfig::new(Identity { cluster, node: NodeId(node) })
}

fn members() -> BTreeSet<NodeId> {
    [1, 2, 3].into_iter().map(NodeId).collect()
}

/// Listens on an ephemeral loopback port and accepts one connection as node 2 of `CLUSTER`.
async fn serve_one(
    server_config: ConnectionConfig,
) -> (SocketAddr, JoinHandle<Result<Connection, ConnectionError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        Connection::accept(stream, members(), server_config).await
    });
    (addr, server)
}

fn message(term: u64) -> Message {
    Message { from: NodeId(1), to: NodeId(2), term: Term(term), body: MessageBody::TimeoutNow }
}

#[tokio::test]
async fn members_connect_and_exchange_batches_both_ways() {
    let (addr, server) = serve_one(config(CLUSTER, 2)).await;
    let mut client = Connection::connect(addr, NodeId(2), config(CLUSTER, 1)).await.unwrap();
    let mut server = server.await.unwrap().unwrap();
    assert_eq!((client.peer(), server.peer()), (NodeId(2), NodeId(1)));

    let sent = [message(1), message(2)];
    client.send_batch([(GroupId(7), &sent[0]), (GroupId(8), &sent[1])]).await.unwrap();
    client.send(b"\0\0\0\0").await.unwrap(); // an empty batch
    let frame = server.recv().await.unwrap();
    assert_eq!(frame.header.source, NodeId(1));
    let mut received = Vec::new();
    batch::decode(&frame.body, &mut received).unwrap();
    assert_eq!(received, vec![(GroupId(7), sent[0].clone()), (GroupId(8), sent[1].clone())]);
    batch::decode(&server.recv().await.unwrap().body, &mut received).unwrap();
    assert!(received.is_empty());

    server.send_batch([(GroupId(9), &message(3))]).await.unwrap();
    batch::decode(&client.recv().await.unwrap().body, &mut received).unwrap();
    assert_eq!(received, vec![(GroupId(9), message(3))]);

    client.shutdown().await.unwrap();
    assert!(matches!(server.recv().await, Err(ConnectionError::Closed)));
}

#[tokio::test]
async fn a_wrong_cluster_id_is_rejected_on_both_sides() {
    let (addr, server) = serve_one(config(CLUSTER, 2)).await;
    let client = Connection::connect(addr, NodeId(2), config(ClusterId(99), 1)).await;
    assert!(
        matches!(
            client,
            Err(ConnectionError::Handshake(HandshakeError::Rejected(
                RejectReason::ForeignCluster { cluster: CLUSTER }
            )))
        ),
        "{client:?}"
    );
    let server = server.await.unwrap();
    assert!(
        matches!(
            server,
            Err(ConnectionError::Handshake(HandshakeError::ForeignCluster {
                found: ClusterId(99),
                ..
            }))
        ),
        "{server:?}"
    );
}

#[tokio::test]
async fn an_unknown_node_is_rejected() {
    let (addr, server) = serve_one(config(CLUSTER, 2)).await;
    let client = Connection::connect(addr, NodeId(2), config(CLUSTER, 42)).await;
    assert!(matches!(
        client,
        Err(ConnectionError::Handshake(HandshakeError::Rejected(RejectReason::UnknownNode {
            node: NodeId(42)
        })))
    ));
    assert!(matches!(
        server.await.unwrap(),
        Err(ConnectionError::Handshake(HandshakeError::UnknownNode { node: NodeId(42) }))
    ));
}

#[tokio::test]
async fn a_garbage_sending_client_is_closed() {
    let (addr, server) = serve_one(config(CLUSTER, 2)).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"GET / HTTP/1.1\r\nHost: flotilla\r\n\r\n").await.unwrap();
    let server = server.await.unwrap();
    assert!(
        matches!(
            server,
            Err(ConnectionError::Handshake(HandshakeError::Frame(FrameError::BadMagic { .. })))
        ),
        "{server:?}"
    );
    // The server said nothing and closed: the client reads end-of-stream (or a reset, since it
    // left unread bytes behind).
    let mut answer = Vec::new();
    match client.read_to_end(&mut answer).await {
        Ok(_) => assert!(answer.is_empty(), "garbage gets no answer"),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
    }
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let server_config =
        ConnectionConfig { handshake_timeout: Duration::from_millis(200), ..config(CLUSTER, 2) };
    let (addr, server) = serve_one(server_config).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"FLT").await.unwrap(); // the start of a magic, then nothing
    let server = server.await.unwrap();
    assert!(
        matches!(server, Err(ConnectionError::HandshakeTimeout { timeout_ms: 200 })),
        "{server:?}"
    );
    let mut answer = Vec::new();
    let read = client.read_to_end(&mut answer).await;
    assert!(read.is_ok_and(|len| len == 0) || answer.is_empty());
}

#[tokio::test]
async fn a_peer_that_leaves_mid_frame_is_a_truncated_frame() {
    let (addr, server) = serve_one(config(CLUSTER, 2)).await;
    // A client doing the handshake by hand with the pure state machine, to misbehave after it.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut hello = Vec::new();
    let local = Identity { cluster: CLUSTER, node: NodeId(1) };
    let mut handshake = Handshake::initiate(local, NodeId(2), &mut hello);
    stream.write_all(&hello).await.unwrap();
    let mut input = BytesMut::new();
    let verdict = loop {
        assert_ne!(stream.read_buf(&mut input).await.unwrap(), 0, "closed during the handshake");
        if let Some(verdict) = handshake.on_bytes(&mut input, &mut Vec::new()) {
            break verdict;
        }
    };
    assert_eq!(verdict, Verdict::Accepted { peer: NodeId(2) });
    let session = handshake.into_session().unwrap();
    let mut server = server.await.unwrap().unwrap();
    // Half a frame, then the client leaves.
    let mut wire = Vec::new();
    session.encode(&[0; 100], &mut wire).unwrap();
    stream.write_all(&wire[..60]).await.unwrap();
    stream.shutdown().await.unwrap();
    let received = server.recv().await;
    assert!(
        matches!(received, Err(ConnectionError::Frame(FrameError::Truncated { buffered: 60 }))),
        "{received:?}"
    );
}

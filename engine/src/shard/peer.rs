//! A shard's sending side to one peer node: the shard's own task writes a flush's frames
//! straight to the socket while it has room, and a writer task per peer does everything that
//! must wait — connecting (with backoff), a socket that is full, an injected delay.
//!
//! Handing every frame to a writer task cost a wake-up, a task switch and a copy per frame, and
//! the frames of a flush left only once the shard's task yielded, one peer after another. One
//! rule keeps the frames in order across the two paths: the connection is *parked* in the link
//! only while nothing is queued, and the shard writes directly only to a parked connection.
//! Whoever queues something takes the parked connection along with it (the shard, when the
//! socket is full or a fault delays the frame), and the writer task parks it again only once it
//! has written everything queued — so nothing is ever written ahead of what waits in the queue.
//!
//! The test fault hook ([`Faults`]) is consulted when a flush is handed to the link: frames
//! queued before a partition is set still go out after it, as bytes already in a socket would.

use std::borrow::Borrow;
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_raftgroup::{Message, NodeId};
use flotilla_wal::GroupId;
use tokio::sync::mpsc;

use crate::transport::batch::BatchWriter;
use crate::transport::connection::{Connection, ConnectionConfig, Outbound, TrySend};
use crate::transport::faults::{Faults, Verdict};
use crate::transport::handshake::Identity;

/// Items queued per peer writer; more are dropped (Raft resends what matters).
const QUEUE_ITEMS: usize = 1024;
/// A frame body is cut at this size; the transport's limit is far above it.
pub(crate) const FRAME_BODY_TARGET: usize = 1 << 20;
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Queued items a peer writer sends in one write.
const WRITE_ITEMS_MAX: usize = 64;

/// What one [`PeerLink::send`] handed on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sent {
    /// Frames (written, queued, or dropped by an injected fault: the same to the counters).
    pub frames: u64,
    /// Messages in them.
    pub messages: u64,
}

/// A queued item: bytes, the injected delay to wait before writing them, and — on the first
/// item queued while the connection was parked — the connection itself, handed to the writer
/// task so that nothing can be written ahead of what is queued.
struct Queued {
    outbound: Outbound,
    delay: Duration,
    connection: Option<Connection>,
}

impl Queued {
    fn new(outbound: Outbound, delay: Duration, connection: Option<Connection>) -> Self {
        Self { outbound, delay, connection }
    }
}

/// The shard's handle to one peer node. See the module documentation.
pub(crate) struct PeerLink {
    local: NodeId,
    peer: NodeId,
    queue: mpsc::Sender<Queued>,
    /// The connection while the writer task is idle.
    parked: Rc<Cell<Option<Connection>>>,
    faults: Option<Arc<Faults>>,
}

impl PeerLink {
    /// Starts the writer task for `peer` at `addr` on the current thread's `LocalSet`. It
    /// connects when there is something to send.
    pub(crate) fn spawn(
        identity: Identity,
        peer: NodeId,
        addr: SocketAddr,
        faults: Option<Arc<Faults>>,
    ) -> Self {
        let (queue, items) = mpsc::channel(QUEUE_ITEMS);
        let parked = Rc::new(Cell::new(None));
        tokio::task::spawn_local(write_connection(identity, peer, addr, items, Rc::clone(&parked)));
        Self { local: identity.node, peer, queue, parked, faults }
    }

    /// Sends `items` to the peer as frames of at most about [`FRAME_BODY_TARGET`] bytes each;
    /// no items sends one empty frame (the node-level heartbeat). Never waits: what cannot be
    /// written now is queued for the writer task, and what does not fit in its queue is dropped
    /// (a full queue means the peer is slow or gone: Raft resends what matters).
    pub(crate) fn send<M: Borrow<Message>>(
        &self,
        items: impl IntoIterator<Item = (GroupId, M)>,
    ) -> Sent {
        let mut items = items.into_iter().peekable();
        let mut sent = Sent::default();
        let delay = match self
            .faults
            .as_ref()
            .map_or(Verdict::Deliver, |f| f.verdict(self.local, self.peer))
        {
            Verdict::Deliver => Duration::ZERO,
            Verdict::Drop => {
                // Counted as sent, as frames lost on the wire would be.
                return Sent { frames: 1, messages: items.count() as u64 };
            }
            Verdict::Delay(delay) => delay,
        };
        // Whoever queues something takes the parked connection along (see `Queued`), so a
        // parked connection always means an empty queue.
        let mut parked = self.parked.take();
        debug_assert!(parked.is_none() || self.queue.capacity() == self.queue.max_capacity());
        if delay.is_zero()
            && let Some(mut connection) = parked.take()
        {
            loop {
                match connection.try_send_batch(&mut items, FRAME_BODY_TARGET) {
                    Ok((count, TrySend::Sent)) => {
                        sent.add(count);
                        if items.peek().is_none() {
                            self.parked.set(Some(connection));
                            return sent;
                        }
                    }
                    Ok((count, TrySend::Partial(rest))) => {
                        sent.add(count);
                        // The queue is empty: this cannot be refused.
                        let rest = Outbound::Rest(rest);
                        let _ = self.queue.try_send(Queued::new(rest, delay, Some(connection)));
                        break;
                    }
                    Err(error) => {
                        // The frame is lost, as when the writer task's connection fails; the
                        // writer connects again for the rest.
                        tracing::debug!(peer = %self.peer, %error, "peer connection lost");
                        break;
                    }
                }
            }
            if items.peek().is_none() {
                return sent;
            }
        }
        loop {
            let mut body = Vec::with_capacity(4096);
            let mut writer = BatchWriter::new(&mut body);
            writer.fill(&mut items, FRAME_BODY_TARGET);
            sent.add(writer.count());
            // A full queue drops the frame (never one carrying the connection: it is queued
            // only into an empty queue).
            let _ = self.queue.try_send(Queued::new(Outbound::Body(body), delay, parked.take()));
            if items.peek().is_none() {
                return sent;
            }
        }
    }
}

impl Sent {
    fn add(&mut self, messages: u32) {
        self.frames += 1;
        self.messages += u64::from(messages);
    }
}

/// The writer task of one peer: sends what the shard queued, connecting when there is
/// something to send (with backoff after a failure: a dead peer costs only its failed
/// connects). What arrives while the peer is unreachable is dropped; Raft resends.
async fn write_connection(
    identity: Identity,
    peer: NodeId,
    addr: SocketAddr,
    mut items: mpsc::Receiver<Queued>,
    parked: Rc<Cell<Option<Connection>>>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut next_attempt = Instant::now();
    let mut batch: Vec<Outbound> = Vec::new();
    // The connection, while this task holds it; parked in the link whenever the queue is empty.
    let mut connection: Option<Connection> = None;
    while let Some(first) = items.recv().await {
        let mut delay = first.delay;
        let mut handed = first.connection;
        batch.clear();
        batch.push(first.outbound);
        while batch.len() < WRITE_ITEMS_MAX {
            match items.try_recv() {
                Ok(item) => {
                    delay = delay.max(item.delay);
                    handed = handed.or(item.connection);
                    batch.push(item.outbound);
                }
                Err(_) => break,
            }
        }
        debug_assert!(connection.is_none() || handed.is_none(), "one connection at a time");
        connection = connection.or(handed);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if connection.is_none() {
            if Instant::now() < next_attempt {
                continue;
            }
            let config = ConnectionConfig::new(identity);
            match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(addr, peer, config))
                .await
            {
                Ok(Ok(established)) => {
                    connection = Some(established);
                    backoff = BACKOFF_MIN;
                }
                _ => {
                    next_attempt = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let live = connection.as_mut().expect("connected above");
        if let Err(error) = live.send_all(&batch).await {
            tracing::debug!(%peer, %error, "peer connection lost");
            connection = None;
            next_attempt = Instant::now();
        } else if items.is_empty() {
            // Nothing queued behind what was just written: the shard may write directly.
            parked.set(connection.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use bytes::Bytes;
    use flotilla_raftgroup::{Entry, EntryKind, LogIndex, MessageBody, Term};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    use super::*;
    use crate::transport::ClusterId;
    use crate::transport::batch;

    const CLUSTER: ClusterId = ClusterId(0xBEEF);

    fn identity(node: u64) -> Identity {
        Identity { cluster: CLUSTER, node: NodeId(node) }
    }

    /// A message carrying `size` payload bytes whose entry index is `sequence`.
    fn numbered(sequence: u64, size: usize) -> (GroupId, Message) {
        let entry = Entry {
            index: LogIndex(sequence),
            term: Term(1),
            kind: EntryKind::Normal,
            payload: Bytes::from(vec![sequence as u8; size]),
        };
        let body = MessageBody::Append {
            prev_index: LogIndex(sequence - 1),
            prev_term: Term(1),
            entries: vec![entry],
            commit: LogIndex(0),
        };
        (GroupId(sequence % 7), Message { from: NodeId(1), to: NodeId(2), term: Term(1), body })
    }

    /// Node 2's side, on a thread of its own: accepts one connection, waits for `go`, then
    /// reads frames until it has the message numbered as `last` says; returns their entry
    /// indexes in order. A frame out of place breaks the stream, and this thread panics.
    fn receiver(
        listener: std::net::TcpListener,
        go: oneshot::Receiver<()>,
        last: std::sync::mpsc::Receiver<u64>,
    ) -> std::thread::JoinHandle<Vec<u64>> {
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            // A frame lost or out of place would leave this waiting: fail instead of hanging.
            let receive = async move {
                let listener = TcpListener::from_std(listener).expect("listener");
                let (stream, _) = listener.accept().await.expect("accept");
                let members: BTreeSet<NodeId> = [NodeId(1)].into();
                let config = ConnectionConfig::new(identity(2));
                let mut connection = Connection::accept(stream, members, config).await.expect("in");
                go.await.expect("go");
                let mut seen = Vec::new();
                let mut items = Vec::new();
                let mut last_expected = None;
                while last_expected.is_none_or(|last| seen.last() != Some(&last)) {
                    let frame = connection.recv().await.expect("frame");
                    batch::decode(&frame.body, &mut items).expect("batch");
                    for (group, message) in items.drain(..) {
                        let MessageBody::Append { entries, .. } = message.body else {
                            panic!("not an append")
                        };
                        let index = entries[0].index.0;
                        assert_eq!(group, GroupId(index % 7));
                        assert!(entries[0].payload.iter().all(|b| *b == index as u8));
                        seen.push(index);
                    }
                    if last_expected.is_none() {
                        last_expected = last.try_recv().ok();
                    }
                }
                seen
            };
            let runtime = runtime.expect("runtime");
            runtime.block_on(async move {
                tokio::time::timeout(Duration::from_secs(60), receive).await.expect("frames lost")
            })
        })
    }

    /// Node 2 on a free loopback port with its receiving thread started (see `receiver`).
    struct Node2 {
        addr: std::net::SocketAddr,
        go: oneshot::Sender<()>,
        last: std::sync::mpsc::Sender<u64>,
        received: std::thread::JoinHandle<Vec<u64>>,
    }

    fn node2() -> Node2 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let (go, wait) = oneshot::channel();
        let (last, last_rx) = std::sync::mpsc::channel();
        let received = receiver(listener, wait, last_rx);
        Node2 { addr, go, last, received }
    }

    /// Runs `test` the way a shard runs its tasks: a current-thread runtime's `LocalSet`.
    fn on_a_shard_thread(test: impl std::future::Future<Output = ()>) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        tokio::task::LocalSet::new().block_on(&runtime.expect("runtime"), test);
    }

    /// Lets the writer task run until it has parked the connection with nothing queued.
    async fn settle(link: &PeerLink) {
        for _ in 0..10_000 {
            let parked = link.parked.take();
            let idle = parked.is_some() && link.queue.capacity() == link.queue.max_capacity();
            link.parked.set(parked);
            if idle {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the writer never parked the connection");
    }

    #[test]
    fn frames_keep_their_order_across_direct_writes_a_full_socket_and_the_writer_task() {
        const SMALL: u64 = 50;
        let Node2 { addr, go, last: total_tx, received } = node2();
        on_a_shard_thread(async move {
            let link = PeerLink::spawn(identity(1), NodeId(2), addr, None);
            // Not connected yet: queued, and the writer connects.
            assert_eq!(link.send([numbered(1, 8)]), Sent { frames: 1, messages: 1 });
            settle(&link).await;
            // Connected and idle: written by this task, nothing queued, still parked.
            for sequence in 2..2 + SMALL {
                link.send([numbered(sequence, 100)]);
                assert_eq!(link.queue.capacity(), link.queue.max_capacity());
                let parked = link.parked.take();
                assert!(parked.is_some(), "a direct write keeps the connection parked");
                link.parked.set(parked);
            }
            // The peer is not reading: 64 KiB frames soon overflow the socket's buffers, and
            // the rest of the frame that did not fit goes to the writer task.
            let mut next = 2 + SMALL;
            while link.queue.capacity() == link.queue.max_capacity() {
                assert!(next < 2 + SMALL + 2_000, "the socket never filled");
                assert_eq!(link.send([numbered(next, 64 << 10)]), Sent { frames: 1, messages: 1 });
                next += 1;
            }
            // The peer drains the socket while this thread is blocked (so the writer task
            // cannot run): the socket has room again, but the rest is still queued, so the next
            // frame must queue behind it rather than go straight out.
            go.send(()).expect("receiver waiting");
            std::thread::sleep(Duration::from_millis(300));
            link.send([numbered(next, 100)]);
            assert!(link.queue.capacity() < link.queue.max_capacity(), "queued behind the rest");
            total_tx.send(next).expect("receiver waiting");
            settle(&link).await;
        });
        let seen = received.join().expect("receiver");
        assert_eq!(seen, (1..=seen.len() as u64).collect::<Vec<_>>());
    }

    #[test]
    fn a_delayed_flush_holds_back_the_next_and_a_dropped_one_never_arrives() {
        use crate::transport::faults::LinkFault;

        let Node2 { addr, go, last: total_tx, received } = node2();
        go.send(()).expect("receiver waiting");
        on_a_shard_thread(async move {
            let faults = Arc::new(Faults::new());
            let link = PeerLink::spawn(identity(1), NodeId(2), addr, Some(Arc::clone(&faults)));
            link.send([numbered(1, 8)]);
            settle(&link).await;
            // Delayed: queued, taking the parked connection along.
            let slow = LinkFault { delay: Duration::from_millis(50), ..LinkFault::default() };
            faults.set_link(NodeId(1), NodeId(2), slow);
            link.send([numbered(2, 8)]);
            faults.heal();
            let parked = link.parked.take();
            assert!(parked.is_none(), "the delayed flush took the connection");
            // Not delayed, yet it must not overtake the delayed one.
            link.send([numbered(3, 8)]);
            assert!(link.queue.capacity() < link.queue.max_capacity() - 1, "queued behind it");
            // Dropped by the fault hook: counted, never sent.
            faults.isolate(NodeId(1));
            assert_eq!(link.send([numbered(1_000, 8)]), Sent { frames: 1, messages: 1 });
            faults.heal();
            settle(&link).await;
            // Parked again: straight out (the receiver learns first which frame is the last).
            total_tx.send(4).expect("receiver waiting");
            link.send([numbered(4, 8)]);
            assert_eq!(link.queue.capacity(), link.queue.max_capacity());
        });
        assert_eq!(received.join().expect("receiver"), vec![1, 2, 3, 4]);
    }
}

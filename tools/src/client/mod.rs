//! The client side of `flotilla-node`'s protocol: [`Client`], one TCP connection to one node
//! with many requests in flight, and the codec both sides share ([`codec`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), flotilla_tools::client::ClientError> {
//! use std::time::Duration;
//! use flotilla_tools::client::{Client, ReadConsistency};
//!
//! let client = Client::connect("127.0.0.1:7101".parse().unwrap(), Duration::from_secs(1)).await?;
//! client.put(1, "k".into(), "v".into()).await?;
//! let value = client.get(1, "k".into(), ReadConsistency::Linearizable).await?;
//! assert_eq!(value.as_deref(), Some(&b"v"[..]));
//! # Ok(()) }
//! ```
//!
//! Every call has a deadline ([`Client::set_timeout`]). A write that ends in `Timeout` (the
//! node's deadline passed, or its outcome is unknown) or in a lost connection may still have
//! been applied, so callers that check histories count such writes as maybe applied (the S10
//! test counts every failed write so, which is the conservative reading).

pub mod codec;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use codec::{FrameKind, decode_frame, encode_frame};
pub use codec::{ReadConsistency, RemoteError, Request, Response, Role, Stats, Status};

/// Frames queued for the connection's writer before callers wait: bounds what a slow or stopped
/// node can make a client hold.
const OUTBOX_FRAMES_MAX: usize = 1024;

/// Why a call did not get an answer from the node's state machine.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The node answered with an error.
    #[error("node: {0}")]
    Remote(#[from] RemoteError),
    /// No answer within the client's deadline: a write may still be applied.
    #[error("no answer within the client deadline")]
    Timeout,
    /// The connection could not be made or was lost: a write sent on it may have been applied.
    #[error("connection: {0}")]
    Disconnected(String),
    /// The node sent bytes that are not this protocol; the connection was closed.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The node answered with a response of the wrong kind for the request.
    #[error("unexpected response {0}")]
    Unexpected(String),
}

/// The outcome of a compare-and-set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// The key held the expected value and now holds the new one.
    Swapped,
    /// The key held `actual`; nothing changed.
    Mismatch {
        /// The value found (`None`: absent).
        actual: Option<Bytes>,
    },
}

type Answer = oneshot::Sender<Result<Response, ClientError>>;

/// Requests waiting for their response, or why the connection is gone. Shared by the callers
/// and the connection's reader and writer tasks; never locked across an `.await`.
#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, Answer>,
    closed: Option<ClientError>,
}

impl Pending {
    /// Marks the connection dead and fails every waiting call with `error`.
    fn close(&mut self, error: &ClientError) {
        self.closed.get_or_insert_with(|| error.clone());
        for (_, answer) in self.waiting.drain() {
            let _ = answer.send(Err(error.clone()));
        }
    }
}

type Shared = Arc<Mutex<Pending>>;

fn lock(pending: &Shared) -> std::sync::MutexGuard<'_, Pending> {
    // A panic while holding this lock leaves a consistent map (each step is one insert or
    // remove), so a poisoned lock is still usable.
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The connection's tasks, stopped when the last [`Client`] clone is dropped.
struct Connection {
    pending: Shared,
    outbox: mpsc::Sender<Vec<u8>>,
    next_id: AtomicU64,
    timeout_ms: AtomicU64,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One connection to one node. Cheap to clone (clones share the connection); many tasks may
/// call at once: requests are pipelined and answers matched by id. Once the connection fails,
/// every call fails with [`ClientError::Disconnected`]: connect a new `Client`.
#[derive(Clone)]
pub struct Client {
    connection: Arc<Connection>,
    peer: SocketAddr,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the node serving clients at `addr`, waiting at most `timeout`. Calls have a
    /// 10 s deadline until [`Client::set_timeout`] changes it.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, ClientError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(ClientError::Disconnected(format!("{addr}: {error}"))),
            Err(_) => return Err(ClientError::Disconnected(format!("{addr}: connect timed out"))),
        };
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        let pending = Shared::default();
        let (outbox, inbox) = mpsc::channel(OUTBOX_FRAMES_MAX);
        let tasks = [
            tokio::spawn(read_loop(reader, Arc::clone(&pending))),
            tokio::spawn(write_loop(writer, inbox, Arc::clone(&pending))),
        ];
        let connection = Connection {
            pending,
            outbox,
            next_id: AtomicU64::new(1),
            timeout_ms: AtomicU64::new(10_000),
            tasks,
        };
        Ok(Self { connection: Arc::new(connection), peer: addr })
    }

    /// The node's client address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Sets the deadline of every later call on this connection (and its clones).
    pub fn set_timeout(&self, timeout: Duration) {
        let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        self.connection.timeout_ms.store(millis, Ordering::Relaxed);
    }

    /// False once the connection failed: every later call would fail at once.
    pub fn is_open(&self) -> bool {
        lock(&self.connection.pending).closed.is_none()
    }

    /// Sends `request` and waits for its response, up to the deadline. An error response comes
    /// back as `Ok(Response::Error(..))`; the typed helpers below turn it into
    /// [`ClientError::Remote`].
    pub async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let connection = &*self.connection;
        let id = connection.next_id.fetch_add(1, Ordering::Relaxed);
        let mut body = Vec::new();
        request.encode(&mut body);
        if body.len() > codec::BODY_MAX {
            return Err(RemoteError::TooLarge.into());
        }
        let mut frame = Vec::with_capacity(codec::HEADER_LEN + body.len());
        encode_frame(FrameKind::Request, id, &body, &mut frame);
        let (answer, response) = oneshot::channel();
        {
            let mut pending = lock(&connection.pending);
            if let Some(error) = &pending.closed {
                return Err(error.clone());
            }
            pending.waiting.insert(id, answer);
        }
        let timeout = Duration::from_millis(connection.timeout_ms.load(Ordering::Relaxed));
        let exchange = async {
            // The writer task writes whole frames, so a call cancelled here never tears one.
            if connection.outbox.send(frame).await.is_err() {
                return Err(ClientError::Disconnected("connection closed".into()));
            }
            response.await.unwrap_or_else(|_| Err(ClientError::Disconnected("closed".into())))
        };
        let result = tokio::time::timeout(timeout, exchange).await;
        lock(&connection.pending).waiting.remove(&id);
        result.unwrap_or(Err(ClientError::Timeout))
    }

    /// Sets `key` to `value` in `group`; returns the write's log index.
    pub async fn put(&self, group: u64, key: Bytes, value: Bytes) -> Result<u64, ClientError> {
        match self.call(&Request::Put { group, key, value }).await? {
            Response::Written { index } => Ok(index),
            other => Err(unexpected(other)),
        }
    }

    /// Reads `key` in `group` with the given freshness.
    pub async fn get(
        &self,
        group: u64,
        key: Bytes,
        consistency: ReadConsistency,
    ) -> Result<Option<Bytes>, ClientError> {
        match self.call(&Request::Get { group, consistency, key }).await? {
            Response::Value(value) => Ok(value),
            other => Err(unexpected(other)),
        }
    }

    /// Removes `key` from `group`; returns whether it existed.
    pub async fn delete(&self, group: u64, key: Bytes) -> Result<bool, ClientError> {
        match self.call(&Request::Delete { group, key }).await? {
            Response::Deleted { existed, .. } => Ok(existed),
            other => Err(unexpected(other)),
        }
    }

    /// Sets `key` to `new` in `group` if it holds `expected` (`None`: absent on either side).
    pub async fn compare_and_set(
        &self,
        group: u64,
        key: Bytes,
        expected: Option<Bytes>,
        new: Option<Bytes>,
    ) -> Result<CasOutcome, ClientError> {
        match self.call(&Request::CompareAndSet { group, key, expected, new }).await? {
            Response::Swapped { .. } => Ok(CasOutcome::Swapped),
            Response::Mismatch { actual, .. } => Ok(CasOutcome::Mismatch { actual }),
            other => Err(unexpected(other)),
        }
    }

    /// This node's replica of `group`.
    pub async fn status(&self, group: u64) -> Result<Status, ClientError> {
        match self.call(&Request::Status { group }).await? {
            Response::Status(status) => Ok(status),
            other => Err(unexpected(other)),
        }
    }

    /// The node's counters.
    pub async fn stats(&self) -> Result<Stats, ClientError> {
        match self.call(&Request::Stats).await? {
            Response::Stats(stats) => Ok(stats),
            other => Err(unexpected(other)),
        }
    }

    /// This node's replica of `group`: its applied index and every key and value.
    pub async fn dump(&self, group: u64) -> Result<(u64, Vec<(Bytes, Bytes)>), ClientError> {
        match self.call(&Request::Dump { group }).await? {
            Response::Dump { applied, entries } => Ok((applied, entries)),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(response: Response) -> ClientError {
    match response {
        Response::Error(error) => ClientError::Remote(error),
        other => ClientError::Unexpected(format!("{other:?}")),
    }
}

/// Reads response frames and hands each to its caller; on any failure closes the connection for
/// every caller.
async fn read_loop(mut reader: OwnedReadHalf, pending: Shared) {
    let mut buffer = BytesMut::with_capacity(64 << 10);
    let error = loop {
        match decode_frame(&mut buffer) {
            Ok(Some(frame)) => {
                if frame.kind != FrameKind::Response {
                    break ClientError::Protocol("a request frame from the node".into());
                }
                let response = match Response::decode(&frame.body) {
                    Ok(response) => response,
                    Err(error) => break ClientError::Protocol(error.to_string()),
                };
                // Absent: its caller gave up (timeout); the late answer is dropped.
                if let Some(answer) = lock(&pending).waiting.remove(&frame.id) {
                    let _ = answer.send(Ok(response));
                }
                continue;
            }
            Ok(None) => {}
            Err(error) => break ClientError::Protocol(error.to_string()),
        }
        buffer.reserve(64 << 10);
        match reader.read_buf(&mut buffer).await {
            Ok(0) => break ClientError::Disconnected("the node closed the connection".into()),
            Ok(_) => {}
            Err(error) => break ClientError::Disconnected(error.to_string()),
        }
    };
    lock(&pending).close(&error);
}

/// Writes queued frames in order, batching whatever is queued into one write.
async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut inbox: mpsc::Receiver<Vec<u8>>,
    pending: Shared,
) {
    let mut batch = Vec::new();
    while let Some(frame) = inbox.recv().await {
        batch.clear();
        batch.extend_from_slice(&frame);
        while batch.len() < (256 << 10)
            && let Ok(frame) = inbox.try_recv()
        {
            batch.extend_from_slice(&frame);
        }
        if let Err(error) = writer.write_all(&batch).await {
            lock(&pending).close(&ClientError::Disconnected(error.to_string()));
            return;
        }
    }
}

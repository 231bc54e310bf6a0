//! One TCP connection between two nodes: the pure [`Handshake`] and [`Session`] driven over a
//! `tokio::net::TcpStream`.
//!
//! This is the thin IO layer around the codecs: it reads into one bounded buffer, feeds the
//! decoders, writes what they produce, and closes the connection on the first error. A peer that
//! does not complete its handshake within [`ConnectionConfig::handshake_timeout`] is dropped, so a
//! silent or trickling stranger cannot hold a socket open. Reads are sized by the decoder
//! (see [`super::frame::RESERVE_BYTES_MAX`]), so a connection's buffer follows the bytes its peer
//! actually sent.

use std::borrow::Borrow;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use flotilla_raftgroup::{Message, NodeId};
use flotilla_wal::GroupId;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::batch::BatchWriter;
use super::frame::{self, BODY_BYTES_MAX_DEFAULT, Frame, FrameError};
use super::handshake::{Handshake, HandshakeError, Identity, Session, Verdict};

/// Room a read asks for when the decoder has not reserved more: a few frames of small messages.
const READ_BYTES_MIN: usize = 8 << 10;
/// Reads during the handshake are tiny: its frames are bounded to a few dozen bytes.
const HANDSHAKE_READ_BYTES: usize = 256;
/// Capacity the write buffer keeps between writes: a whole frame of a peer link (1 MiB of body
/// plus the message that crossed it and the frame's header), so catching up does not
/// reallocate per frame.
const WRITE_BUFFER_KEEP: usize = 2 << 20;

/// How a connection behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionConfig {
    /// This node.
    pub local: Identity,
    /// Longest frame body sent or accepted; every node of a cluster must use the same value.
    pub body_bytes_max: u32,
    /// How long the handshake may take from connect or accept until a verdict.
    pub handshake_timeout: Duration,
}

impl ConnectionConfig {
    /// Defaults for `local`: [`BODY_BYTES_MAX_DEFAULT`] and a 5 s handshake timeout.
    pub fn new(local: Identity) -> Self {
        Self {
            local,
            body_bytes_max: BODY_BYTES_MAX_DEFAULT,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a connection could not be established or was closed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The socket failed.
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake refused the peer or was refused by it.
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// The handshake took longer than allowed.
    #[error("handshake timed out after {timeout_ms} ms")]
    HandshakeTimeout {
        /// The configured timeout.
        timeout_ms: u64,
    },
    /// The peer sent a bad frame (or a frame to send was too large).
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The peer closed the connection between two frames.
    #[error("connection closed by the peer")]
    Closed,
}

/// Bytes queued for a connection's writer task, in the order they must go out.
#[derive(Debug)]
pub enum Outbound {
    /// A data frame's body, framed when written.
    Body(Vec<u8>),
    /// The unsent end of a frame already framed and partly written
    /// ([`Connection::try_send_batch`]).
    Rest(Vec<u8>),
}

/// What [`Connection::try_send_batch`] wrote.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySend {
    /// The whole frame.
    Sent,
    /// Part of the frame (the socket's buffer is full): these bytes are the rest.
    Partial(Vec<u8>),
}

/// An established connection to one peer node.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    session: Session,
    read_buffer: BytesMut,
    write_buffer: Vec<u8>,
}

impl Connection {
    /// Dials `peer` at `addr` and performs the handshake as the initiator.
    pub async fn connect(
        addr: SocketAddr,
        peer: NodeId,
        config: ConnectionConfig,
    ) -> Result<Self, ConnectionError> {
        let stream = TcpStream::connect(addr).await?;
        let mut hello = Vec::new();
        let handshake = Handshake::initiate(config.local, peer, &mut hello);
        Self::establish(stream, handshake, hello, config).await
    }

    /// Performs the handshake as the acceptor on a freshly accepted `stream`; `members` are the
    /// nodes allowed in. On refusal the answer (if the peer deserves one) is sent and the stream
    /// closed.
    pub async fn accept(
        stream: TcpStream,
        members: BTreeSet<NodeId>,
        config: ConnectionConfig,
    ) -> Result<Self, ConnectionError> {
        let handshake = Handshake::accept(config.local, members);
        Self::establish(stream, handshake, Vec::new(), config).await
    }

    async fn establish(
        mut stream: TcpStream,
        handshake: Handshake,
        hello: Vec<u8>,
        config: ConnectionConfig,
    ) -> Result<Self, ConnectionError> {
        // Raft messages are already batched per flush; Nagle would only add latency.
        stream.set_nodelay(true)?;
        let mut read_buffer = BytesMut::new();
        let shake = run_handshake(&mut stream, handshake, hello, &mut read_buffer);
        let result = match tokio::time::timeout(config.handshake_timeout, shake).await {
            Ok(result) => result,
            Err(_elapsed) => {
                let timeout_ms =
                    u64::try_from(config.handshake_timeout.as_millis()).unwrap_or(u64::MAX);
                Err(ConnectionError::HandshakeTimeout { timeout_ms })
            }
        };
        let session = match result {
            Ok(session) => session,
            Err(error) => {
                // Refused strangers and misconfigured peers are an operator's business.
                let peer_addr = stream.peer_addr().ok();
                tracing::warn!(?peer_addr, %error, "transport handshake failed");
                metrics::counter!("flotilla_transport_handshake_failures_total").increment(1);
                // Best effort: the peer may already be gone, and the error to report is ours.
                let _ = stream.shutdown().await;
                return Err(error);
            }
        };
        let session = session.with_body_bytes_max(config.body_bytes_max);
        Ok(Self { stream, session, read_buffer, write_buffer: Vec::new() })
    }

    /// The node at the other end.
    pub fn peer(&self) -> NodeId {
        self.session.peer()
    }

    /// The framing state: identities and limits.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Sends one data frame carrying `body`. Not cancel-safe: a cancelled send may have written
    /// part of the frame, after which the connection must be dropped.
    pub async fn send(&mut self, body: &[u8]) -> Result<(), ConnectionError> {
        self.write_buffer.clear();
        self.session.encode(body, &mut self.write_buffer)?;
        self.stream.write_all(&self.write_buffer).await?;
        Ok(())
    }

    /// Sends one snapshot-stream frame carrying `body` (see [`super::snapshot`]). Not
    /// cancel-safe (see [`Connection::send`]).
    pub async fn send_snapshot(&mut self, body: &[u8]) -> Result<(), ConnectionError> {
        self.write_buffer.clear();
        self.session.encode_snapshot(body, &mut self.write_buffer)?;
        self.stream.write_all(&self.write_buffer).await?;
        Ok(())
    }

    /// Sends every item of `outbound` in order, all in one write: a writer that fell behind
    /// catches up with one system call instead of one per frame. Not cancel-safe (see
    /// [`Connection::send`]).
    pub async fn send_all(&mut self, outbound: &[Outbound]) -> Result<(), ConnectionError> {
        self.write_buffer.clear();
        for item in outbound {
            match item {
                Outbound::Body(body) => self.session.encode(body, &mut self.write_buffer)?,
                Outbound::Rest(bytes) => self.write_buffer.extend_from_slice(bytes),
            }
        }
        self.stream.write_all(&self.write_buffer).await?;
        self.release_write_buffer();
        Ok(())
    }

    /// Frames a batch of the next `items` — until the body reaches `body_target` bytes or the
    /// items run out (none: an empty batch, as a node-level heartbeat) — and writes it to the socket without waiting; returns how many items it took and what
    /// the socket did not take. This lets the shard's own task send while the socket has room,
    /// instead of handing every frame to a writer task; [`TrySend::Partial`]'s bytes must go
    /// out (with [`Outbound::Rest`]) before anything else on this connection. After an error
    /// the connection is unusable: drop it.
    pub fn try_send_batch<M: Borrow<Message>>(
        &mut self,
        items: &mut impl Iterator<Item = (GroupId, M)>,
        body_target: usize,
    ) -> Result<(u32, TrySend), ConnectionError> {
        let count = self.frame_batch(items, body_target)?;
        let mut written = 0;
        while written < self.write_buffer.len() {
            match self.stream.try_write(&self.write_buffer[written..]) {
                Ok(0) => return Err(ConnectionError::Closed),
                Ok(n) => written += n,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error.into()),
            }
        }
        let sent = if written == self.write_buffer.len() {
            TrySend::Sent
        } else {
            TrySend::Partial(self.write_buffer[written..].to_vec())
        };
        self.release_write_buffer();
        Ok((count, sent))
    }

    /// Keeps the write buffer for the next frames unless one large batch (a follower catching
    /// up) grew it far beyond what ordinary traffic needs.
    fn release_write_buffer(&mut self) {
        self.write_buffer.clear();
        self.write_buffer.shrink_to(WRITE_BUFFER_KEEP);
    }

    /// Sends one data frame carrying a batch of `items`, encoded straight into the frame. Not
    /// cancel-safe (see [`Connection::send`]).
    pub async fn send_batch<'m>(
        &mut self,
        items: impl IntoIterator<Item = (GroupId, &'m Message)>,
    ) -> Result<(), ConnectionError> {
        self.frame_batch(&mut items.into_iter(), usize::MAX)?;
        self.stream.write_all(&self.write_buffer).await?;
        Ok(())
    }

    /// Replaces the write buffer's contents with one data frame carrying a batch of the next
    /// `items` (see [`BatchWriter::fill`]); returns how many it took.
    fn frame_batch<M: Borrow<Message>>(
        &mut self,
        items: &mut impl Iterator<Item = (GroupId, M)>,
        body_target: usize,
    ) -> Result<u32, ConnectionError> {
        self.write_buffer.clear();
        let start = frame::begin(&mut self.write_buffer);
        let mut writer = BatchWriter::new(&mut self.write_buffer);
        writer.fill(items, body_target);
        let count = writer.count();
        self.session.finish(&mut self.write_buffer, start)?;
        Ok(count)
    }

    /// Receives the next data frame. Cancel-safe: bytes read so far stay buffered, so it may be
    /// used in `tokio::select!`. After an error the connection is unusable: drop it.
    pub async fn recv(&mut self) -> Result<Frame, ConnectionError> {
        loop {
            if let Some(frame) = self.session.decode(&mut self.read_buffer)? {
                return Ok(frame);
            }
            self.read_buffer.reserve(READ_BYTES_MIN);
            if self.stream.read_buf(&mut self.read_buffer).await? == 0 {
                self.session.on_eof(&self.read_buffer)?;
                return Err(ConnectionError::Closed);
            }
        }
    }

    /// Closes the sending half: the peer's `recv` ends with [`ConnectionError::Closed`].
    pub async fn shutdown(&mut self) -> Result<(), ConnectionError> {
        self.stream.shutdown().await?;
        Ok(())
    }
}

/// Sends `hello` (empty on the accepting side), then exchanges bytes until a verdict; bytes after
/// the peer's handshake frame stay in `read_buffer`.
async fn run_handshake(
    stream: &mut TcpStream,
    mut handshake: Handshake,
    hello: Vec<u8>,
    read_buffer: &mut BytesMut,
) -> Result<Session, ConnectionError> {
    let mut out = hello;
    loop {
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        read_buffer.reserve(HANDSHAKE_READ_BYTES);
        let verdict = if stream.read_buf(read_buffer).await? == 0 {
            Some(handshake.on_eof())
        } else {
            handshake.on_bytes(read_buffer, &mut out)
        };
        match verdict {
            None => {}
            Some(Verdict::Accepted { .. }) => {
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                }
                return Ok(handshake.into_session()?);
            }
            Some(Verdict::Rejected(error)) => {
                if !out.is_empty() {
                    // The reason is a courtesy; a peer that already left does not change ours.
                    let _ = stream.write_all(&out).await;
                }
                return Err(error.into());
            }
        }
    }
}

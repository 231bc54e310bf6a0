//! Node-to-node transport: the bytes two nodes exchange over one connection.
//!
//! Everything here except [`connection`] (tokio TCP) is pure: bytes in, values or bytes out, no sockets, no
//! clocks. A connection is a stream of *frames* ([`frame`]). The first frame each way is a
//! *handshake* ([`handshake`]) that refuses foreign clusters and unknown nodes; every later frame
//! is a *data* frame whose body is a *batch* ([`batch`]) of the Raft messages of many groups bound
//! for the peer — one frame per peer node per flush of a shard. Snapshots travel apart, on a
//! connection of their own, as a resumable stream of bounded chunks ([`snapshot`]).
//!
//! ```
//! use bytes::BytesMut;
//! use flotilla::raftgroup::{Message, MessageBody, NodeId, Term};
//! use flotilla::transport::{ClusterId, batch, frame::{self, FrameDecoder, FrameHeader, FrameKind}};
//! use flotilla::wal::GroupId;
//!
//! let header = FrameHeader {
//!     kind: FrameKind::Data,
//!     cluster: ClusterId(7),
//!     source: NodeId(1),
//!     target: NodeId(2),
//! };
//! let message = Message {
//!     from: NodeId(1),
//!     to: NodeId(2),
//!     term: Term(3),
//!     body: MessageBody::TimeoutNow,
//! };
//!
//! // Sender: the batch is encoded straight into the frame's buffer (no copy of the body).
//! let mut out = Vec::new();
//! let start = frame::begin(&mut out);
//! let mut writer = batch::BatchWriter::new(&mut out);
//! writer.push(GroupId(42), &message);
//! frame::finish(&header, &mut out, start, frame::BODY_BYTES_MAX_DEFAULT).unwrap();
//!
//! // Receiver: bytes arrive in any pieces; a frame comes out once it is whole and verified.
//! let mut decoder = FrameDecoder::new(frame::DecoderConfig::new(ClusterId(7), NodeId(2)));
//! let mut input = BytesMut::new();
//! let (first, second) = out.split_at(10);
//! input.extend_from_slice(first);
//! assert_eq!(decoder.decode(&mut input), Ok(None));
//! input.extend_from_slice(second);
//! let received = decoder.decode(&mut input).unwrap().unwrap();
//! let mut messages = Vec::new();
//! batch::decode(&received.body, &mut messages).unwrap();
//! assert_eq!(messages, vec![(GroupId(42), message)]);
//! ```

use std::fmt;

pub mod batch;
pub mod connection;
pub mod faults;
pub mod frame;
pub mod handshake;
pub mod snapshot;

/// Identifies a cluster: every frame carries it, so nodes of two clusters that share a network
/// (a staging and a production cluster, a restored backup) never mix their Raft traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId(pub u64);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cluster{}", self.0)
    }
}

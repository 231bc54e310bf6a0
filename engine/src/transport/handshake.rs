//! The handshake: the first frame each way on a connection. Pure: bytes in, bytes and a verdict
//! out.
//!
//! The initiator sends a *hello* naming its protocol version, cluster and node; the acceptor
//! checks them — same protocol, same cluster, addressed to this node, sent by a known member —
//! and answers *accept* or *reject* with a typed reason, then closes on reject. Until a side has
//! accepted, it takes no data frame: a peer that skips the handshake is refused, not served.
//!
//! ```text
//! handshake frame body (little-endian):
//!   hello  = kind:u8 (1) protocol:u16 cluster:u64 node:u64
//!   accept = kind:u8 (2) protocol:u16 cluster:u64 node:u64
//!   reject = kind:u8 (3) protocol:u16 cluster:u64 node:u64 reason:u8 detail:u64
//! ```
//!
//! `cluster` and `node` describe the sender and must agree with the frame header. A reject is
//! addressed with the initiator's own cluster id so that a node of a foreign cluster can still
//! read why it was turned away. Handshake frames are bounded by [`HANDSHAKE_BODY_BYTES_MAX`], so
//! an unauthenticated peer gets at most a few dozen bytes of buffer.

use std::collections::BTreeSet;

use bytes::BytesMut;
use flotilla_raftgroup::NodeId;
use thiserror::Error;

use super::ClusterId;
use super::frame::{self, DecoderConfig, Frame, FrameDecoder, FrameError, FrameHeader, FrameKind};

/// The protocol version this node speaks (the meaning of frame bodies; the frame layout has its
/// own [`frame::VERSION`]).
pub const PROTOCOL_VERSION: u16 = 1;
/// Longest handshake body accepted: every handshake message fits, with room to grow.
pub const HANDSHAKE_BODY_BYTES_MAX: u32 = 64;

const KIND_HELLO: u8 = 1;
const KIND_ACCEPT: u8 = 2;
const KIND_REJECT: u8 = 3;
/// kind, protocol, cluster, node.
const MESSAGE_BYTES: usize = 1 + 2 + 8 + 8;
/// A reject adds its reason and detail.
const REJECT_BYTES: usize = MESSAGE_BYTES + 1 + 8;

const REASON_FOREIGN_CLUSTER: u8 = 1;
const REASON_UNKNOWN_NODE: u8 = 2;
const REASON_WRONG_TARGET: u8 = 3;
const REASON_UNSUPPORTED_PROTOCOL: u8 = 4;

const _: () = assert!(REJECT_BYTES <= HANDSHAKE_BODY_BYTES_MAX as usize);

/// Who a node is on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The cluster it belongs to.
    pub cluster: ClusterId,
    /// Its node id.
    pub node: NodeId,
}

/// Why an acceptor turned an initiator away, as sent on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RejectReason {
    /// The acceptor belongs to another cluster.
    #[error("the acceptor belongs to {cluster}")]
    ForeignCluster {
        /// The acceptor's cluster.
        cluster: ClusterId,
    },
    /// The acceptor does not know the initiator's node as a member.
    #[error("node {node} is not a known member")]
    UnknownNode {
        /// The initiator's node, as it introduced itself.
        node: NodeId,
    },
    /// The initiator meant to reach another node.
    #[error("the acceptor is {node}")]
    WrongTarget {
        /// The acceptor's node.
        node: NodeId,
    },
    /// The acceptor does not speak the initiator's protocol version.
    #[error("the acceptor speaks protocol {version}")]
    UnsupportedProtocol {
        /// The acceptor's version.
        version: u16,
    },
}

/// Why a handshake failed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Acceptor: the initiator belongs to another cluster.
    #[error("initiator belongs to {found}, this node to {expected}")]
    ForeignCluster {
        /// This node's cluster.
        expected: ClusterId,
        /// The initiator's cluster.
        found: ClusterId,
    },
    /// Acceptor: the initiator is not a known member.
    #[error("unknown node {node}")]
    UnknownNode {
        /// The initiator's node.
        node: NodeId,
    },
    /// Acceptor: the hello was addressed to another node.
    #[error("hello addressed to {found}, this is {expected}")]
    WrongTarget {
        /// This node.
        expected: NodeId,
        /// The target the initiator named.
        found: NodeId,
    },
    /// Acceptor: the initiator speaks another protocol version.
    #[error("unsupported protocol version {version}")]
    UnsupportedProtocol {
        /// The initiator's version.
        version: u16,
    },
    /// Initiator: the acceptor refused.
    #[error("rejected by the peer: {0}")]
    Rejected(RejectReason),
    /// Initiator: the answer came from another node than the one dialled.
    #[error("answer from {found}, expected {expected}")]
    WrongPeer {
        /// The node dialled.
        expected: NodeId,
        /// The node that answered.
        found: NodeId,
    },
    /// A data frame arrived before the handshake completed.
    #[error("data frame before the handshake completed")]
    DataBeforeHandshake,
    /// The bytes are not a valid handshake frame.
    #[error("bad handshake frame: {0}")]
    Frame(FrameError),
    /// A valid frame whose body is not the handshake message expected.
    #[error("malformed handshake: {what}")]
    Malformed {
        /// What was wrong.
        what: &'static str,
    },
    /// The stream ended before the handshake completed.
    #[error("connection closed during the handshake")]
    Closed,
    /// A session was asked for before the handshake completed.
    #[error("handshake not complete")]
    Incomplete,
}

impl From<FrameError> for HandshakeError {
    fn from(error: FrameError) -> Self {
        match error {
            FrameError::WrongKind { found: FrameKind::Data, .. } => Self::DataBeforeHandshake,
            error => Self::Frame(error),
        }
    }
}

/// The outcome of a handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The connection is established with `peer`: [`Handshake::into_session`].
    Accepted {
        /// The node at the other end.
        peer: NodeId,
    },
    /// The connection must be closed (after sending whatever the handshake wrote).
    Rejected(HandshakeError),
}

#[derive(Clone, Debug)]
enum Role {
    Initiator { peer: NodeId },
    Acceptor { members: BTreeSet<NodeId> },
}

/// One side's handshake on one connection.
#[derive(Clone, Debug)]
pub struct Handshake {
    local: Identity,
    role: Role,
    decoder: FrameDecoder,
    verdict: Option<Verdict>,
}

/// A handshake message body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Message {
    kind: u8,
    protocol: u16,
    cluster: ClusterId,
    node: NodeId,
    reject: Option<RejectReason>,
}

impl Handshake {
    /// Starts the dialling side: appends the hello for `peer` to `out` (send it first).
    pub fn initiate(local: Identity, peer: NodeId, out: &mut Vec<u8>) -> Self {
        let hello = Message {
            kind: KIND_HELLO,
            protocol: PROTOCOL_VERSION,
            cluster: local.cluster,
            node: local.node,
            reject: None,
        };
        write(&header(local.cluster, local.node, peer), &hello, out);
        // The answer must come from our cluster and be addressed to us; who sent it is checked
        // after decoding, to report it as `WrongPeer` rather than as a bad frame.
        let config = DecoderConfig {
            body_bytes_max: HANDSHAKE_BODY_BYTES_MAX,
            kind: Some(FrameKind::Handshake),
            ..DecoderConfig::new(local.cluster, local.node)
        };
        Self {
            local,
            role: Role::Initiator { peer },
            decoder: FrameDecoder::new(config),
            verdict: None,
        }
    }

    /// Starts the accepting side; `members` are the nodes allowed to connect.
    pub fn accept(local: Identity, members: BTreeSet<NodeId>) -> Self {
        // No cluster or target check at the frame level: a hello from a foreign cluster or for
        // another node is answered with a reason, which needs its body.
        let config = DecoderConfig {
            body_bytes_max: HANDSHAKE_BODY_BYTES_MAX,
            kind: Some(FrameKind::Handshake),
            ..DecoderConfig::any()
        };
        Self {
            local,
            role: Role::Acceptor { members },
            decoder: FrameDecoder::new(config),
            verdict: None,
        }
    }

    /// This node.
    pub fn local(&self) -> Identity {
        self.local
    }

    /// The verdict, once there is one.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.verdict.as_ref()
    }

    /// Feeds received bytes. Returns `None` while more are needed, then the verdict (again on
    /// every later call). Appends to `out` what must be sent: the acceptor's answer. Bytes after
    /// the handshake frame stay in `input` for the session; after a rejection nothing more is
    /// read.
    pub fn on_bytes(&mut self, input: &mut BytesMut, out: &mut Vec<u8>) -> Option<Verdict> {
        if self.verdict.is_none() {
            let verdict = match self.decoder.decode(input) {
                Ok(None) => return None,
                Ok(Some(frame)) => self.on_frame(&frame, out),
                Err(error) => Verdict::Rejected(error.into()),
            };
            self.verdict = Some(verdict);
        }
        self.verdict.clone()
    }

    /// The stream ended: the verdict if there was one, otherwise [`HandshakeError::Closed`].
    pub fn on_eof(&mut self) -> Verdict {
        self.verdict.get_or_insert(Verdict::Rejected(HandshakeError::Closed)).clone()
    }

    /// The established connection, if the handshake accepted.
    pub fn into_session(self) -> Result<Session, HandshakeError> {
        match self.verdict {
            Some(Verdict::Accepted { peer }) => Ok(Session::new(self.local, peer)),
            Some(Verdict::Rejected(error)) => Err(error),
            None => Err(HandshakeError::Incomplete),
        }
    }

    fn on_frame(&self, frame: &Frame, out: &mut Vec<u8>) -> Verdict {
        let message = match parse(&frame.body) {
            Ok(message) => message,
            Err(error) => return Verdict::Rejected(error),
        };
        // A reject names the acceptor's cluster in its body but the initiator's in its header.
        let cluster_differs =
            message.cluster != frame.header.cluster && message.kind != KIND_REJECT;
        if cluster_differs || message.node != frame.header.source {
            return Verdict::Rejected(HandshakeError::Malformed {
                what: "body and header name different senders",
            });
        }
        match &self.role {
            Role::Initiator { peer } => Self::on_answer(*peer, &message),
            Role::Acceptor { members } => {
                self.on_hello(members, frame.header.target, &message, out)
            }
        }
    }

    fn on_answer(peer: NodeId, answer: &Message) -> Verdict {
        match (answer.kind, answer.reject) {
            (KIND_REJECT, Some(reason)) => Verdict::Rejected(HandshakeError::Rejected(reason)),
            (KIND_ACCEPT, None) if answer.node != peer => {
                Verdict::Rejected(HandshakeError::WrongPeer { expected: peer, found: answer.node })
            }
            (KIND_ACCEPT, None) if answer.protocol != PROTOCOL_VERSION => {
                Verdict::Rejected(HandshakeError::UnsupportedProtocol { version: answer.protocol })
            }
            (KIND_ACCEPT, None) => Verdict::Accepted { peer },
            _ => Verdict::Rejected(HandshakeError::Malformed { what: "expected accept or reject" }),
        }
    }

    fn on_hello(
        &self,
        members: &BTreeSet<NodeId>,
        target: NodeId,
        hello: &Message,
        out: &mut Vec<u8>,
    ) -> Verdict {
        if hello.kind != KIND_HELLO {
            return Verdict::Rejected(HandshakeError::Malformed { what: "expected hello" });
        }
        let local = self.local;
        let refusal = if hello.protocol != PROTOCOL_VERSION {
            Some((
                RejectReason::UnsupportedProtocol { version: PROTOCOL_VERSION },
                HandshakeError::UnsupportedProtocol { version: hello.protocol },
            ))
        } else if hello.cluster != local.cluster {
            Some((
                RejectReason::ForeignCluster { cluster: local.cluster },
                HandshakeError::ForeignCluster { expected: local.cluster, found: hello.cluster },
            ))
        } else if target != local.node {
            Some((
                RejectReason::WrongTarget { node: local.node },
                HandshakeError::WrongTarget { expected: local.node, found: target },
            ))
        } else if !members.contains(&hello.node) {
            Some((
                RejectReason::UnknownNode { node: hello.node },
                HandshakeError::UnknownNode { node: hello.node },
            ))
        } else {
            None
        };
        let answer = Message {
            kind: if refusal.is_some() { KIND_REJECT } else { KIND_ACCEPT },
            protocol: PROTOCOL_VERSION,
            cluster: local.cluster,
            node: local.node,
            reject: refusal.as_ref().map(|(reason, _)| *reason),
        };
        // Addressed in the initiator's cluster, so even a foreign node can read the reason.
        write(&header(hello.cluster, local.node, hello.node), &answer, out);
        match refusal {
            Some((_, error)) => Verdict::Rejected(error),
            None => Verdict::Accepted { peer: hello.node },
        }
    }
}

/// An established connection's framing: data frames from `local` to the peer and back, each
/// checked against the cluster, both node ids and the kind (no second handshake).
#[derive(Clone, Debug)]
pub struct Session {
    local: Identity,
    peer: NodeId,
    decoder: FrameDecoder,
}

impl Session {
    fn new(local: Identity, peer: NodeId) -> Self {
        let config = DecoderConfig {
            source: Some(peer),
            kind: Some(FrameKind::Data),
            ..DecoderConfig::new(local.cluster, local.node)
        };
        Self { local, peer, decoder: FrameDecoder::new(config) }
    }

    /// Sets the longest body accepted and sent (default [`frame::BODY_BYTES_MAX_DEFAULT`]); both nodes
    /// must use the same value.
    #[must_use]
    pub fn with_body_bytes_max(mut self, body_bytes_max: u32) -> Self {
        let config = DecoderConfig { body_bytes_max, ..*self.decoder.config() };
        self.decoder.set_config(config);
        self
    }

    /// This node.
    pub fn local(&self) -> Identity {
        self.local
    }

    /// The node at the other end.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The header of the data frames this side sends.
    pub fn header(&self) -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Data,
            cluster: self.local.cluster,
            source: self.local.node,
            target: self.peer,
        }
    }

    /// The longest body accepted and sent.
    pub fn body_bytes_max(&self) -> u32 {
        self.decoder.config().body_bytes_max
    }

    /// Appends a data frame carrying `body` to `out`.
    pub fn encode(&self, body: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
        frame::encode(&self.header(), body, out, self.body_bytes_max())
    }

    /// Appends a snapshot-stream frame carrying `body` to `out` (see [`super::snapshot`]).
    pub fn encode_snapshot(&self, body: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
        let header = FrameHeader { kind: FrameKind::Snapshot, ..self.header() };
        frame::encode(&header, body, out, self.body_bytes_max())
    }

    /// Completes a data frame begun with [`frame::begin`] at `start` in `out`.
    pub fn finish(&self, out: &mut Vec<u8>, start: usize) -> Result<(), FrameError> {
        frame::finish(&self.header(), out, start, self.body_bytes_max())
    }

    /// Takes the next data frame off `input` (see [`FrameDecoder::decode`]).
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        self.decoder.decode(input)
    }

    /// Says whether the stream may end here (see [`FrameDecoder::on_eof`]).
    pub fn on_eof(&self, input: &BytesMut) -> Result<(), FrameError> {
        self.decoder.on_eof(input)
    }
}

fn header(cluster: ClusterId, source: NodeId, target: NodeId) -> FrameHeader {
    FrameHeader { kind: FrameKind::Handshake, cluster, source, target }
}

fn write(header: &FrameHeader, message: &Message, out: &mut Vec<u8>) {
    let start = frame::begin(out);
    out.push(message.kind);
    out.extend_from_slice(&message.protocol.to_le_bytes());
    out.extend_from_slice(&message.cluster.0.to_le_bytes());
    out.extend_from_slice(&message.node.0.to_le_bytes());
    if let Some(reason) = message.reject {
        let (code, detail) = match reason {
            RejectReason::ForeignCluster { cluster } => (REASON_FOREIGN_CLUSTER, cluster.0),
            RejectReason::UnknownNode { node } => (REASON_UNKNOWN_NODE, node.0),
            RejectReason::WrongTarget { node } => (REASON_WRONG_TARGET, node.0),
            RejectReason::UnsupportedProtocol { version } => {
                (REASON_UNSUPPORTED_PROTOCOL, u64::from(version))
            }
        };
        out.push(code);
        out.extend_from_slice(&detail.to_le_bytes());
    }
    frame::finish(header, out, start, HANDSHAKE_BODY_BYTES_MAX)
        .expect("a handshake message fits its bound");
}

fn parse(body: &[u8]) -> Result<Message, HandshakeError> {
    let malformed = |what| HandshakeError::Malformed { what };
    let Some((fixed, rest)) = body.split_first_chunk::<MESSAGE_BYTES>() else {
        return Err(malformed("too short"));
    };
    let kind = fixed[0];
    let protocol = u16::from_le_bytes([fixed[1], fixed[2]]);
    let cluster = ClusterId(u64::from_le_bytes(fixed[3..11].try_into().expect("8 bytes")));
    let node = NodeId(u64::from_le_bytes(fixed[11..19].try_into().expect("8 bytes")));
    let reject = match kind {
        KIND_HELLO | KIND_ACCEPT if rest.is_empty() => None,
        KIND_REJECT => {
            let Ok(tail) = <[u8; 9]>::try_from(rest) else {
                return Err(malformed("reject of the wrong length"));
            };
            let detail = u64::from_le_bytes(tail[1..].try_into().expect("8 bytes"));
            Some(match tail[0] {
                REASON_FOREIGN_CLUSTER => {
                    RejectReason::ForeignCluster { cluster: ClusterId(detail) }
                }
                REASON_UNKNOWN_NODE => RejectReason::UnknownNode { node: NodeId(detail) },
                REASON_WRONG_TARGET => RejectReason::WrongTarget { node: NodeId(detail) },
                REASON_UNSUPPORTED_PROTOCOL => RejectReason::UnsupportedProtocol {
                    version: u16::try_from(detail)
                        .map_err(|_| malformed("version out of range"))?,
                },
                _ => return Err(malformed("unknown reject reason")),
            })
        }
        KIND_HELLO | KIND_ACCEPT => return Err(malformed("trailing bytes")),
        _ => return Err(malformed("unknown message kind")),
    };
    Ok(Message { kind, protocol, cluster, node, reject })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const CLUSTER: ClusterId = ClusterId(7);

    fn identity(node: u64) -> Identity {
        Identity { cluster: CLUSTER, node: NodeId(node) }
    }

    fn members() -> BTreeSet<NodeId> {
        [1, 2, 3].into_iter().map(NodeId).collect()
    }

    /// Runs both sides to their verdicts, `piece` bytes at a time each way.
    fn run(
        initiator: Identity,
        dial: NodeId,
        acceptor: Identity,
        piece: usize,
    ) -> (Verdict, Verdict, Handshake, Handshake) {
        let mut to_acceptor = Vec::new();
        let mut client = Handshake::initiate(initiator, dial, &mut to_acceptor);
        let mut server = Handshake::accept(acceptor, members());
        let mut to_initiator = Vec::new();
        let mut server_in = BytesMut::new();
        let mut server_verdict = None;
        for chunk in to_acceptor.chunks(piece) {
            server_in.extend_from_slice(chunk);
            server_verdict = server.on_bytes(&mut server_in, &mut to_initiator);
        }
        let server_verdict = server_verdict.expect("the whole hello gives a verdict");
        let mut client_in = BytesMut::new();
        let mut client_verdict = None;
        let mut unused = Vec::new();
        for chunk in to_initiator.chunks(piece) {
            client_in.extend_from_slice(chunk);
            client_verdict = client.on_bytes(&mut client_in, &mut unused);
        }
        assert!(unused.is_empty(), "the initiator answers nothing");
        let client_verdict = client_verdict.unwrap_or_else(|| client.on_eof());
        (client_verdict, server_verdict, client, server)
    }

    #[test]
    fn members_of_one_cluster_are_accepted_and_exchange_data() {
        let (client_verdict, server_verdict, client, server) =
            run(identity(1), NodeId(2), identity(2), 1);
        assert_eq!(client_verdict, Verdict::Accepted { peer: NodeId(2) });
        assert_eq!(server_verdict, Verdict::Accepted { peer: NodeId(1) });
        let client = client.into_session().unwrap();
        let mut server = server.into_session().unwrap();
        assert_eq!((client.peer(), server.peer()), (NodeId(2), NodeId(1)));
        let mut wire = Vec::new();
        client.encode(b"raft", &mut wire).unwrap();
        let mut input = BytesMut::from(&wire[..]);
        assert_eq!(&server.decode(&mut input).unwrap().unwrap().body[..], b"raft");
    }

    #[test]
    fn a_foreign_cluster_is_rejected_and_learns_why() {
        let foreign = Identity { cluster: ClusterId(99), node: NodeId(1) };
        let (client_verdict, server_verdict, ..) = run(foreign, NodeId(2), identity(2), 7);
        assert_eq!(
            server_verdict,
            Verdict::Rejected(HandshakeError::ForeignCluster {
                expected: CLUSTER,
                found: ClusterId(99)
            })
        );
        assert_eq!(
            client_verdict,
            Verdict::Rejected(HandshakeError::Rejected(RejectReason::ForeignCluster {
                cluster: CLUSTER
            }))
        );
    }

    #[test]
    fn an_unknown_node_is_rejected() {
        let (client_verdict, server_verdict, client, server) =
            run(identity(9), NodeId(2), identity(2), 100);
        assert_eq!(
            server_verdict,
            Verdict::Rejected(HandshakeError::UnknownNode { node: NodeId(9) })
        );
        assert_eq!(
            client_verdict,
            Verdict::Rejected(HandshakeError::Rejected(RejectReason::UnknownNode {
                node: NodeId(9)
            }))
        );
        assert_eq!(
            server.into_session().unwrap_err(),
            HandshakeError::UnknownNode { node: NodeId(9) }
        );
        assert!(client.into_session().is_err());
    }

    #[test]
    fn dialling_the_wrong_node_is_rejected() {
        let (client_verdict, server_verdict, ..) = run(identity(1), NodeId(3), identity(2), 5);
        assert_eq!(
            server_verdict,
            Verdict::Rejected(HandshakeError::WrongTarget {
                expected: NodeId(2),
                found: NodeId(3)
            })
        );
        assert_eq!(
            client_verdict,
            Verdict::Rejected(HandshakeError::Rejected(RejectReason::WrongTarget {
                node: NodeId(2)
            }))
        );
    }

    #[test]
    fn an_accept_from_another_node_is_refused() {
        // Node 3 answers a hello meant for node 2 (e.g. an address reused by another node) with
        // a well-formed accept: the initiator must not talk to it.
        let mut answer = Vec::new();
        let accept = Message {
            kind: KIND_ACCEPT,
            protocol: PROTOCOL_VERSION,
            cluster: CLUSTER,
            node: NodeId(3),
            reject: None,
        };
        write(&header(CLUSTER, NodeId(3), NodeId(1)), &accept, &mut answer);
        let mut client = Handshake::initiate(identity(1), NodeId(2), &mut Vec::new());
        assert_eq!(
            client.on_bytes(&mut BytesMut::from(&answer[..]), &mut Vec::new()),
            Some(Verdict::Rejected(HandshakeError::WrongPeer {
                expected: NodeId(2),
                found: NodeId(3)
            }))
        );
    }

    #[test]
    fn data_before_the_handshake_is_refused() {
        let mut data = Vec::new();
        let header = FrameHeader {
            kind: FrameKind::Data,
            cluster: CLUSTER,
            source: NodeId(1),
            target: NodeId(2),
        };
        frame::encode(&header, b"sneaky", &mut data, 64).unwrap();
        let mut server = Handshake::accept(identity(2), members());
        let mut out = Vec::new();
        assert_eq!(
            server.on_bytes(&mut BytesMut::from(&data[..]), &mut out),
            Some(Verdict::Rejected(HandshakeError::DataBeforeHandshake))
        );
        assert!(out.is_empty(), "no answer to a peer that skipped the handshake");
        // And once established, a second handshake frame is not data.
        let (.., server) = run(identity(1), NodeId(2), identity(2), 64);
        let mut session = server.into_session().unwrap();
        let mut hello = Vec::new();
        Handshake::initiate(identity(1), NodeId(2), &mut hello);
        assert_eq!(
            session.decode(&mut BytesMut::from(&hello[..])),
            Err(FrameError::WrongKind { expected: FrameKind::Data, found: FrameKind::Handshake })
        );
    }

    #[test]
    fn garbage_and_eof_are_rejected_without_an_answer() {
        let mut server = Handshake::accept(identity(2), members());
        let mut out = Vec::new();
        let verdict = server.on_bytes(&mut BytesMut::from(&b"\x16\x03\x01garbage"[..]), &mut out);
        assert!(matches!(
            verdict,
            Some(Verdict::Rejected(HandshakeError::Frame(FrameError::BadMagic { .. })))
        ));
        assert!(out.is_empty());
        let mut server = Handshake::accept(identity(2), members());
        assert_eq!(server.on_bytes(&mut BytesMut::from(&b"FLTF"[..]), &mut out), None);
        assert_eq!(server.on_eof(), Verdict::Rejected(HandshakeError::Closed));
        let server = Handshake::accept(identity(2), members());
        assert_eq!(server.into_session().unwrap_err(), HandshakeError::Incomplete);
    }

    #[test]
    fn a_hello_claiming_a_large_body_is_refused_at_its_header() {
        let mut hello = Vec::new();
        let body = [0; 65];
        frame::encode(&header(CLUSTER, NodeId(1), NodeId(2)), &body, &mut hello, 1 << 20).unwrap();
        let mut server = Handshake::accept(identity(2), members());
        let mut input = BytesMut::from(&hello[..frame::HEADER_BYTES]);
        assert_eq!(
            server.on_bytes(&mut input, &mut Vec::new()),
            Some(Verdict::Rejected(HandshakeError::Frame(FrameError::TooLarge {
                len: 65,
                max: HANDSHAKE_BODY_BYTES_MAX
            })))
        );
    }

    #[test]
    fn messages_round_trip() {
        let reasons = [
            RejectReason::ForeignCluster { cluster: ClusterId(5) },
            RejectReason::UnknownNode { node: NodeId(6) },
            RejectReason::WrongTarget { node: NodeId(7) },
            RejectReason::UnsupportedProtocol { version: 65535 },
        ];
        let mut messages: Vec<Message> = reasons
            .into_iter()
            .map(|reason| Message {
                kind: KIND_REJECT,
                protocol: 3,
                cluster: ClusterId(1),
                node: NodeId(2),
                reject: Some(reason),
            })
            .collect();
        for kind in [KIND_HELLO, KIND_ACCEPT] {
            messages.push(Message {
                kind,
                protocol: 1,
                cluster: ClusterId(u64::MAX),
                node: NodeId(4),
                reject: None,
            });
        }
        for message in messages {
            let mut out = Vec::new();
            write(&header(message.cluster, message.node, NodeId(0)), &message, &mut out);
            let frame = frame::decode_exact(&out, DecoderConfig::any()).unwrap();
            assert_eq!(parse(&frame.body), Ok(message));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_get_a_verdict_or_wait(
            bytes in proptest::collection::vec(any::<u8>(), 0..128),
            initiator: bool,
        ) {
            let mut out = Vec::new();
            let mut handshake = if initiator {
                Handshake::initiate(identity(1), NodeId(2), &mut out)
            } else {
                Handshake::accept(identity(2), members())
            };
            out.clear();
            let verdict = handshake.on_bytes(&mut BytesMut::from(&bytes[..]), &mut out);
            let accepted = matches!(verdict, Some(Verdict::Accepted { .. }));
            prop_assert!(!accepted);
        }

        #[test]
        fn the_handshake_completes_in_any_split(
            piece in 1usize..80,
            client in 1u64..4,
            server in 1u64..4,
        ) {
            let (client_verdict, server_verdict, ..) =
                run(identity(client), NodeId(server), identity(server), piece);
            prop_assert_eq!(client_verdict, Verdict::Accepted { peer: NodeId(server) });
            prop_assert_eq!(server_verdict, Verdict::Accepted { peer: NodeId(client) });
        }

        #[test]
        fn arbitrary_bodies_parse_or_fail(body in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(message) = parse(&body) {
                let mut out = Vec::new();
                write(&header(ClusterId(0), NodeId(0), NodeId(0)), &message, &mut out);
                prop_assert_eq!(&out[frame::HEADER_BYTES..out.len() - frame::TRAILER_BYTES], &body[..]);
            }
        }
    }
}

//! The server side of the client protocol ([`crate::client::codec`]), as `flotilla-node` runs
//! it: [`serve`] accepts connections and answers each request from an embedded [`Engine`].
//!
//! Per connection, one reader decodes frames and starts a task per request (at most
//! [`IN_FLIGHT_MAX`] at once: past that the reader stops reading, and TCP pushes back on the
//! client), and one writer sends the answers in the order they complete. A frame or request that
//! does not decode is answered with [`RemoteError::BadRequest`] and the connection is closed:
//! after bad bytes the stream's framing cannot be trusted.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use flotilla::kv::{self, Command, Query, QueryResult, StateMachine};
use flotilla::raftgroup::Role as EngineRole;
use flotilla::{Consistency, Engine, Error, GroupId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::client::codec::{
    FrameKind, ReadConsistency, RemoteError, Request, Response, Role, Stats, Status, decode_frame,
    encode_frame,
};

/// Requests one connection may have in flight before its reader stops reading.
pub const IN_FLIGHT_MAX: usize = 4096;

/// Accepts client connections on `listener` forever, answering from `engine`. Each connection
/// runs on its own tasks; this returns only if accepting fails.
pub async fn serve(engine: Engine, listener: TcpListener) -> std::io::Error {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(engine.clone(), stream));
            }
            // Out of descriptors or a connection reset before accept: transient, keep serving.
            Err(error) if is_transient(&error) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => return error,
        }
    }
}

fn is_transient(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    ) || error.raw_os_error().is_some_and(|code| code == 24 || code == 23) // EMFILE, ENFILE
}

/// One client connection: the reader loop here, the writer on its own task.
async fn connection(engine: Engine, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let (answers, mut outbox) = mpsc::channel::<(u64, Response)>(IN_FLIGHT_MAX);
    let writer_task = tokio::spawn(async move {
        let mut batch = Vec::new();
        let mut body = Vec::new();
        while let Some(first) = outbox.recv().await {
            batch.clear();
            let mut next = Some(first);
            while let Some((id, response)) = next {
                body.clear();
                response.encode_bounded(&mut body);
                encode_frame(FrameKind::Response, id, &body, &mut batch);
                next = if batch.len() < (256 << 10) { outbox.try_recv().ok() } else { None };
            }
            if writer.write_all(&batch).await.is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    });
    let permits = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    let mut buffer = BytesMut::with_capacity(64 << 10);
    loop {
        let frame = match decode_frame(&mut buffer) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                buffer.reserve(64 << 10);
                match reader.read_buf(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
            Err(error) => {
                let _ = answers.send((0, bad_request(error.to_string()))).await;
                break;
            }
        };
        if frame.kind != FrameKind::Request {
            let _ = answers.send((frame.id, bad_request("a response frame from a client"))).await;
            break;
        }
        let request = match Request::decode(&frame.body) {
            Ok(request) => request,
            Err(error) => {
                let _ = answers.send((frame.id, bad_request(error.to_string()))).await;
                break;
            }
        };
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { break };
        let engine = engine.clone();
        let answers = answers.clone();
        tokio::spawn(async move {
            let response = answer(&engine, request).await;
            let _ = answers.send((frame.id, response)).await;
            drop(permit);
        });
    }
    // The writer ends once every request task has sent its answer (each holds a sender).
    drop(answers);
    let _ = writer_task.await;
}

fn bad_request(text: impl Into<String>) -> Response {
    Response::Error(RemoteError::BadRequest(text.into()))
}

/// Runs one request against the engine.
pub async fn answer(engine: &Engine, request: Request) -> Response {
    match run(engine, request).await {
        Ok(response) => response,
        Err(error) => Response::Error(remote_error(error)),
    }
}

async fn run(engine: &Engine, request: Request) -> Result<Response, Error> {
    Ok(match request {
        Request::Put { group, key, value } => {
            let (index, _) = propose(engine, group, Command::Put { key, value }).await?;
            Response::Written { index }
        }
        Request::Delete { group, key } => {
            let (index, outcome) = propose(engine, group, Command::Delete { key }).await?;
            match outcome {
                kv::Outcome::Deleted { existed } => Response::Deleted { index, existed },
                other => return Err(Error::Rejected(format!("delete answered {other:?}"))),
            }
        }
        Request::CompareAndSet { group, key, expected, new } => {
            let command = Command::CompareAndSet { key, expected, new };
            let (index, outcome) = propose(engine, group, command).await?;
            match outcome {
                kv::Outcome::Swapped => Response::Swapped { index },
                kv::Outcome::Mismatch { actual } => Response::Mismatch { index, actual },
                other => {
                    return Err(Error::Rejected(format!("compare-and-set answered {other:?}")));
                }
            }
        }
        Request::Get { group, consistency, key } => {
            let consistency = match consistency {
                ReadConsistency::Linearizable => Consistency::Linearizable,
                ReadConsistency::Lease => Consistency::Lease,
                ReadConsistency::Stale { max_lag_ms } => {
                    Consistency::Stale { max_lag: Duration::from_millis(max_lag_ms) }
                }
            };
            match engine.read(GroupId(group), Query::Get { key }, consistency).await? {
                QueryResult::Value(value) => Response::Value(value),
                other @ QueryResult::Range { .. } => {
                    return Err(Error::Rejected(format!("get answered {other:?}")));
                }
            }
        }
        Request::Status { group } => {
            let status = engine.status(GroupId(group)).await?;
            Response::Status(Status {
                role: match status.role {
                    EngineRole::Follower => Role::Follower,
                    EngineRole::PreCandidate => Role::PreCandidate,
                    EngineRole::Candidate => Role::Candidate,
                    EngineRole::Leader => Role::Leader,
                },
                leader: status.leader.map(|node| node.0),
                term: status.term.0,
                commit: status.commit.0,
                applied: status.applied.0,
                last_index: status.last_index.0,
            })
        }
        Request::Stats => {
            let shards = engine.shard_stats().await?;
            let mut stats = Stats {
                node: engine.node().0,
                backend: engine.backends().first().map_or("none", |b| b.name()).to_string(),
                shards: u32::try_from(shards.len()).unwrap_or(u32::MAX),
                groups: 0,
                leaders: 0,
                fdatasyncs: 0,
                entries: 0,
                frames: 0,
                messages: 0,
            };
            for shard in shards {
                stats.groups += shard.groups as u64;
                stats.leaders += shard.leaders as u64;
                stats.fdatasyncs += shard.wal.fdatasyncs;
                stats.entries += shard.wal.entries;
                stats.frames += shard.frames_sent;
                stats.messages += shard.messages_sent;
            }
            Response::Stats(stats)
        }
        Request::Dump { group } => {
            let dump = engine
                .inspect(GroupId(group), |machine| {
                    let entries: Vec<_> = machine
                        .iter()
                        .map(|(key, value)| (Bytes::copy_from_slice(key), value.clone()))
                        .collect();
                    (machine.applied_index().0, entries)
                })
                .await?;
            match dump {
                Some((applied, entries)) => Response::Dump { applied, entries },
                None => return Err(Error::GroupNotFound(GroupId(group))),
            }
        }
    })
}

/// Proposes an unsessioned command; returns its log index and outcome.
async fn propose(
    engine: &Engine,
    group: u64,
    command: Command,
) -> Result<(u64, kv::Outcome), Error> {
    let applied = engine.propose_kv(GroupId(group), kv::Request::Unsessioned(command)).await?;
    match applied.response {
        Ok(kv::Reply::Done(outcome)) => Ok((applied.index.0, outcome)),
        Ok(other) => Err(Error::Rejected(format!("the state machine answered {other:?}"))),
        Err(error) => Err(Error::Rejected(error.to_string())),
    }
}

/// The engine's error on the wire.
pub fn remote_error(error: Error) -> RemoteError {
    match error {
        Error::NotLeader { leader_hint } => {
            RemoteError::NotLeader { hint: leader_hint.map(|n| n.0) }
        }
        Error::NoQuorum => RemoteError::NoQuorum,
        Error::GroupNotFound(group) => RemoteError::GroupNotFound { group: group.0 },
        Error::Busy => RemoteError::Busy,
        Error::ShuttingDown => RemoteError::ShuttingDown,
        // Both say "may have been applied": the wire keeps one name for it.
        Error::Timeout | Error::OutcomeUnknown => RemoteError::Timeout,
        Error::ProposalDropped => RemoteError::ProposalDropped,
        Error::InvalidArgument(text) | Error::Config(text) => RemoteError::InvalidArgument(text),
        Error::Storage(text) => RemoteError::Storage(text.to_string()),
        other => RemoteError::Rejected(other.to_string()),
    }
}

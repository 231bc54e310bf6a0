//! Snapshot transfer between nodes, the IO half of [`crate::transport::snapshot`]: a sender task
//! per (shard, peer) streaming groups' snapshot files, the receiving side of a snapshot
//! connection spooling them to disk, the node-wide rate limit both directions share, and the
//! counters.
//!
//! Memory stays bounded on both sides whatever the snapshot's size: the sender reads the file
//! through a memory map one chunk at a time, the receiver writes each chunk to the spool file
//! as it arrives, and the group receives the snapshot as a map of that file.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_raftgroup::codec;
use flotilla_raftgroup::{LogIndex, Message, MessageBody, Snapshot};
use flotilla_wal::GroupId;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::driver::Request;
use super::store::{self, StoreError};
use crate::engine::{EngineConfig, shard_of};
use crate::kv::StateMachine;
use crate::transport::connection::{Connection, ConnectionConfig, ConnectionError};
use crate::transport::faults::{Faults, Verdict};
use crate::transport::handshake::Identity;
use crate::transport::snapshot::{RefuseReason, StreamId, StreamMessage};

/// Snapshots queued per sender before newer ones are dropped (Raft offers again).
pub(crate) const QUEUE_MAX: usize = 1024;
/// How long an answer may take: a receiver verifies the whole file before `Installed`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts per offer before the sender gives up on it (the leader offers again later).
const ATTEMPTS_MAX: u32 = 5;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a sender waits for the group's snapshot file to catch up with the snapshot Raft
/// offers (the replica compacts before the file is written off the shard thread).
const FILE_WAIT: Duration = Duration::from_secs(5);
/// Unused tokens a quiet limiter keeps: how far a stream may burst after a pause.
const BURST: Duration = Duration::from_millis(100);
/// How long a sender remembers a snapshot installed, to ignore Raft's late offers of it.
const INSTALLED_MEMORY: Duration = Duration::from_secs(10);

/// Counters of this node's snapshot transfers, both directions, since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotTransferStats {
    /// Snapshot bytes sent to peers (chunks only).
    pub sent_bytes: u64,
    /// Snapshot bytes received from peers and written to spool files.
    pub received_bytes: u64,
    /// Bytes a sender did not send because the receiver already held them (resumed streams).
    pub resumed_bytes: u64,
    /// Streams the receiver confirmed as installed.
    pub sent: u64,
    /// Streams this node received whole, verified and handed to their group.
    pub received: u64,
    /// Streams that ended without being installed (refused, failed verification, gave up).
    pub failed: u64,
}

/// One counter, kept both for [`Transfers::stats`] and for the `metrics` facade.
struct Tally {
    value: AtomicU64,
    metric: metrics::Counter,
}

impl Tally {
    fn new(name: &'static str) -> Self {
        Self { value: AtomicU64::new(0), metric: metrics::counter!(name) }
    }

    fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
        self.metric.increment(n);
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

struct Counters {
    sent_bytes: Tally,
    received_bytes: Tally,
    resumed_bytes: Tally,
    sent: Tally,
    received: Tally,
    failed: Tally,
}

impl Counters {
    fn new() -> Self {
        Self {
            sent_bytes: Tally::new("flotilla_snapshot_sent_bytes_total"),
            received_bytes: Tally::new("flotilla_snapshot_received_bytes_total"),
            resumed_bytes: Tally::new("flotilla_snapshot_resumed_bytes_total"),
            sent: Tally::new("flotilla_snapshots_sent_total"),
            received: Tally::new("flotilla_snapshots_received_total"),
            failed: Tally::new("flotilla_snapshot_transfers_failed_total"),
        }
    }
}

/// A token bucket over bytes: `acquire(n)` returns once `n` more bytes fit in the rate. One per
/// node for outgoing snapshots, so the bandwidth snapshots take is bounded however many groups
/// and peers stream at once.
pub struct RateLimiter {
    bytes_per_sec: u64,
    /// When the bytes granted so far will have drained at the rate.
    next_free: Mutex<Instant>,
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` (0: unlimited).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self { bytes_per_sec, next_free: Mutex::new(Instant::now()) }
    }

    /// How long the caller must wait before sending `n` bytes; books them.
    fn book(&self, n: u64, now: Instant) -> Duration {
        if self.bytes_per_sec == 0 {
            return Duration::ZERO;
        }
        let cost = Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        let mut next_free = self.next_free.lock();
        let start = (*next_free).max(now.checked_sub(BURST).unwrap_or(now));
        *next_free = start + cost;
        (start + cost).saturating_duration_since(now + BURST)
    }

    /// Waits until `n` more bytes fit in the rate.
    pub async fn acquire(&self, n: u64) {
        let wait = self.book(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// What one node's shards share for snapshot transfer.
pub(crate) struct Transfers {
    pub limiter: RateLimiter,
    counters: Counters,
}

impl Transfers {
    pub fn new(config: &EngineConfig) -> Self {
        Self { limiter: RateLimiter::new(config.snapshot_bytes_per_sec), counters: Counters::new() }
    }

    pub fn stats(&self) -> SnapshotTransferStats {
        let c = &self.counters;
        SnapshotTransferStats {
            sent_bytes: c.sent_bytes.get(),
            received_bytes: c.received_bytes.get(),
            resumed_bytes: c.resumed_bytes.get(),
            sent: c.sent.get(),
            received: c.received.get(),
            failed: c.failed.get(),
        }
    }
}

/// A snapshot Raft wants sent: the message (its data is ignored; the file is sent) and where
/// the group's snapshot file lives.
pub(crate) struct Job {
    pub group: GroupId,
    pub message: Message,
    pub path: PathBuf,
    attempts: u32,
}

impl Job {
    pub fn new(group: GroupId, message: Message, path: PathBuf) -> Self {
        Self { group, message, path, attempts: 0 }
    }

    fn index(&self) -> LogIndex {
        match &self.message.body {
            MessageBody::Snapshot { snapshot } => snapshot.meta.index,
            _ => LogIndex::ZERO,
        }
    }
}

/// Why one stream attempt ended.
enum Failure {
    /// The connection or the peer failed: try again after a backoff, resuming.
    Retry(String),
    /// This offer cannot succeed (no file, refused): drop it; Raft offers again.
    GiveUp(String),
    /// The receiver refuses files this large (`EngineConfig::snapshot_bytes_max`): Raft's
    /// later offers of the same snapshot are not streamed either.
    TooLarge,
}

impl From<ConnectionError> for Failure {
    fn from(error: ConnectionError) -> Self {
        Self::Retry(error.to_string())
    }
}

/// Streams the snapshots queued on `jobs` to `peer`, one at a time, on a connection of its own.
/// A newer offer for a group replaces a queued older one; one for a group already queued or
/// streaming is dropped (Raft re-offers a snapshot every election timeout until it lands).
pub(crate) async fn send_snapshots(
    identity: Identity,
    peer: flotilla_raftgroup::NodeId,
    addr: SocketAddr,
    mut jobs: mpsc::Receiver<Job>,
    faults: Option<Arc<Faults>>,
    transfers: Arc<Transfers>,
    chunk_bytes: usize,
) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut connection: Option<Connection> = None;
    let mut backoff = BACKOFF_MIN;
    // Snapshots installed lately, per group: Raft keeps offering a snapshot every election
    // timeout until the follower's answer reaches it, and those late offers must not send the
    // whole file again.
    let mut installed: HashMap<GroupId, (LogIndex, Instant)> = HashMap::new();
    // Snapshots the peer refused as too large, per group: offered again by Raft every election
    // timeout, each would be mapped and verified whole only to be refused again. A newer
    // snapshot of the group is tried once more.
    let mut too_large: HashMap<GroupId, LogIndex> = HashMap::new();
    loop {
        if queue.is_empty() {
            match jobs.recv().await {
                Some(job) => queue.push_back(job),
                None => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            match queue.iter_mut().find(|queued| queued.group == job.group) {
                Some(queued) if queued.index() < job.index() => *queued = job,
                Some(_) => {}
                None => queue.push_back(job),
            }
        }
        let now = Instant::now();
        installed.retain(|_, (_, at)| now.duration_since(*at) < INSTALLED_MEMORY);
        let Some(mut job) = queue.pop_front() else { continue };
        if installed.get(&job.group).is_some_and(|(index, _)| job.index() <= *index)
            || too_large.get(&job.group).is_some_and(|index| job.index() <= *index)
        {
            continue;
        }
        let counters = &transfers.counters;
        let link = Link {
            identity,
            peer,
            addr,
            faults: faults.as_deref(),
            transfers: &transfers,
            chunk_bytes,
        };
        match link.stream(&mut connection, &job).await {
            Ok(id) => {
                installed.insert(id.group, (id.index, Instant::now()));
                counters.sent.add(1);
                backoff = BACKOFF_MIN;
            }
            Err(Failure::GiveUp(why)) => {
                tracing::info!(%peer, group = %job.group, %why, "snapshot not sent");
                counters.failed.add(1);
            }
            Err(Failure::TooLarge) => {
                tracing::error!(
                    %peer,
                    group = %job.group,
                    index = job.index().0,
                    "snapshot refused as larger than the peer's snapshot_bytes_max: the peer \
                     cannot catch up until the limit is raised or the state shrinks"
                );
                counters.failed.add(1);
                too_large.insert(job.group, job.index());
            }
            Err(Failure::Retry(why)) => {
                connection = None;
                job.attempts += 1;
                tracing::debug!(%peer, group = %job.group, %why, attempt = job.attempts, "snapshot stream cut");
                if job.attempts < ATTEMPTS_MAX {
                    queue.push_front(job);
                } else {
                    counters.failed.add(1);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// The group's snapshot file, mapped and verified (its bytes, and the snapshot in them), once
/// it covers what Raft offers.
async fn open_file(job: &Job) -> Result<(Bytes, Snapshot), Failure> {
    let deadline = Instant::now() + FILE_WAIT;
    loop {
        let (path, group) = (job.path.clone(), job.group);
        let mapped =
            tokio::task::spawn_blocking(move || store::map_snapshot_whole(&path, group)).await;
        match mapped {
            Ok(Ok((whole, snapshot))) if snapshot.meta.index >= job.index() => {
                return Ok((whole, snapshot));
            }
            Ok(Ok(_) | Err(StoreError::Io { .. })) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(Ok((_, snapshot))) => {
                return Err(Failure::GiveUp(format!(
                    "the snapshot file is at {}, behind the {} offered",
                    snapshot.meta.index,
                    job.index()
                )));
            }
            Ok(Err(error)) => return Err(Failure::GiveUp(error.to_string())),
            Err(error) => return Err(Failure::GiveUp(format!("mapping the file: {error}"))),
        }
    }
}

/// What one sender streams over: its peer, the fault hook, the node's limiter.
struct Link<'a> {
    identity: Identity,
    peer: flotilla_raftgroup::NodeId,
    addr: SocketAddr,
    faults: Option<&'a Faults>,
    transfers: &'a Transfers,
    chunk_bytes: usize,
}

impl Link<'_> {
    /// One attempt at sending `job`: connect if needed, offer, send what the receiver lacks, wait
    /// for it to confirm.
    async fn stream(
        &self,
        connection: &mut Option<Connection>,
        job: &Job,
    ) -> Result<StreamId, Failure> {
        let Self { identity, peer, addr, transfers, chunk_bytes, .. } = *self;
        let (whole, file) = open_file(job).await?;
        // The file may be newer than what Raft offered: send the file's snapshot (the follower
        // answers with the index it installed, and the leader goes on from there).
        let mut message = job.message.clone();
        message.body = MessageBody::Snapshot {
            snapshot: Snapshot { meta: file.meta.clone(), data: Bytes::new() },
        };
        let mut raft = Vec::new();
        codec::encode(&message, &mut raft);
        let id = StreamId { group: job.group, index: file.meta.index, term: file.meta.term };
        let file_len = whole.len() as u64;
        let file_crc = store::file_crc(&whole);

        if self.cut().await {
            return Err(Failure::Retry("link cut by the fault hook".into()));
        }
        if connection.is_none() {
            let config = ConnectionConfig::new(identity);
            match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(addr, peer, config))
                .await
            {
                Ok(Ok(established)) => *connection = Some(established),
                Ok(Err(error)) => return Err(error.into()),
                Err(_) => return Err(Failure::Retry("connect timed out".into())),
            }
        }
        let live = connection.as_mut().expect("connected above");
        let mut body = Vec::with_capacity(chunk_bytes + 64);
        StreamMessage::Offer { id, file_len, file_crc, raft: Bytes::from(raft) }.encode(&mut body);
        live.send_snapshot(&body).await?;
        let offset = match answer(live, id).await? {
            StreamMessage::Resume { offset, .. } if offset <= file_len => offset,
            other => return Err(unexpected(&other)),
        };
        transfers.counters.resumed_bytes.add(offset);
        let mut at = offset;
        while at < file_len {
            let end = (at + chunk_bytes as u64).min(file_len);
            if self.cut().await {
                return Err(Failure::Retry("link cut by the fault hook".into()));
            }
            transfers.limiter.acquire(end - at).await;
            body.clear();
            // `at..end` is within the file: both are at most `file_len`, the map's length.
            let data = whole.slice(at as usize..end as usize);
            StreamMessage::Chunk { id, offset: at, data }.encode(&mut body);
            live.send_snapshot(&body).await?;
            transfers.counters.sent_bytes.add(end - at);
            at = end;
        }
        match answer(live, id).await? {
            StreamMessage::Installed { .. } => Ok(id),
            other => Err(unexpected(&other)),
        }
    }

    /// Whether the fault hook cuts the link to the peer (a delay is served here).
    async fn cut(&self) -> bool {
        match self.faults.map_or(Verdict::Deliver, |f| f.verdict(self.identity.node, self.peer)) {
            Verdict::Deliver => false,
            Verdict::Drop => true,
            Verdict::Delay(delay) => {
                tokio::time::sleep(delay).await;
                false
            }
        }
    }
}

/// Waits for the receiver's answer about `id`, bounded by [`ANSWER_TIMEOUT`].
async fn answer(connection: &mut Connection, id: StreamId) -> Result<StreamMessage, Failure> {
    let frame = match tokio::time::timeout(ANSWER_TIMEOUT, connection.recv()).await {
        Ok(frame) => frame?,
        Err(_) => return Err(Failure::Retry("no answer from the receiver".into())),
    };
    match StreamMessage::decode(&frame.body) {
        Ok(message) if message.id() == id => Ok(message),
        Ok(message) => Err(Failure::Retry(format!("answer about another snapshot: {message:?}"))),
        Err(error) => Err(Failure::Retry(format!("bad answer: {error}"))),
    }
}

fn unexpected(message: &StreamMessage) -> Failure {
    match message {
        StreamMessage::Refused { reason: RefuseReason::TooLarge, .. } => Failure::TooLarge,
        StreamMessage::Refused { reason, .. } => Failure::GiveUp(format!("refused: {reason:?}")),
        other => Failure::Retry(format!("unexpected answer {other:?}")),
    }
}

/// A file being received on one snapshot connection.
struct Incoming {
    id: StreamId,
    file_len: u64,
    file_crc: u32,
    /// The Raft message to deliver with the file's data.
    raft: Message,
    spool: PathBuf,
    file: Arc<fs::File>,
    written: u64,
}

/// The receiving side of one snapshot connection: spools offered files chunk by chunk and hands
/// each complete, verified one to the shard owning its group.
pub(crate) struct Receiver<S: StateMachine> {
    config: Arc<EngineConfig>,
    routes: Arc<[mpsc::Sender<Request<S>>]>,
    transfers: Arc<Transfers>,
    peer: flotilla_raftgroup::NodeId,
    incoming: Option<Incoming>,
}

impl<S: StateMachine> Receiver<S> {
    pub fn new(
        config: Arc<EngineConfig>,
        routes: Arc<[mpsc::Sender<Request<S>>]>,
        transfers: Arc<Transfers>,
        peer: flotilla_raftgroup::NodeId,
    ) -> Self {
        Self { config, routes, transfers, peer, incoming: None }
    }

    /// Handles one snapshot-stream frame body. An error is a protocol violation: the caller
    /// closes the connection (what was spooled stays, for a resumed stream).
    pub async fn on_frame(
        &mut self,
        body: &Bytes,
        connection: &mut Connection,
    ) -> Result<(), String> {
        match StreamMessage::decode(body).map_err(|error| error.to_string())? {
            StreamMessage::Offer { id, file_len, file_crc, raft } => {
                let raft = self.check_offer(id, &raft)?;
                if file_len > self.config.snapshot_bytes_max {
                    tracing::warn!(
                        peer = %self.peer,
                        group = %id.group,
                        file_len,
                        max = self.config.snapshot_bytes_max,
                        "snapshot offer larger than snapshot_bytes_max refused"
                    );
                    self.transfers.counters.failed.add(1);
                    let refused = StreamMessage::Refused { id, reason: RefuseReason::TooLarge };
                    return reply(connection, refused).await;
                }
                let shard = shard_of(id.group, self.routes.len());
                let path =
                    store::snapshot_file(&super::driver::shard_dir(&self.config, shard), id.group);
                let opened =
                    tokio::task::spawn_blocking(move || open_spool(&path, id, file_len, file_crc))
                        .await
                        .map_err(|error| error.to_string())?;
                let (spool, file, offset) = match opened {
                    Ok(opened) => opened,
                    Err(error) => {
                        tracing::warn!(peer = %self.peer, group = %id.group, %error, "cannot spool a snapshot");
                        return reply(
                            connection,
                            StreamMessage::Refused { id, reason: RefuseReason::Storage },
                        )
                        .await;
                    }
                };
                tracing::debug!(
                    peer = %self.peer,
                    group = %id.group,
                    index = id.index.0,
                    file_len,
                    offset,
                    "snapshot offered"
                );
                self.incoming = Some(Incoming {
                    id,
                    file_len,
                    file_crc,
                    raft,
                    spool,
                    file: Arc::new(file),
                    written: offset,
                });
                reply(connection, StreamMessage::Resume { id, offset }).await?;
                if offset == file_len {
                    self.finish(connection).await?;
                }
                Ok(())
            }
            StreamMessage::Chunk { id, offset, data } => {
                let incoming = self.incoming.as_mut().ok_or("a chunk without an offer")?;
                let len = data.len() as u64;
                if id != incoming.id
                    || offset != incoming.written
                    || incoming.file_len - incoming.written < len
                {
                    return Err(format!("chunk {id:?}@{offset}+{len} does not follow the stream"));
                }
                let file = Arc::clone(&incoming.file);
                let written = tokio::task::spawn_blocking(move || file.write_all_at(&data, offset))
                    .await
                    .map_err(|error| error.to_string())?;
                if let Err(error) = written {
                    tracing::warn!(peer = %self.peer, group = %id.group, %error, "cannot spool a snapshot chunk");
                    self.incoming = None;
                    return reply(
                        connection,
                        StreamMessage::Refused { id, reason: RefuseReason::Storage },
                    )
                    .await;
                }
                incoming.written += len;
                self.transfers.counters.received_bytes.add(len);
                if incoming.written == incoming.file_len {
                    self.finish(connection).await?;
                }
                Ok(())
            }
            other => Err(format!("unexpected {other:?} from the sender")),
        }
    }

    /// The offer's Raft message, checked: a snapshot from the peer to this node, naming the
    /// offered snapshot, with no data of its own.
    fn check_offer(&self, id: StreamId, raft: &[u8]) -> Result<Message, String> {
        let message =
            codec::decode(raft).map_err(|error| format!("offer's raft message: {error}"))?;
        let MessageBody::Snapshot { snapshot } = &message.body else {
            return Err("offer's raft message is not a snapshot".into());
        };
        if message.from != self.peer
            || message.to != self.config.node
            || snapshot.meta.index != id.index
            || snapshot.meta.term != id.term
            || !snapshot.data.is_empty()
        {
            return Err(format!("offer's raft message does not match the offer {id:?}"));
        }
        Ok(message)
    }

    /// The whole file is spooled: sync and verify it, hand the snapshot to its group, confirm.
    async fn finish(&mut self, connection: &mut Connection) -> Result<(), String> {
        let incoming = self.incoming.take().expect("finishing a stream in progress");
        let id = incoming.id;
        let (file, spool) = (Arc::clone(&incoming.file), incoming.spool.clone());
        let (file_len, file_crc) = (incoming.file_len, incoming.file_crc);
        let verified = tokio::task::spawn_blocking(move || -> Result<Snapshot, String> {
            file.sync_all().map_err(|error| format!("syncing: {error}"))?;
            let (whole, snapshot) = store::map_snapshot_file(&file, &spool, id.group)
                .map_err(|error| error.to_string())?;
            let crc = store::file_crc(&whole);
            if whole.len() as u64 != file_len
                || crc != file_crc
                || snapshot.meta.index != id.index
                || snapshot.meta.term != id.term
            {
                return Err("the file received is not the one offered".into());
            }
            Ok(snapshot)
        })
        .await
        .map_err(|error| error.to_string())?;
        let snapshot = match verified {
            Ok(snapshot) => snapshot,
            Err(error) => {
                tracing::warn!(peer = %self.peer, group = %id.group, %error, "snapshot received does not verify");
                self.transfers.counters.failed.add(1);
                discard_spool(&incoming.spool, &incoming.file);
                return reply(
                    connection,
                    StreamMessage::Refused { id, reason: RefuseReason::Corrupt },
                )
                .await;
            }
        };
        let mut message = incoming.raft;
        message.body = MessageBody::Snapshot { snapshot };
        let shard = &self.routes[shard_of(id.group, self.routes.len())];
        if shard.send(Request::Messages(self.peer, vec![(id.group, message)])).await.is_err() {
            return Err("the shard is gone".into());
        }
        self.transfers.counters.received.add(1);
        reply(connection, StreamMessage::Installed { id }).await
    }
}

async fn reply(connection: &mut Connection, message: StreamMessage) -> Result<(), String> {
    let mut body = Vec::with_capacity(64);
    message.encode(&mut body);
    connection.send_snapshot(&body).await.map_err(|error| error.to_string())
}

/// The identity record of a spooled file: index, term, length and checksum of the file offered.
fn spool_record(id: StreamId, file_len: u64, file_crc: u32) -> [u8; 28] {
    let mut record = [0u8; 28];
    record[..8].copy_from_slice(&id.index.0.to_le_bytes());
    record[8..16].copy_from_slice(&id.term.0.to_le_bytes());
    record[16..24].copy_from_slice(&file_len.to_le_bytes());
    record[24..].copy_from_slice(&file_crc.to_le_bytes());
    record
}

/// Opens the spool file for the snapshot file at `path`: the one already there, with how many
/// bytes it holds, if it is the same file offered; a new empty one otherwise. Blocking.
fn open_spool(
    path: &Path,
    id: StreamId,
    file_len: u64,
    file_crc: u32,
) -> Result<(PathBuf, fs::File, u64), StoreError> {
    let spool = store::spool_path(path);
    let id_path = store::spool_id_path(path);
    let record = spool_record(id, file_len, file_crc);
    if fs::read(&id_path).is_ok_and(|stored| stored == record)
        && let Ok(file) = fs::OpenOptions::new().write(true).read(true).open(&spool)
        && let Ok(meta) = file.metadata()
        && meta.len() <= file_len
    {
        return Ok((spool, file, meta.len()));
    }
    // Unlinked, never truncated: a snapshot handed out earlier may still be mapped from it.
    match fs::remove_file(&spool) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(store::io_error("removing", &spool)(error));
        }
        _ => {}
    }
    fs::create_dir_all(spool.parent().expect("a file in a directory"))
        .map_err(store::io_error("creating", &spool))?;
    let file = fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .open(&spool)
        .map_err(store::io_error("creating", &spool))?;
    // Not synced: a record that outlives its file's bytes after a crash only makes the resumed
    // file fail verification, and the next offer starts over.
    fs::write(&id_path, record).map_err(store::io_error("writing", &id_path))?;
    Ok((spool, file, 0))
}

/// Removes a spool file that failed verification, if `file` is still the one at `spool` (another
/// stream of the same group may have replaced it), so the next offer starts over.
fn discard_spool(spool: &Path, file: &fs::File) {
    use std::os::unix::fs::MetadataExt;
    let ours = file.metadata().ok().map(|meta| (meta.dev(), meta.ino()));
    let there = fs::metadata(spool).ok().map(|meta| (meta.dev(), meta.ino()));
    if ours.is_some() && ours == there {
        let _ = fs::remove_file(spool);
    }
}

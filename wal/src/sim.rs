//! A simulated disk for tests: it keeps written-but-unsynced bytes apart from durable ones, can
//! crash (keeping none, all, a prefix or a random subset of the unsynced writes, and tearing the
//! last one kept), and can fail chosen operations with EIO or ENOSPC.
//!
//! Directory operations (create, rename, remove) are durable only after `sync_dir`, as on a real
//! filesystem. After [`SimStorage::crash`] the old handle and every file opened through it fail all
//! operations, so a log that was running cannot touch the crash image.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::io::{Storage, StorageFile};
use crate::segment::ReadView;

/// Kinds of operations the simulated disk counts and can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SimOp {
    /// A write into a file.
    Write,
    /// An fdatasync of a file.
    Sync,
    /// Creating a pre-written file.
    Create,
    /// A rename.
    Rename,
    /// A removal.
    Remove,
    /// A directory sync.
    SyncDir,
    /// A read.
    Read,
}

/// The error a failed operation returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SimError {
    /// `EIO`.
    Io,
    /// `ENOSPC`.
    NoSpace,
}

impl SimError {
    fn to_io(self) -> io::Error {
        match self {
            SimError::Io => io::Error::from_raw_os_error(libc::EIO),
            SimError::NoSpace => io::Error::from_raw_os_error(libc::ENOSPC),
        }
    }
}

/// What survives a crash of the unsynced writes of each file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// No unsynced write survives.
    None,
    /// Every unsynced write survives.
    All,
    /// The first `n` unsynced writes of each file survive, in order.
    Prefix(usize),
    /// A random subset chosen from `seed` (pages may reach the disk in any order).
    Random(u64),
}

/// How a simulated crash treats unsynced data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashMode {
    /// Which unsynced writes survive.
    pub keep: Keep,
    /// Tear the last surviving write of each file: keep a random-length prefix of it, and fill the
    /// 512-byte sector where the cut falls with garbage.
    pub tear_last: Option<u64>,
}

#[derive(Debug, Clone, Default)]
struct SimFileState {
    /// Contents as a reader sees them now (unsynced writes applied).
    current: Vec<u8>,
    /// Contents that survive any crash.
    durable: Vec<u8>,
    /// Writes since the last sync, in order: `(offset, bytes)`.
    unsynced: Vec<(u64, Vec<u8>)>,
}

#[derive(Debug, Default)]
struct SimState {
    files: BTreeMap<u64, SimFileState>,
    names: BTreeMap<String, u64>,
    durable_names: BTreeMap<String, u64>,
    next_inode: u64,
    /// Fail the operation whose running count (over all kinds) equals the key.
    fail_at: BTreeMap<u64, SimError>,
    /// Fail every operation of this kind from now on.
    fail_kind: BTreeMap<SimOp, SimError>,
    /// Fail every operation after this many (the disk died).
    fail_after: Option<u64>,
    ops: u64,
    op_counts: BTreeMap<SimOp, u64>,
    locked: bool,
    crashed: bool,
    /// Bytes a create may still use before it fails with ENOSPC.
    space_bytes: Option<u64>,
}

impl SimState {
    fn begin(&mut self, op: SimOp) -> io::Result<()> {
        if self.crashed {
            return Err(io::Error::other("simulated disk crashed"));
        }
        self.ops += 1;
        *self.op_counts.entry(op).or_default() += 1;
        if let Some(error) = self.fail_at.remove(&self.ops) {
            return Err(error.to_io());
        }
        if let Some(error) = self.fail_kind.get(&op) {
            return Err(error.to_io());
        }
        if self.fail_after.is_some_and(|after| self.ops > after) {
            return Err(SimError::Io.to_io());
        }
        Ok(())
    }

    fn inode(&self, name: &str) -> io::Result<u64> {
        self.names.get(name).copied().ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}

/// A simulated directory. Cloning gives another handle to the same disk.
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    state: Arc<Mutex<SimState>>,
}

struct SimFile {
    state: Arc<Mutex<SimState>>,
    inode: u64,
}

impl SimStorage {
    /// An empty disk.
    pub fn new() -> SimStorage {
        SimStorage::default()
    }

    /// Fails the `n`-th operation from now (1 = the next one), whatever its kind.
    pub fn fail_nth_op(&self, n: u64, error: SimError) {
        let mut state = self.state.lock();
        let at = state.ops + n;
        state.fail_at.insert(at, error);
    }

    /// Fails every operation of `op`'s kind from now on.
    pub fn fail_all(&self, op: SimOp, error: SimError) {
        self.state.lock().fail_kind.insert(op, error);
    }

    /// Fails every operation after the `n`-th from now with EIO: the disk dies there (then
    /// [`SimStorage::crash`] gives the image a restart would see).
    pub fn fail_all_after(&self, n: u64) {
        let mut state = self.state.lock();
        state.fail_after = Some(state.ops + n);
    }

    /// Stops failing operations of `op`'s kind.
    pub fn heal(&self, op: SimOp) {
        self.state.lock().fail_kind.remove(&op);
    }

    /// Limits the bytes that file creations may still use (`None`: unlimited).
    pub fn set_space(&self, bytes: Option<u64>) {
        self.state.lock().space_bytes = bytes;
    }

    /// Operations performed so far (all kinds).
    pub fn op_count(&self) -> u64 {
        self.state.lock().ops
    }

    /// Operations of one kind performed so far.
    pub fn op_count_of(&self, op: SimOp) -> u64 {
        self.state.lock().op_counts.get(&op).copied().unwrap_or(0)
    }

    /// Bytes written but not yet synced, over all files.
    pub fn unsynced_bytes(&self) -> usize {
        let state = self.state.lock();
        state.files.values().flat_map(|f| f.unsynced.iter()).map(|(_, b)| b.len()).sum()
    }

    /// The names of the files, as a reader sees them now.
    pub fn file_names(&self) -> Vec<String> {
        self.state.lock().names.keys().cloned().collect()
    }

    /// A file's current contents.
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let state = self.state.lock();
        let inode = state.names.get(name)?;
        Some(state.files[inode].current.clone())
    }

    /// Replaces a file's contents durably (for corruption tests; call on a disk no log has open).
    pub fn set_contents(&self, name: &str, contents: Vec<u8>) {
        let mut state = self.state.lock();
        let inode = state.names[name];
        let file = state.files.get_mut(&inode).expect("file of a name");
        file.durable.clone_from(&contents);
        file.current = contents;
        file.unsynced.clear();
    }

    /// An independent copy of the disk as a reader sees it now, unsynced writes included (as
    /// durable), unlocked: for tests that damage or open one starting point many times.
    #[must_use]
    pub fn fork(&self) -> SimStorage {
        let state = self.state.lock();
        let mut copy = SimState { next_inode: state.next_inode, ..SimState::default() };
        for (name, inode) in &state.names {
            let current = state.files[inode].current.clone();
            copy.files.insert(
                *inode,
                SimFileState { durable: current.clone(), current, unsynced: Vec::new() },
            );
            copy.names.insert(name.clone(), *inode);
            copy.durable_names.insert(name.clone(), *inode);
        }
        SimStorage { state: Arc::new(Mutex::new(copy)) }
    }

    /// Crashes the disk: returns the image a restart would find, and makes this handle (and every
    /// file opened through it) fail all later operations.
    #[must_use = "the returned image is the disk a restart finds"]
    pub fn crash(&self, mode: CrashMode) -> SimStorage {
        let mut state = self.state.lock();
        state.crashed = true;
        let mut rng = mode.keep_seed().unwrap_or(0) ^ 0x9E37_79B9_7F4A_7C15;
        let mut tear_rng = mode.tear_last.unwrap_or(0) ^ 0xD1B5_4A32_D192_ED03;
        let mut image = SimState { next_inode: state.next_inode, ..SimState::default() };
        for (name, inode) in &state.durable_names {
            let file = &state.files[inode];
            let mut contents = file.durable.clone();
            let kept: Vec<&(u64, Vec<u8>)> = match mode.keep {
                Keep::None => Vec::new(),
                Keep::All => file.unsynced.iter().collect(),
                Keep::Prefix(n) => file.unsynced.iter().take(n).collect(),
                Keep::Random(_) => {
                    file.unsynced.iter().filter(|_| splitmix(&mut rng) & 1 == 1).collect()
                }
            };
            let count = kept.len();
            for (i, (offset, bytes)) in kept.into_iter().enumerate() {
                let offset = *offset as usize;
                let mut len = bytes.len();
                let torn = mode.tear_last.is_some() && i + 1 == count && len > 0;
                if torn {
                    len = (splitmix(&mut tear_rng) % len as u64) as usize;
                }
                write_into(&mut contents, offset, &bytes[..len]);
                if torn {
                    // The sector holding the cut gets garbage, as a torn sector write leaves.
                    let cut = offset + len;
                    let sector_end = (cut / 512 + 1) * 512;
                    let end = sector_end.min(offset + bytes.len()).min(contents.len());
                    for byte in &mut contents[cut.min(end)..end] {
                        *byte = splitmix(&mut tear_rng) as u8;
                    }
                }
            }
            image.files.insert(
                *inode,
                SimFileState { current: contents.clone(), durable: contents, unsynced: Vec::new() },
            );
            image.names.insert(name.clone(), *inode);
            image.durable_names.insert(name.clone(), *inode);
        }
        SimStorage { state: Arc::new(Mutex::new(image)) }
    }
}

impl CrashMode {
    /// Every unsynced write is lost.
    pub const LOSE_UNSYNCED: CrashMode = CrashMode { keep: Keep::None, tear_last: None };
    /// Every unsynced write survives (a clean process kill: the page cache outlives the process).
    pub const KEEP_UNSYNCED: CrashMode = CrashMode { keep: Keep::All, tear_last: None };

    fn keep_seed(self) -> Option<u64> {
        match self.keep {
            Keep::Random(seed) => Some(seed),
            _ => None,
        }
    }
}

fn write_into(contents: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    let end = offset + bytes.len();
    if contents.len() < end {
        contents.resize(end, 0);
    }
    contents[offset..end].copy_from_slice(bytes);
}

/// splitmix64: a tiny deterministic generator for the simulated disk's choices.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl StorageFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        let state = self.state.lock();
        if state.crashed {
            return Err(io::Error::other("simulated disk crashed"));
        }
        Ok(state.files[&self.inode].current.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        state.begin(SimOp::Read)?;
        let file = &state.files[&self.inode];
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > file.current.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&file.current[start..end]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        state.begin(SimOp::Write)?;
        let file = state.files.get_mut(&self.inode).expect("open file exists");
        let offset_usize = offset as usize;
        write_into(&mut file.current, offset_usize, buf);
        file.unsynced.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        state.begin(SimOp::Sync)?;
        let file = state.files.get_mut(&self.inode).expect("open file exists");
        for (offset, bytes) in std::mem::take(&mut file.unsynced) {
            write_into(&mut file.durable, offset as usize, &bytes);
        }
        Ok(())
    }

    fn read_view(self: Arc<Self>) -> io::Result<ReadView> {
        Ok(ReadView::Copied(self))
    }

    fn as_std(&self) -> Option<&std::fs::File> {
        None
    }
}

impl Storage for SimStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let state = self.state.lock();
        if state.crashed {
            return Err(io::Error::other("simulated disk crashed"));
        }
        Ok(state.names.keys().cloned().collect())
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let state = self.state.lock();
        if state.crashed {
            return Err(io::Error::other("simulated disk crashed"));
        }
        let inode = state.inode(name)?;
        Ok(Arc::new(SimFile { state: Arc::clone(&self.state), inode }))
    }

    fn create_prewritten(&self, name: &str, len: u64) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.state.lock();
        state.begin(SimOp::Create)?;
        if state.names.contains_key(name) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        if let Some(space) = state.space_bytes {
            if space < len {
                return Err(SimError::NoSpace.to_io());
            }
            state.space_bytes = Some(space - len);
        }
        let inode = state.next_inode;
        state.next_inode += 1;
        let zeros = vec![0u8; len as usize];
        // Pre-written and synced: the contents are durable, the name is not until `sync_dir`.
        state.files.insert(
            inode,
            SimFileState { current: zeros.clone(), durable: zeros, unsynced: Vec::new() },
        );
        state.names.insert(name.to_string(), inode);
        Ok(Arc::new(SimFile { state: Arc::clone(&self.state), inode }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut state = self.state.lock();
        state.begin(SimOp::Rename)?;
        let inode = state.inode(from)?;
        state.names.remove(from);
        state.names.insert(to.to_string(), inode);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.state.lock();
        state.begin(SimOp::Remove)?;
        state.inode(name)?;
        state.names.remove(name);
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        state.begin(SimOp::SyncDir)?;
        state.durable_names = state.names.clone();
        // Files no name reaches any more are gone for good.
        let live: std::collections::BTreeSet<u64> = state.names.values().copied().collect();
        state.files.retain(|inode, _| live.contains(inode));
        Ok(())
    }

    fn lock(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        if state.locked {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "simulated directory locked"));
        }
        state.locked = true;
        Ok(())
    }

    fn unlock(&self) {
        self.state.lock().locked = false;
    }

    fn kind(&self) -> &'static str {
        "sim"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_are_lost_and_synced_ones_kept() {
        let disk = SimStorage::new();
        let file = disk.create_prewritten("a", 8).unwrap();
        disk.sync_dir().unwrap();
        file.write_all_at(b"ab", 0).unwrap();
        file.sync_data().unwrap();
        file.write_all_at(b"cd", 2).unwrap();
        let lost = disk.crash(CrashMode::LOSE_UNSYNCED);
        assert_eq!(&lost.contents("a").unwrap()[..4], b"ab\0\0");
        assert!(file.write_all_at(b"x", 0).is_err(), "a crashed disk refuses writes");
    }

    #[test]
    fn names_need_a_directory_sync() {
        let disk = SimStorage::new();
        disk.create_prewritten("a", 4).unwrap();
        let image = disk.crash(CrashMode::KEEP_UNSYNCED);
        assert!(image.file_names().is_empty());
    }

    #[test]
    fn injected_errors_fire_once_at_the_chosen_operation() {
        let disk = SimStorage::new();
        let file = disk.create_prewritten("a", 4).unwrap();
        disk.fail_nth_op(2, SimError::Io);
        file.write_all_at(b"a", 0).unwrap();
        assert_eq!(file.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        file.sync_data().unwrap();
    }
}

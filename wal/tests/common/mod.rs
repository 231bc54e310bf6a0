//! Test support: an in-memory model of what the log should hold, a deterministic workload, and a
//! checker that the recovered log is exactly the model after some prefix of the appended batches
//! that contains every acknowledged one.

#![allow(dead_code, missing_docs, clippy::missing_panics_doc)]

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use flotilla_wal::sim::SimStorage;
use flotilla_wal::{
    Config, GroupId, GroupState, HardState, Op, Wal, WalError, WriteBatch, WriterMode, block_on,
};

/// One group as the model sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelGroup {
    /// `index -> (term, tag, payload)`.
    pub entries: BTreeMap<u64, (u64, u8, Bytes)>,
    pub hard_state: Option<HardState>,
    pub compacted: Option<(u64, u64)>,
}

impl ModelGroup {
    pub fn next_index(&self) -> u64 {
        self.entries
            .keys()
            .next_back()
            .map_or_else(|| self.compacted.map_or(1, |(i, _)| i + 1), |i| i + 1)
    }

    pub fn state(&self) -> GroupState {
        let compacted = self.compacted.map_or(0, |(i, _)| i);
        GroupState {
            first_index: self.entries.keys().next().copied().unwrap_or(compacted + 1),
            last_index: self.next_index() - 1,
            hard_state: self.hard_state,
            compacted: self.compacted,
        }
    }
}

/// The whole log as the model sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    pub groups: BTreeMap<GroupId, ModelGroup>,
}

impl Model {
    pub fn apply(&mut self, batch: &WriteBatch) {
        for op in batch.ops() {
            match op {
                Op::Entries { group, first_index, entries } => {
                    let g = self.groups.entry(*group).or_default();
                    g.entries.retain(|i, _| i < first_index);
                    for (offset, (term, tag, payload)) in entries.iter().enumerate() {
                        g.entries
                            .insert(first_index + offset as u64, (*term, *tag, payload.clone()));
                    }
                }
                Op::HardState { group, state } => {
                    self.groups.entry(*group).or_default().hard_state = Some(*state);
                }
                Op::Truncate { group, from } => {
                    self.groups.entry(*group).or_default().entries.retain(|i, _| i < from);
                }
                Op::Compact { group, index, term } => {
                    let g = self.groups.entry(*group).or_default();
                    if g.compacted.is_none_or(|(c, _)| *index > c) {
                        g.entries.retain(|i, _| i > index);
                        g.compacted = Some((*index, *term));
                    }
                }
                Op::RemoveGroup { group } => {
                    self.groups.remove(group);
                }
            }
        }
        // A group whose every trace was removed is not reported by the log either.
        self.groups.retain(|_, g| *g != ModelGroup::default());
    }
}

/// What a log holds, read back through its API.
pub fn read_back(wal: &Wal) -> Model {
    let mut model = Model::default();
    for group in wal.groups() {
        let state = wal.group_state(group).expect("listed group");
        let mut g = ModelGroup {
            hard_state: state.hard_state,
            compacted: state.compacted,
            ..ModelGroup::default()
        };
        if state.last_index >= state.first_index {
            for entry in wal.entries(group, state.first_index..state.last_index + 1).unwrap() {
                g.entries.insert(entry.index, (entry.term, entry.tag, entry.payload));
            }
        }
        // The log's own report must agree with what it returns.
        assert_eq!(g.state().first_index, state.first_index, "group {group}");
        assert_eq!(g.state().last_index, state.last_index, "group {group}");
        if g != ModelGroup::default() {
            model.groups.insert(group, g);
        }
    }
    model
}

/// Checks that `recovered` equals the model after some prefix of `batches` at least
/// `acked_prefix` long; returns the prefix length it matched.
pub fn check_prefix(recovered: &Model, batches: &[WriteBatch], acked_prefix: usize) -> usize {
    let mut model = Model::default();
    for batch in &batches[..acked_prefix] {
        model.apply(batch);
    }
    if model == *recovered {
        return acked_prefix;
    }
    for (i, batch) in batches.iter().enumerate().skip(acked_prefix) {
        model.apply(batch);
        if model == *recovered {
            return i + 1;
        }
    }
    panic!(
        "recovered log is not the result of any prefix of at least {acked_prefix} of {} batches:\n\
         recovered: {recovered:#?}",
        batches.len()
    );
}

/// A small inline (thread-free, deterministic) configuration on small segments.
pub fn inline_config(segment_bytes: u64) -> Config {
    Config {
        segment_bytes,
        batch_bytes_max: (segment_bytes / 4) as usize,
        writer: WriterMode::Inline,
        ..Config::default()
    }
}

pub fn open_sim(
    disk: &SimStorage,
    config: &Config,
) -> Result<(Wal, flotilla_wal::Recovery), WalError> {
    Wal::open_with(Arc::new(disk.clone()), config.clone())
}

/// A tiny deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A scripted workload over four groups: appends with hard states, overwrites of a suffix, one
/// compaction that frees segments, and one group removed. Deterministic from `seed`.
pub fn scripted_batches(seed: u64, rounds: usize) -> Vec<WriteBatch> {
    let mut rng = Rng(seed);
    let mut model = Model::default();
    let mut batches = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let group = GroupId(i as u64 % 4 + 1);
        let next = model.groups.get(&group).map_or(1, ModelGroup::next_index);
        let first = model.groups.get(&group).map_or(1, |g| g.state().first_index);
        let term = 1 + i as u64 / 50;
        let mut batch = WriteBatch::new();
        if i == rounds * 2 / 3 {
            // Compact group 1 nearly to its end, and groups 2 and 3 entirely: segments free up.
            for g in 1..=3 {
                let gs = model.groups.get(&GroupId(g)).map(ModelGroup::state);
                if let Some(state) = gs
                    && state.last_index > 2
                {
                    let through = if g == 1 { state.last_index - 2 } else { state.last_index };
                    let term_at = model.groups[&GroupId(g)].entries[&through].0;
                    batch.compact(GroupId(g), through, term_at);
                }
            }
        } else if i == rounds / 2 {
            batch.remove_group(GroupId(4));
        } else {
            let overwrite = next > first + 3 && rng.below(8) == 0;
            let start = if overwrite { next - 1 - rng.below(3) } else { next };
            let count = 1 + rng.below(3);
            let entries: Vec<(u64, u8, Bytes)> = (0..count)
                .map(|k| {
                    let len = rng.below(300) as usize;
                    let byte = (i as u64 * 7 + k) as u8;
                    // Tags vary (0 included) without drawing from `rng`, so the workload is the
                    // same as before tags existed.
                    let tag = byte.wrapping_mul(31) % 4;
                    (term, tag, Bytes::from(vec![byte; len]))
                })
                .collect();
            batch.add_tagged_entries(group, start, entries);
            batch.set_hard_state(group, HardState { term, vote: group.0, commit: start });
        }
        model.apply(&batch);
        batches.push(batch);
    }
    batches
}

/// Runs `batches` one by one (inline: each is its own round); returns how many were acknowledged
/// before the first failure, and checks that no append succeeds after a poisoning error.
pub fn run_batches(wal: &Wal, batches: &[WriteBatch]) -> usize {
    let mut acked = 0;
    let mut poisoned = false;
    let mut failed = false;
    for batch in batches {
        match block_on(wal.append(batch.clone())) {
            Ok(()) => {
                assert!(!poisoned, "an append was acknowledged after the log was poisoned");
                if !failed {
                    acked += 1;
                }
            }
            Err(WalError::Poisoned { .. }) => {
                poisoned = true;
                failed = true;
            }
            Err(_) => failed = true,
        }
        if failed {
            // The model is a prefix of the batches: stop at the first failure.
            break;
        }
    }
    acked
}

/// seccomp return value: fail the syscall with `errno` in the low bits.
pub const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// seccomp return value: allow the syscall.
pub const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

/// Installs a seccomp BPF `filter` on the calling thread (threads it spawns inherit it), as a
/// container runtime's profile would.
pub fn install_seccomp_filter(filter: &[libc::sock_filter]) {
    let program = libc::sock_fprog {
        len: u16::try_from(filter.len()).unwrap(),
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: plain prctl/seccomp syscalls; `program` and `filter` outlive the call.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        let rc = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            std::ptr::from_ref(&program),
        );
        assert_eq!(rc, 0, "installing the seccomp filter failed");
    }
}

//! The replicated state machine of the simulation: a map of `u64` registers, fed by committed
//! entries, and the encoding of client commands into entry payloads.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flotilla_raftgroup::testkit::{KvInput, KvOutput};
use flotilla_raftgroup::{Entry, EntryKind};

/// A client command as it travels in a log entry: who sent it (for the response) and what it does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The client.
    pub client: u64,
    /// The client's operation number, unique per client.
    pub seq: u64,
    /// The operation; never a get (reads go through ReadIndex, not the log).
    pub input: KvInput<u64, u64>,
}

const PUT: u8 = 1;
const CAS: u8 = 2;
const CAS_FROM_NOTHING: u8 = 3;
/// client, seq, kind, key, value, expected.
const ENCODED_BYTES: usize = 8 + 8 + 1 + 8 + 8 + 8;

impl Command {
    /// The payload bytes: fixed width, little endian.
    pub fn encode(&self) -> Bytes {
        let mut bytes = BytesMut::with_capacity(ENCODED_BYTES);
        bytes.put_u64_le(self.client);
        bytes.put_u64_le(self.seq);
        let (kind, key, value, expected) = match &self.input {
            KvInput::Put { key, value } => (PUT, *key, *value, 0),
            KvInput::CompareAndSet { key, expected: Some(expected), new } => {
                (CAS, *key, *new, *expected)
            }
            KvInput::CompareAndSet { key, expected: None, new } => {
                (CAS_FROM_NOTHING, *key, *new, 0)
            }
            KvInput::Get { .. } => unreachable!("gets are served by ReadIndex, not logged"),
        };
        bytes.put_u8(kind);
        bytes.put_u64_le(key);
        bytes.put_u64_le(value);
        bytes.put_u64_le(expected);
        bytes.freeze()
    }

    /// Decodes a payload written by [`Command::encode`]; panics on anything else, since every
    /// normal entry of the simulation is one.
    pub fn decode(payload: &Bytes) -> Command {
        assert_eq!(payload.len(), ENCODED_BYTES, "not a simulator command: {payload:?}");
        let mut bytes = payload.clone();
        let client = bytes.get_u64_le();
        let seq = bytes.get_u64_le();
        let kind = bytes.get_u8();
        let key = bytes.get_u64_le();
        let value = bytes.get_u64_le();
        let expected = bytes.get_u64_le();
        let input = match kind {
            PUT => KvInput::Put { key, value },
            CAS => KvInput::CompareAndSet { key, expected: Some(expected), new: value },
            CAS_FROM_NOTHING => KvInput::CompareAndSet { key, expected: None, new: value },
            other => panic!("unknown command kind {other}"),
        };
        Command { client, seq, input }
    }
}

/// One replica's state machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvStateMachine {
    registers: BTreeMap<u64, u64>,
    /// Last index applied.
    applied: u64,
    /// A hash of every entry applied so far, in order: equal chains at an index mean equal
    /// histories of applied entries up to it.
    chain: u64,
}

impl KvStateMachine {
    /// The last index applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The hash chain of applied entries.
    pub fn chain(&self) -> u64 {
        self.chain
    }

    /// The value of `key`.
    pub fn get(&self, key: u64) -> Option<u64> {
        self.registers.get(&key).copied()
    }

    /// The registers, for convergence checks.
    pub fn registers(&self) -> &BTreeMap<u64, u64> {
        &self.registers
    }

    /// Applies the entry at `index` (which must be the next one). `payload` is `None` for entries
    /// that carry no command (no-ops, membership changes). Returns the command and its output.
    pub fn apply(
        &mut self,
        index: u64,
        term: u64,
        payload: Option<&Bytes>,
    ) -> Option<(Command, KvOutput<u64>)> {
        assert_eq!(index, self.applied + 1, "entries must be applied in order, without gaps");
        self.applied = index;
        self.chain = mix(mix(self.chain, index), term);
        let payload = payload?;
        self.chain = mix(self.chain, hash_bytes(payload));
        let command = Command::decode(payload);
        let output = match &command.input {
            KvInput::Put { key, value } => {
                self.registers.insert(*key, *value);
                KvOutput::Put
            }
            KvInput::CompareAndSet { key, expected, new } => {
                let swapped = self.registers.get(key) == expected.as_ref();
                if swapped {
                    self.registers.insert(*key, *new);
                }
                KvOutput::CompareAndSet(swapped)
            }
            KvInput::Get { .. } => unreachable!("decode never yields a get"),
        };
        Some((command, output))
    }

    /// The state as snapshot bytes: applied index, chain, then `(key, value)` pairs.
    pub fn snapshot(&self) -> Bytes {
        let mut bytes = BytesMut::with_capacity(16 + 16 * self.registers.len());
        bytes.put_u64_le(self.applied);
        bytes.put_u64_le(self.chain);
        for (key, value) in &self.registers {
            bytes.put_u64_le(*key);
            bytes.put_u64_le(*value);
        }
        bytes.freeze()
    }

    /// The state a [`KvStateMachine::snapshot`] was taken of.
    pub fn restore(snapshot: &Bytes) -> KvStateMachine {
        assert_eq!(snapshot.len() % 16, 0, "not a state machine snapshot");
        let mut bytes = snapshot.clone();
        let applied = bytes.get_u64_le();
        let chain = bytes.get_u64_le();
        let mut registers = BTreeMap::new();
        while bytes.has_remaining() {
            let key = bytes.get_u64_le();
            registers.insert(key, bytes.get_u64_le());
        }
        KvStateMachine { registers, applied, chain }
    }
}

/// Mixes `value` into `hash` (a SplitMix64 finalizer over their combination): for fingerprints
/// and trace hashes, stable forever.
pub fn mix(hash: u64, value: u64) -> u64 {
    let mut z = hash.rotate_left(5) ^ value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable hash of some bytes.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hash = mix(0, bytes.len() as u64);
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        hash = mix(hash, u64::from_le_bytes(word));
    }
    hash
}

/// A stable hash of an entry's kind and payload (not its position: index and term are kept
/// beside it).
pub fn hash_entry(entry: &Entry) -> u64 {
    let kind = match entry.kind {
        EntryKind::Normal => 1,
        EntryKind::Membership => 2,
        EntryKind::Empty => 3,
    };
    mix(kind, hash_bytes(&entry.payload))
}

//! The ordered map behind [`super::KvStateMachine`]: a sorted vector while it is small, a
//! persistent B-tree beyond that, keyed by [`Key`]s that hold short keys inline.
//!
//! Most groups of a node with tens of thousands of them hold a handful of keys. A B-tree
//! allocates a whole leaf (~1 KiB for `Bytes` keys and values) for its first key; a sorted
//! vector sized exactly holds one key in 64 B. Both iterate in key order, so nothing observable
//! (reads, ranges, snapshot bytes) depends on the representation.
//!
//! A lookup compares the key against about six keys per B-tree node. A key behind a pointer
//! costs a cache miss per comparison once the store outgrows the cache; a [`Key`] of at most
//! [`INLINE_MAX`] bytes lives in the node itself and costs none, nor an allocation of its own.
//! Two inline keys compare as three big-endian words (no `memcmp` call, no length arithmetic),
//! and a lookup of a short key probes with an inline key so that every comparison is that one.
//!
//! Cloning is what a snapshot does (the image is written from the clone on another thread while
//! the group goes on applying), so it must cost next to nothing on the shard thread whatever the
//! size: the vector holds at most [`SMALL_MAX`] pairs, and the B-tree (`imbl::OrdMap`) shares
//! its nodes between clones — a clone is O(1), and a write after it copies only the nodes on
//! its path (a node is mutated in place while nothing else holds it).

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::ops::{Bound, Deref};

use bytes::Bytes;
use imbl::OrdMap;

/// Most keys held in the vector form; one more moves the map to a B-tree for good.
const SMALL_MAX: usize = 8;

/// Longest key held inline: with its length byte, 24 bytes, which leaves the enum the size of
/// a `Bytes` (the compiler keeps the tag in a niche of the `Bytes`' other 8).
pub(crate) const INLINE_MAX: usize = 23;

/// A stored key: its bytes inline when short, else a `Bytes` of its own (never a slice of a
/// larger buffer, which it would keep alive). Ordered and compared as its bytes.
#[derive(Clone)]
pub(crate) struct Key(Repr);

#[derive(Clone)]
enum Repr {
    /// The key's bytes, zero-padded to [`INLINE_MAX`], then its length. Compared as three
    /// big-endian words this orders exactly as the key's bytes: up to the shorter key's length
    /// the words compare its bytes; past it, a byte of the longer key (any value, zero included)
    /// meets padding (zero) — greater, or equal until the length byte, which is greater too. So
    /// a key sorts after its prefixes, as bytes do.
    Inline([u8; INLINE_MAX + 1]),
    Heap(Bytes),
}

/// Two inline keys in their order: each array read as three big-endian words, compared in turn
/// (see [`Repr::Inline`]).
fn inline_cmp(a: &[u8; INLINE_MAX + 1], b: &[u8; INLINE_MAX + 1]) -> Ordering {
    let word = |bytes: &[u8; INLINE_MAX + 1], at: usize| {
        u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
    };
    word(a, 0)
        .cmp(&word(b, 0))
        .then_with(|| word(a, 8).cmp(&word(b, 8)))
        .then_with(|| word(a, 16).cmp(&word(b, 16)))
}

// A node holds 64 keys: a larger key would cost every node, inline or not.
const _: () = assert!(std::mem::size_of::<Key>() == std::mem::size_of::<Bytes>());

impl Key {
    /// A key holding a copy of `key`.
    pub(crate) fn copy_from(key: &[u8]) -> Self {
        Self::inline(key).unwrap_or_else(|| Self(Repr::Heap(Bytes::copy_from_slice(key))))
    }

    /// `key` inline, if it is short enough (no allocation either way).
    fn inline(key: &[u8]) -> Option<Self> {
        (key.len() <= INLINE_MAX).then(|| {
            let mut bytes = [0; INLINE_MAX + 1];
            bytes[..key.len()].copy_from_slice(key);
            bytes[INLINE_MAX] = key.len() as u8;
            Self(Repr::Inline(bytes))
        })
    }

    /// The key as `Bytes` (a copy when it is inline).
    pub(crate) fn to_bytes(&self) -> Bytes {
        match &self.0 {
            Repr::Inline(_) => Bytes::copy_from_slice(self),
            Repr::Heap(bytes) => bytes.clone(),
        }
    }
}

impl Deref for Key {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline(bytes) => &bytes[..usize::from(bytes[INLINE_MAX])],
            Repr::Heap(bytes) => bytes,
        }
    }
}

// `Borrow` requires `Key`'s order and equality to be its bytes': they are.
impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        match (&self.0, &other.0) {
            (Repr::Inline(a), Repr::Inline(b)) => inline_cmp(a, b),
            _ => (**self).cmp(&**other),
        }
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Bytes::copy_from_slice(self).fmt(f)
    }
}

/// An ordered map from keys to values. See the module documentation.
#[derive(Clone, Debug)]
pub(crate) enum KvMap {
    /// At most [`SMALL_MAX`] pairs, sorted by key, keys distinct, capacity exactly the length.
    Small(Vec<(Key, Bytes)>),
    /// Any number of pairs.
    Large(OrdMap<Key, Bytes>),
}

impl Default for KvMap {
    fn default() -> Self {
        Self::Small(Vec::new())
    }
}

impl KvMap {
    /// A map of `pairs`, which must be sorted by key without duplicates. The keys are copied.
    pub(crate) fn from_sorted<K: AsRef<[u8]>>(pairs: Vec<(K, Bytes)>) -> Self {
        let pairs: Vec<(Key, Bytes)> =
            pairs.into_iter().map(|(key, value)| (Key::copy_from(key.as_ref()), value)).collect();
        debug_assert!(pairs.windows(2).all(|pair| pair[0].0 < pair[1].0), "sorted, distinct");
        if pairs.len() <= SMALL_MAX {
            let mut pairs = pairs;
            pairs.shrink_to_fit();
            Self::Small(pairs)
        } else {
            Self::Large(pairs.into_iter().collect())
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Small(pairs) => pairs.len(),
            Self::Large(map) => map.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Bytes> {
        match self {
            Self::Small(pairs) => {
                pairs.binary_search_by(|(k, _)| (**k).cmp(key)).ok().map(|at| &pairs[at].1)
            }
            Self::Large(map) => match Key::inline(key) {
                Some(probe) => map.get(&probe),
                None => map.get(key),
            },
        }
    }

    pub(crate) fn get_mut(&mut self, key: &[u8]) -> Option<&mut Bytes> {
        match self {
            Self::Small(pairs) => match pairs.binary_search_by(|(k, _)| (**k).cmp(key)) {
                Ok(at) => Some(&mut pairs[at].1),
                Err(_) => None,
            },
            Self::Large(map) => match Key::inline(key) {
                Some(probe) => map.get_mut(&probe),
                None => map.get_mut(key),
            },
        }
    }

    /// Inserts a copy of `key`, which must not be present.
    pub(crate) fn insert_new(&mut self, key: &[u8], value: Bytes) {
        let key = Key::copy_from(key);
        match self {
            Self::Small(pairs) => {
                let at = pairs.binary_search_by(|(k, _)| k.cmp(&key)).expect_err("key is new");
                if pairs.len() < SMALL_MAX {
                    // Exactly sized: an idle group's map costs one small allocation.
                    pairs.reserve_exact(1);
                    pairs.insert(at, (key, value));
                } else {
                    let mut map: OrdMap<Key, Bytes> = std::mem::take(pairs).into_iter().collect();
                    map.insert(key, value);
                    *self = Self::Large(map);
                }
            }
            Self::Large(map) => {
                let previous = map.insert(key, value);
                debug_assert!(previous.is_none(), "key is new");
            }
        }
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Bytes> {
        match self {
            Self::Small(pairs) => {
                let at = pairs.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
                let (_, value) = pairs.remove(at);
                if pairs.is_empty() {
                    *pairs = Vec::new();
                }
                Some(value)
            }
            Self::Large(map) => match Key::inline(key) {
                Some(probe) => map.remove(&probe),
                None => map.remove(key),
            },
        }
    }

    /// Every pair, in key order.
    pub(crate) fn iter(&self) -> Iter<'_> {
        match self {
            Self::Small(pairs) => Iter::Small(pairs.iter()),
            Self::Large(map) => Iter::Large(map.range::<_, [u8]>(..)),
        }
    }

    /// The pairs with keys from `start` (included) to `end`, in key order. `start` must not be
    /// above `end`.
    pub(crate) fn range(&self, start: &[u8], end: Bound<&[u8]>) -> Iter<'_> {
        match self {
            Self::Small(pairs) => {
                let from = pairs.partition_point(|(k, _)| &**k < start);
                let to = match end {
                    Bound::Unbounded => pairs.len(),
                    Bound::Excluded(end) => pairs.partition_point(|(k, _)| &**k < end),
                    Bound::Included(end) => pairs.partition_point(|(k, _)| &**k <= end),
                };
                Iter::Small(pairs[from..to.max(from)].iter())
            }
            Self::Large(map) => Iter::Large(map.range::<_, [u8]>((Bound::Included(start), end))),
        }
    }
}

/// Pairs of a [`KvMap`] in key order.
pub(crate) enum Iter<'a> {
    Small(std::slice::Iter<'a, (Key, Bytes)>),
    Large(imbl::ordmap::RangedIter<'a, Key, Bytes, imbl::shared_ptr::DefaultSharedPtr>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a Key, &'a Bytes);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Small(pairs) => pairs.next().map(|(key, value)| (key, value)),
            Self::Large(range) => range.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn key(n: u32) -> Bytes {
        Bytes::from(format!("k{n:03}"))
    }

    #[test]
    fn small_and_large_agree_with_a_btree() {
        let mut map = KvMap::default();
        let mut model = BTreeMap::new();
        // Insert in a scrambled order past the small limit, remove some, compare everything.
        for step in 0..40u32 {
            let n = (step * 17) % 23;
            let value = Bytes::from(step.to_string());
            match map.get_mut(&key(n)) {
                Some(slot) => *slot = value.clone(),
                None => map.insert_new(&key(n), value.clone()),
            }
            model.insert(key(n), value);
            if step % 5 == 4 {
                let gone = (step * 7) % 23;
                assert_eq!(map.remove(&key(gone)), model.remove(&key(gone)));
            }
            assert_eq!(map.len(), model.len());
            assert!(map.iter().map(|(k, v)| (&**k, v)).eq(model.iter().map(|(k, v)| (&k[..], v))));
            for n in 0..24 {
                assert_eq!(map.get(&key(n)), model.get(&key(n)));
                for end in [Bound::Unbounded, Bound::Excluded(&key(n + 3)[..])] {
                    let expected = model.range::<[u8], _>((Bound::Included(&key(n)[..]), end));
                    let expected = expected.map(|(k, v)| (&k[..], v));
                    assert!(map.range(&key(n), end).map(|(k, v)| (&**k, v)).eq(expected));
                }
            }
        }
    }

    #[test]
    fn a_clone_keeps_its_contents_while_the_original_changes() {
        let mut map = KvMap::default();
        for n in 0..100 {
            map.insert_new(&key(n), key(n));
        }
        let before: Vec<_> = map.iter().map(|(k, v)| (k.to_bytes(), v.clone())).collect();
        let view = map.clone();
        *map.get_mut(&key(5)).expect("present") = key(500);
        map.remove(&key(6));
        map.insert_new(&key(1000), key(1));
        assert!(view.iter().map(|(k, v)| (k.to_bytes(), v.clone())).eq(before));
        assert_eq!(map.get(&key(5)), Some(&key(500)));
        assert_eq!(view.get(&key(5)), Some(&key(5)));
    }

    /// Keys on both sides of the inline limit, sharing prefixes, with zero bytes (which the
    /// inline form pads with): in both forms of the map, through inserts, replacements and
    /// removals, it orders, finds and ranges them exactly as byte strings.
    #[test]
    fn inline_and_heap_keys_order_as_their_bytes() {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for len in [0, 1, 2, INLINE_MAX - 1, INLINE_MAX, INLINE_MAX + 1, 40] {
            for fill in [0u8, 1, 0xff] {
                keys.push(vec![fill; len]);
                let mut longer = vec![fill; len];
                longer.push(0);
                keys.push(longer);
            }
        }
        keys.sort();
        keys.dedup();
        let mut map = KvMap::default();
        let mut model: BTreeMap<Vec<u8>, Bytes> = BTreeMap::new();
        let check = |map: &KvMap, model: &BTreeMap<Vec<u8>, Bytes>| {
            assert_eq!(map.len(), model.len());
            let pairs = model.iter().map(|(k, v)| (&k[..], v));
            assert!(map.iter().map(|(k, v)| (&**k, v)).eq(pairs));
            for (at, key) in keys.iter().enumerate() {
                assert_eq!(map.get(key), model.get(key));
                let stored = Key::copy_from(key);
                assert_eq!(&*stored, &key[..]);
                assert_eq!(stored.to_bytes(), key[..]);
                let end = &keys[(at * 7 + 3) % keys.len()];
                if key > end {
                    continue;
                }
                for end in [Bound::Unbounded, Bound::Excluded(&end[..]), Bound::Included(&end[..])]
                {
                    let expected = model.range::<[u8], _>((Bound::Included(&key[..]), end));
                    let expected = expected.map(|(k, v)| (&k[..], v));
                    assert!(map.range(key, end).map(|(k, v)| (&**k, v)).eq(expected));
                }
            }
        };
        for step in 0..keys.len() * 2 {
            let key = &keys[(step * 11) % keys.len()];
            let value = Bytes::from(step.to_string());
            match map.get_mut(key) {
                Some(slot) => *slot = value.clone(),
                None => map.insert_new(key, value.clone()),
            }
            model.insert(key.clone(), value);
            if step % 4 == 3 {
                let gone = &keys[(step * 5) % keys.len()];
                assert_eq!(map.remove(gone), model.remove(gone));
            }
            check(&map, &model);
        }
        assert!(matches!(map, KvMap::Large(_)), "the B-tree form is exercised");
    }

    /// Short byte strings over a small alphabet (zero included), so that prefixes, equal keys
    /// and padding-like bytes are common; lengths straddle the inline limit.
    fn short_key() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        proptest::collection::vec(prop_oneof![Just(0u8), Just(1), Just(0x7f), Just(0xff)], 0..26)
    }

    proptest::proptest! {
        /// Keys compare as their bytes, whichever forms meet (inline word order included).
        #[test]
        fn keys_compare_as_their_bytes(a in short_key(), b in short_key()) {
            let (x, y) = (Key::copy_from(&a), Key::copy_from(&b));
            proptest::prop_assert_eq!(x.cmp(&y), a.cmp(&b));
            proptest::prop_assert_eq!(x == y, a == b);
        }
    }

    #[test]
    fn one_key_costs_one_exact_allocation() {
        let mut map = KvMap::default();
        map.insert_new(&key(1), key(2));
        let KvMap::Small(pairs) = &map else { panic!("small") };
        assert_eq!(pairs.capacity(), 1);
        assert_eq!(map.remove(&key(1)), Some(key(2)));
        assert!(map.is_empty());
    }
}

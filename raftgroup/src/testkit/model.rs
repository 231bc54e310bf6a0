//! Sequential specifications that the linearizability checker tests histories against.
//!
//! A [`Model`] is the object as if it ran on one thread with no failures: a state, and a step
//! function that says whether an operation with a given input may return a given output from that
//! state, and what the state is afterwards. [`KvModel`] is the key-value register map the
//! simulator's state machine implements.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;

/// A sequential specification of an object.
///
/// The checker explores many orders of the same operations, cloning and hashing states to remember
/// which (set of operations, state) pairs it has already explored, so states should be small.
pub trait Model {
    /// The object's state. Two states that compare equal must behave the same for every future
    /// operation: the checker merges the searches from equal states.
    type State: Clone + Eq + Hash + Debug;
    /// What a client asked for.
    type Input: Debug;
    /// What the object answered.
    type Output: Debug;

    /// The state before any operation.
    fn init(&self) -> Self::State;

    /// Applies `input` to `state`.
    ///
    /// With `Some(output)`, returns the state afterwards if the object may answer `output` to
    /// `input` in `state`, or `None` if that answer is impossible there. With `None` the output is
    /// unknown (the request failed or timed out, so it may or may not have taken effect): the model
    /// must accept any output and return the state after the operation took effect.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Option<Self::State>;

    /// True if `input` never changes the state, whatever the state and output.
    ///
    /// The checker drops such operations when their output is unknown: they constrain nothing. The
    /// default, `false`, is always correct; answering `true` only makes the search smaller.
    fn is_read_only(&self, input: &Self::Input) -> bool {
        let _ = input;
        false
    }
}

/// An operation on a map of registers: the client side of [`KvModel`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KvInput<K, V> {
    /// Sets `key` to `value`.
    Put {
        /// The register written.
        key: K,
        /// The value written.
        value: V,
    },
    /// Reads `key`.
    Get {
        /// The register read.
        key: K,
    },
    /// Sets `key` to `new` if it currently holds `expected` (`None`: if it was never written).
    CompareAndSet {
        /// The register compared and maybe written.
        key: K,
        /// The value the register must hold for the write to happen.
        expected: Option<V>,
        /// The value written if the comparison holds.
        new: V,
    },
}

impl<K, V> KvInput<K, V> {
    /// The one register this operation touches: the partition key for P-compositional checking.
    pub fn key(&self) -> &K {
        match self {
            KvInput::Put { key, .. }
            | KvInput::Get { key }
            | KvInput::CompareAndSet { key, .. } => key,
        }
    }
}

/// The answer to a [`KvInput`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KvOutput<V> {
    /// A put was applied.
    Put,
    /// A get read this value (`None`: never written).
    Get(Option<V>),
    /// A compare-and-set wrote (`true`) or found another value and did nothing (`false`).
    CompareAndSet(bool),
}

/// A map of independent registers with put, get and compare-and-set.
///
/// Every operation touches one key, so histories of this model can be checked key by key (see
/// [`check_partitioned`](super::check_partitioned) and [`check_kv`](super::check_kv)).
#[derive(Clone, Copy, Debug, Default)]
pub struct KvModel<K, V> {
    _types: std::marker::PhantomData<fn() -> (K, V)>,
}

impl<K, V> KvModel<K, V> {
    /// The model; it has no parameters.
    pub fn new() -> Self {
        KvModel { _types: std::marker::PhantomData }
    }
}

impl<K, V> Model for KvModel<K, V>
where
    K: Clone + Ord + Hash + Debug,
    V: Clone + Eq + Hash + Debug,
{
    type State = BTreeMap<K, V>;
    type Input = KvInput<K, V>;
    type Output = KvOutput<V>;

    fn init(&self) -> Self::State {
        BTreeMap::new()
    }

    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Option<Self::State> {
        match (input, output) {
            (KvInput::Put { key, value }, None | Some(KvOutput::Put)) => {
                let mut next = state.clone();
                next.insert(key.clone(), value.clone());
                Some(next)
            }
            (KvInput::Get { .. }, None) => Some(state.clone()),
            (KvInput::Get { key }, Some(KvOutput::Get(read))) => {
                (state.get(key) == read.as_ref()).then(|| state.clone())
            }
            (KvInput::CompareAndSet { key, expected, new }, output) => {
                let swapped = state.get(key) == expected.as_ref();
                match output {
                    None => {}
                    Some(KvOutput::CompareAndSet(claimed)) if *claimed == swapped => {}
                    Some(_) => return None,
                }
                let mut next = state.clone();
                if swapped {
                    next.insert(key.clone(), new.clone());
                }
                Some(next)
            }
            // An answer of the wrong kind (a put answered like a get) is never possible.
            (KvInput::Put { .. } | KvInput::Get { .. }, Some(_)) => None,
        }
    }

    fn is_read_only(&self, input: &Self::Input) -> bool {
        matches!(input, KvInput::Get { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Kv = KvModel<u8, u8>;

    fn put(key: u8, value: u8) -> KvInput<u8, u8> {
        KvInput::Put { key, value }
    }

    #[test]
    fn get_must_read_the_current_value() {
        let model = Kv::new();
        let state = model.step(&model.init(), &put(1, 7), Some(&KvOutput::Put)).unwrap();
        let get = KvInput::Get { key: 1 };
        assert_eq!(model.step(&state, &get, Some(&KvOutput::Get(Some(7)))), Some(state.clone()));
        assert_eq!(model.step(&state, &get, Some(&KvOutput::Get(Some(8)))), None);
        assert_eq!(model.step(&state, &get, Some(&KvOutput::Get(None))), None);
        let other = KvInput::Get { key: 2 };
        assert_eq!(model.step(&state, &other, Some(&KvOutput::Get(None))), Some(state));
    }

    #[test]
    fn compare_and_set_swaps_only_on_a_match() {
        let model = Kv::new();
        let empty = model.init();
        let from_none = KvInput::CompareAndSet { key: 1, expected: None, new: 3 };
        let after = model.step(&empty, &from_none, Some(&KvOutput::CompareAndSet(true))).unwrap();
        assert_eq!(after.get(&1), Some(&3));
        assert_eq!(model.step(&empty, &from_none, Some(&KvOutput::CompareAndSet(false))), None);
        // From 3, a CAS expecting nothing fails and changes nothing.
        assert_eq!(model.step(&after, &from_none, Some(&KvOutput::CompareAndSet(true))), None);
        assert_eq!(
            model.step(&after, &from_none, Some(&KvOutput::CompareAndSet(false))),
            Some(after.clone())
        );
        // Unknown output: the CAS takes effect exactly when it matches.
        let from_three = KvInput::CompareAndSet { key: 1, expected: Some(3), new: 4 };
        assert_eq!(model.step(&after, &from_three, None).unwrap().get(&1), Some(&4));
        assert_eq!(model.step(&empty, &from_three, None), Some(empty));
    }

    #[test]
    fn answers_of_the_wrong_kind_are_impossible() {
        let model = Kv::new();
        let empty = model.init();
        assert_eq!(model.step(&empty, &put(1, 1), Some(&KvOutput::Get(None))), None);
        assert_eq!(model.step(&empty, &KvInput::Get { key: 1 }, Some(&KvOutput::Put)), None);
        let cas = KvInput::CompareAndSet { key: 1, expected: None, new: 1 };
        assert_eq!(model.step(&empty, &cas, Some(&KvOutput::Put)), None);
    }

    #[test]
    fn only_gets_are_read_only() {
        let model = Kv::new();
        assert!(model.is_read_only(&KvInput::Get { key: 1 }));
        assert!(!model.is_read_only(&put(1, 1)));
        assert!(!model.is_read_only(&KvInput::CompareAndSet { key: 1, expected: None, new: 1 }));
    }
}

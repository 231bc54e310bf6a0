//! Tests of the linearizability checker: histories it must reject, histories it must accept, and
//! property tests against real sequential executions and a brute-force oracle.

use proptest::prelude::*;

use super::{
    CheckOptions, KvInput, KvModel, KvOutput, Model, OpId, Operation, Outcome, Verdict, check,
    check_kv,
};

type Op = Operation<KvInput<u8, u8>, KvOutput<u8>>;

const X: u8 = b'x';
const Y: u8 = b'y';

/// `[invoke, return]`, or `[invoke, unknown]` for a request that failed or timed out.
#[derive(Clone, Copy)]
enum Span {
    Done(u64, u64),
    Lost(u64),
}

fn operation(client: u64, input: KvInput<u8, u8>, output: KvOutput<u8>, span: Span) -> Op {
    let (invoke, outcome) = match span {
        Span::Done(invoke, at) => (invoke, Outcome::Returned { output, at }),
        Span::Lost(invoke) => (invoke, Outcome::Unknown),
    };
    Operation { client, input, invoke, outcome }
}

fn put(client: u64, key: u8, value: u8, span: Span) -> Op {
    operation(client, KvInput::Put { key, value }, KvOutput::Put, span)
}

fn get(client: u64, key: u8, read: Option<u8>, span: Span) -> Op {
    operation(client, KvInput::Get { key }, KvOutput::Get(read), span)
}

fn cas(client: u64, key: u8, expected: Option<u8>, new: u8, swapped: bool, span: Span) -> Op {
    operation(
        client,
        KvInput::CompareAndSet { key, expected, new },
        KvOutput::CompareAndSet(swapped),
        span,
    )
}

/// Checks key by key and, for histories small enough to search whole, also as one object: both
/// must agree.
fn verdict(history: &[Op]) -> Verdict {
    let partitioned = check_kv(history, &CheckOptions::default());
    if history.len() > 16 {
        // Unpartitioned, concurrent reads of different keys multiply the search.
        return partitioned;
    }
    let whole = check(&KvModel::new(), history, &CheckOptions::default());
    assert_eq!(
        partitioned.is_linearizable(),
        whole.is_linearizable(),
        "checking by key and as a whole disagree: {partitioned} / {whole}"
    );
    partitioned
}

#[track_caller]
fn assert_rejected(history: &[Op]) -> super::Violation {
    match verdict(history) {
        Verdict::NotLinearizable(violation) => *violation,
        other => panic!("expected a violation, got {other}"),
    }
}

#[track_caller]
fn assert_accepted(history: &[Op]) {
    let verdict = verdict(history);
    assert!(verdict.is_linearizable(), "expected linearizable, got {verdict}");
}

use Span::{Done, Lost};

// ---- histories that must be rejected -------------------------------------------------------------

#[test]
fn stale_read_after_a_completed_write_is_rejected() {
    let history = [put(1, X, 1, Done(0, 10)), get(2, X, None, Done(20, 30))];
    let violation = assert_rejected(&history);
    assert_eq!(violation.stuck, OpId(1), "{violation}");
    assert_eq!(violation.longest_prefix, vec![OpId(0)], "{violation}");
    assert_eq!(violation.partition.as_deref(), Some("120"));
    assert!(violation.explanation.contains("cannot place: #1 client 2 [20, 30]"), "{violation}");
    assert!(violation.explanation.contains("model refuses"), "{violation}");
}

#[test]
fn read_of_an_overwritten_value_is_rejected() {
    let history =
        [put(1, X, 1, Done(0, 10)), put(1, X, 2, Done(20, 30)), get(2, X, Some(1), Done(40, 50))];
    assert_eq!(assert_rejected(&history).stuck, OpId(2));
}

#[test]
fn reads_seeing_writes_in_opposite_orders_are_rejected() {
    // Both writes overlap everything; client 3 sees 1 then 2, client 4 sees 2 then 1.
    let history = [
        put(1, X, 1, Done(0, 100)),
        put(2, X, 2, Done(0, 100)),
        get(3, X, Some(1), Done(10, 20)),
        get(3, X, Some(2), Done(30, 40)),
        get(4, X, Some(2), Done(10, 20)),
        get(4, X, Some(1), Done(30, 40)),
    ];
    assert_rejected(&history);
}

#[test]
fn compare_and_set_succeeding_twice_from_the_same_value_is_rejected() {
    let history = [
        put(1, X, 0, Done(0, 10)),
        cas(2, X, Some(0), 1, true, Done(20, 30)),
        cas(3, X, Some(0), 2, true, Done(20, 30)),
    ];
    assert_rejected(&history);
}

#[test]
fn compare_and_set_failing_on_a_matching_value_is_rejected() {
    let history = [put(1, X, 0, Done(0, 10)), cas(2, X, Some(0), 1, false, Done(20, 30))];
    assert_rejected(&history);
}

#[test]
fn read_of_a_value_never_written_is_rejected() {
    let history =
        [put(1, X, 1, Done(0, 10)), put(2, X, 2, Lost(5)), get(3, X, Some(7), Done(0, 100))];
    assert_rejected(&history);
}

#[test]
fn read_cannot_see_a_lost_write_invoked_after_it_returned() {
    let history = [get(1, X, Some(1), Done(0, 10)), put(2, X, 1, Lost(20))];
    assert_rejected(&history);
}

#[test]
fn a_lost_write_cannot_be_seen_and_then_unseen() {
    let history =
        [put(1, X, 1, Lost(0)), get(2, X, Some(1), Done(10, 20)), get(2, X, None, Done(30, 40))];
    assert_rejected(&history);
}

#[test]
fn a_lost_write_takes_effect_at_most_once() {
    // 1 is written once (lost), overwritten by 2, and then seen again.
    let history = [
        put(1, X, 1, Lost(0)),
        get(2, X, Some(1), Done(10, 20)),
        put(2, X, 2, Done(30, 40)),
        get(2, X, Some(1), Done(50, 60)),
    ];
    assert_rejected(&history);
}

#[test]
fn a_violation_on_one_key_is_found_among_many_linearizable_keys() {
    let mut history = Vec::new();
    for key in 0..20 {
        history.push(put(1, key, key, Done(u64::from(key) * 10, u64::from(key) * 10 + 5)));
        history.push(get(2, key, Some(key), Done(300, 310)));
    }
    history.push(get(3, 13, None, Done(400, 410)));
    let violation = assert_rejected(&history);
    assert_eq!(violation.partition.as_deref(), Some("13"));
    assert_eq!(violation.stuck, OpId(history.len() - 1));
}

#[test]
fn the_longest_prefix_is_reported_on_a_long_history() {
    // A long linearizable run on one key, then a read of a value long overwritten.
    let mut history = Vec::new();
    for value in 0..50 {
        let start = u64::from(value) * 10;
        history.push(put(1, X, value, Done(start, start + 5)));
    }
    history.push(get(2, X, Some(3), Done(1_000, 1_010)));
    let violation = assert_rejected(&history);
    assert_eq!(violation.longest_prefix, (0..50).map(OpId).collect::<Vec<_>>());
    assert_eq!(violation.stuck, OpId(50));
    assert!(violation.explanation.contains("the first 30 not shown"), "{violation}");
}

// ---- histories that must be accepted -------------------------------------------------------------

#[test]
fn empty_and_all_lost_histories_are_linearizable() {
    assert_accepted(&[]);
    assert_accepted(&[put(1, X, 1, Lost(0)), get(2, X, None, Lost(0))]);
}

#[test]
fn a_read_concurrent_with_a_write_may_see_either_value() {
    for read in [None, Some(1)] {
        assert_accepted(&[put(1, X, 1, Done(0, 10)), get(2, X, read, Done(5, 15))]);
    }
    assert_rejected(&[put(1, X, 1, Done(0, 10)), get(2, X, Some(2), Done(5, 15))]);
}

#[test]
fn operations_touching_at_one_tick_are_concurrent() {
    // By convention a return and an invocation at the same tick are not ordered.
    assert_accepted(&[put(1, X, 1, Done(0, 10)), get(2, X, None, Done(10, 20))]);
}

#[test]
fn concurrent_writes_may_be_seen_in_either_order_if_reads_agree() {
    let history = [
        put(1, X, 1, Done(0, 100)),
        put(2, X, 2, Done(0, 100)),
        get(3, X, Some(2), Done(10, 20)),
        get(4, X, Some(2), Done(15, 25)),
        get(3, X, Some(1), Done(30, 40)),
        get(4, X, Some(1), Done(50, 60)),
        get(5, X, Some(1), Done(90, 200)),
    ];
    assert_accepted(&history);
}

#[test]
fn a_lost_write_observed_later_is_accepted() {
    let history = [
        put(1, X, 1, Done(0, 10)),
        put(2, X, 2, Lost(20)),
        get(3, X, Some(1), Done(30, 40)),
        get(3, X, Some(2), Done(500, 510)),
        get(4, X, Some(2), Done(600, 610)),
    ];
    assert_accepted(&history);
}

#[test]
fn a_lost_write_never_observed_is_accepted() {
    let history = [
        put(1, X, 1, Done(0, 10)),
        put(2, X, 2, Lost(20)),
        get(3, X, Some(1), Done(30, 40)),
        get(3, X, Some(1), Done(500, 510)),
    ];
    assert_accepted(&history);
}

#[test]
fn a_lost_compare_and_set_may_have_swapped() {
    let history = [
        put(1, X, 1, Done(0, 10)),
        cas(2, X, Some(1), 2, true, Lost(20)),
        cas(3, X, Some(1), 3, false, Done(30, 40)),
        get(3, X, Some(2), Done(50, 60)),
    ];
    assert_accepted(&history);
}

#[test]
fn compare_and_set_races_have_one_winner() {
    let history = [
        cas(1, X, None, 1, true, Done(0, 10)),
        cas(2, X, None, 2, false, Done(0, 10)),
        cas(3, X, Some(1), 3, true, Done(5, 30)),
        get(4, X, Some(1), Done(8, 12)),
        get(4, X, Some(3), Done(40, 50)),
    ];
    assert_accepted(&history);
}

#[test]
fn keys_are_independent() {
    // Interleaved keys: each key's history alone is linearizable.
    let history = [
        put(1, X, 1, Done(0, 10)),
        put(1, Y, 1, Done(20, 30)),
        get(2, Y, Some(1), Done(40, 50)),
        get(2, X, Some(1), Done(60, 70)),
        put(3, X, 2, Lost(65)),
        get(2, Y, Some(1), Done(80, 90)),
    ];
    assert_accepted(&history);
}

#[test]
fn an_unanswered_operation_known_to_have_taken_effect_must_be_placed_in_time() {
    let took_effect = |value, invoke, by| Operation {
        client: 1,
        input: KvInput::Put { key: X, value },
        invoke,
        outcome: Outcome::TookEffect { by },
    };
    // Seen by a later read: fine; not seen by a read after `by`: a lost write.
    assert_accepted(&[took_effect(1, 0, 10), get(2, X, Some(1), Done(20, 30))]);
    assert_rejected(&[took_effect(1, 0, 10), get(2, X, None, Done(20, 30))]);
    // Before `by` it may or may not be visible yet.
    assert_accepted(&[took_effect(1, 0, 50), get(2, X, None, Done(20, 30))]);
    let mut history = super::History::new();
    let id = history.invoke(1, KvInput::CompareAndSet { key: X, expected: None, new: 1 }, 0);
    history.took_effect(id, 10);
    let read = history.invoke(2, KvInput::Get { key: X }, 20);
    history.complete(read, KvOutput::Get(Some(1)), 30);
    assert_accepted(history.operations());
    assert_eq!(history.operations()[0].output(), None);
}

#[test]
fn reads_of_many_lost_writes_are_explained_cheaply() {
    // Forty writes lost at once; later reads see some of them, one after another. Each read is
    // explained by placing the lost write it saw just before it.
    let mut history: Vec<Op> = (0..40).map(|value| put(value.into(), X, value, Lost(0))).collect();
    for (position, value) in [3u8, 17, 5, 39, 22, 0, 31].into_iter().enumerate() {
        let start = 100 + 10 * position as u64;
        history.push(get(50, X, Some(value), Done(start, start + 5)));
    }
    let verdict = check_kv(&history, &CheckOptions { max_steps: 10_000 });
    assert!(verdict.is_linearizable(), "{verdict}");
    // Seeing one of them again after another is not linearizable; proving it means trying
    // every subset of the lost writes, so only with a dozen of them.
    let mut history: Vec<Op> = (0..12).map(|value| put(value.into(), X, value, Lost(0))).collect();
    for (position, value) in [3u8, 7, 5, 7].into_iter().enumerate() {
        let start = 100 + 10 * position as u64;
        history.push(get(50, X, Some(value), Done(start, start + 5)));
    }
    let violation = assert_rejected(&history);
    assert_eq!(violation.stuck, OpId(15), "{violation}");
}

// ---- the work bound --------------------------------------------------------------------------------

#[test]
fn the_search_gives_up_at_its_step_budget() {
    // Thirty lost writes all concurrent with a read of a value none of them wrote: the search must
    // try every subset of the writes before concluding, far more than the budget.
    let mut history: Vec<Op> = (0..30).map(|value| put(1, X, value, Lost(0))).collect();
    history.push(put(1, X, 30, Done(0, 5)));
    history.push(get(2, X, Some(99), Done(10, 20)));
    let options = CheckOptions { max_steps: 1_000 };
    match check_kv(&history, &options) {
        Verdict::Unknown(exhausted) => {
            // Choosing the next moves may take a few steps past the budget, one per operation
            // at most, before the search stops.
            assert!((1_000..1_000 + 32).contains(&exhausted.steps), "{}", exhausted.steps);
            assert_eq!(exhausted.partition.as_deref(), Some("120"));
            // The furthest point reached is explained: the impossible read is the one stuck.
            assert!(exhausted.explanation.contains("cannot place: #31"), "{exhausted}");
        }
        other => panic!("expected the budget to run out, got {other}"),
    }
    // With fewer lost writes the same history is decided within the default budget.
    history.drain(..22);
    assert_rejected(&history);
}

// ---- properties ------------------------------------------------------------------------------------

/// An operation drawn at random, before it is given times and an outcome.
#[derive(Clone, Debug)]
struct Draw {
    kind: u8,
    key: u8,
    value: u8,
    expected: Option<u8>,
    early: u64,
    late: u64,
    fate: u8,
}

fn draws(len: std::ops::Range<usize>, keys: u8, values: u8) -> impl Strategy<Value = Vec<Draw>> {
    prop::collection::vec(
        (0..3u8, 0..keys, 0..values, prop::option::of(0..values), 0..250u64, 0..250u64, 0..20u8)
            .prop_map(|(kind, key, value, expected, early, late, fate)| Draw {
                kind,
                key,
                value,
                expected,
                early,
                late,
                fate,
            }),
        len,
    )
}

fn input_of(draw: &Draw) -> KvInput<u8, u8> {
    match draw.kind {
        0 => KvInput::Put { key: draw.key, value: draw.value },
        1 => KvInput::Get { key: draw.key },
        _ => KvInput::CompareAndSet { key: draw.key, expected: draw.expected, new: draw.value },
    }
}

/// The output `input` produces from `state` in a sequential execution.
fn run(state: &mut std::collections::BTreeMap<u8, u8>, input: &KvInput<u8, u8>) -> KvOutput<u8> {
    match input {
        KvInput::Put { key, value } => {
            state.insert(*key, *value);
            KvOutput::Put
        }
        KvInput::Get { key } => KvOutput::Get(state.get(key).copied()),
        KvInput::CompareAndSet { key, expected, new } => {
            let swapped = state.get(key) == expected.as_ref();
            if swapped {
                state.insert(*key, *new);
            }
            KvOutput::CompareAndSet(swapped)
        }
    }
}

/// A history produced by running `draws` one after another, operation `i` taking effect at tick
/// `100 * (i + 1)` and spanning a random interval around it. Fate 0: the client lost the answer;
/// fate 1: the request was lost before taking effect; otherwise answered.
fn sequential_history(draws: &[Draw]) -> Vec<Op> {
    let mut state = std::collections::BTreeMap::new();
    let mut history = Vec::new();
    for (index, draw) in draws.iter().enumerate() {
        let point = 100 * (index as u64 + 1);
        let input = input_of(draw);
        let invoke = point - draw.early.min(point);
        let outcome = match draw.fate {
            1 => Outcome::Unknown,
            fate => {
                let output = run(&mut state, &input);
                if fate == 0 {
                    Outcome::Unknown
                } else {
                    Outcome::Returned { output, at: point + draw.late }
                }
            }
        };
        history.push(Operation { client: index as u64 % 5, input, invoke, outcome });
    }
    history
}

/// Decides linearizability by trying every subset of the lost operations and every order of the
/// operations kept: no memoization, no candidate rule, no partitioning.
fn brute_force(history: &[Op]) -> bool {
    fn extend(history: &[Op], order: &mut Vec<usize>, used: &mut [bool]) -> bool {
        // Stop here if the operations not used may all be left out, and the order is legal.
        let complete = history
            .iter()
            .zip(used.iter())
            .all(|(operation, &used)| used || operation.return_time().is_none());
        if complete && legal(history, order) {
            return true;
        }
        for index in 0..history.len() {
            if !used[index] {
                used[index] = true;
                order.push(index);
                let found = extend(history, order, used);
                order.pop();
                used[index] = false;
                if found {
                    return true;
                }
            }
        }
        false
    }
    fn legal(history: &[Op], order: &[usize]) -> bool {
        for (position, &later) in order.iter().enumerate() {
            for &earlier in &order[..position] {
                // `later` must not have returned before `earlier` was invoked.
                if history[later].return_time().is_some_and(|at| at < history[earlier].invoke) {
                    return false;
                }
            }
        }
        let model = KvModel::new();
        let mut state = model.init();
        for &index in order {
            let operation = &history[index];
            match model.step(&state, &operation.input, operation.output()) {
                Some(next) => state = next,
                None => return false,
            }
        }
        true
    }
    extend(history, &mut Vec::new(), &mut vec![false; history.len()])
}

/// A small history with random times and random (often impossible) outputs.
fn arbitrary_history() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        (
            0..3u8,
            0..2u8,
            0..3u8,
            prop::option::of(0..3u8),
            0..20u64,
            0..12u64,
            0..5u8,
            prop::option::of(0..3u8),
            any::<bool>(),
        ),
        0..7,
    )
    .prop_map(|draws| {
        draws
            .into_iter()
            .enumerate()
            .map(|(client, (kind, key, value, expected, invoke, length, fate, read, swapped))| {
                let input = input_of(&Draw { kind, key, value, expected, early: 0, late: 0, fate });
                let output = match input {
                    KvInput::Put { .. } => KvOutput::Put,
                    KvInput::Get { .. } => KvOutput::Get(read),
                    KvInput::CompareAndSet { .. } => KvOutput::CompareAndSet(swapped),
                };
                let outcome = if fate == 0 {
                    Outcome::Unknown
                } else {
                    Outcome::Returned { output, at: invoke + length }
                };
                Operation { client: client as u64, input, invoke, outcome }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn sequential_executions_with_overlaps_are_linearizable(draws in draws(0..120, 3, 4)) {
        let history = sequential_history(&draws);
        let verdict = check_kv(&history, &CheckOptions::default());
        prop_assert!(verdict.is_linearizable(), "{}", verdict);
        let whole = check(&KvModel::new(), &history, &CheckOptions::default());
        prop_assert!(whole.is_linearizable(), "{}", whole);
    }

    #[test]
    fn a_corrupted_read_in_a_sequential_history_is_rejected(
        draws in draws(1..60, 2, 4),
        victim in any::<prop::sample::Index>(),
        wrong in 0..5u8,
    ) {
        // No overlaps and no lost answers: the only linearization is the execution order, so a
        // read answered anything but what it read there is a violation.
        let answered: Vec<Draw> =
            draws.into_iter().map(|draw| Draw { fate: 2, ..draw }).collect();
        let mut history: Vec<Op> = sequential_history(&answered)
            .into_iter()
            .enumerate()
            .map(|(index, mut operation)| {
                let point = 100 * (index as u64 + 1);
                operation.invoke = point;
                if let Outcome::Returned { at, .. } = &mut operation.outcome {
                    *at = point;
                }
                operation
            })
            .collect();
        let reads: Vec<usize> = (0..history.len())
            .filter(|&index| matches!(history[index].input, KvInput::Get { .. }))
            .collect();
        prop_assume!(!reads.is_empty());
        let target = reads[victim.index(reads.len())];
        let Outcome::Returned { output: KvOutput::Get(read), .. } = &mut history[target].outcome
        else {
            unreachable!("reads answer with a value")
        };
        let corrupted = (wrong < 4).then_some(wrong);
        prop_assume!(*read != corrupted);
        *read = corrupted;
        let verdict = check_kv(&history, &CheckOptions::default());
        let violation = verdict.violation();
        prop_assert!(violation.is_some(), "accepted a corrupted read: {}", verdict);
        prop_assert_eq!(violation.map(|violation| violation.stuck), Some(OpId(target)));
    }

    #[test]
    fn the_search_agrees_with_brute_force(history in arbitrary_history()) {
        let expected = brute_force(&history);
        let whole = check(&KvModel::new(), &history, &CheckOptions::default());
        prop_assert_eq!(whole.is_linearizable(), expected, "{}", whole);
        prop_assert!(!matches!(whole, Verdict::Unknown(_)));
        let by_key = check_kv(&history, &CheckOptions::default());
        prop_assert_eq!(by_key.is_linearizable(), expected, "{}", by_key);
    }
}

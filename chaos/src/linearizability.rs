//! A linearizability checker for histories of concurrent operations: the Wing–Gong–Lowe search
//! with memoisation, as Porcupine and Knossos use it.
//!
//! A history is a list of operations, each with the time it was invoked and the time its answer
//! came back. An operation whose answer never came (a timeout, a dropped connection: outcome
//! unknown) returns at +∞ and matches any output: placed after everything, it is the same as
//! not having happened, so the checker may decide either. Operations on different keys are
//! independent, so a history is checked key by key (P-compositionality).
//!
//! The search walks the calls and returns in time order. At a call it tries to linearize that
//! operation next (the model must accept its input and output); if the resulting
//! (linearized set, state) pair was not seen before, it commits and starts over; at a return
//! of an operation not yet linearized, it backtracks. The history is linearizable when every
//! operation has been linearized.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + Hash;
    type Input;
    type Output;
    fn init(&self) -> Self::State;
    /// The state after `input` with answer `output`, or `None` if the model cannot give that
    /// answer from `state`.
    fn step(&self, state: &Self::State, input: &Self::Input, output: &Self::Output) -> Option<Self::State>;
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Operation<I, O> {
    /// Which independent object it acts on.
    pub key: String,
    pub input: I,
    pub output: O,
    /// When the client invoked it.
    pub call: u64,
    /// When its answer came back; `None` when it never did (outcome unknown).
    pub ret: Option<u64>,
}

/// The verdict on one key's sub-history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order explains the answers to the operations on `key`; `linearized` of its
    /// `operations` is the most the search could put in an order, for a report.
    NotLinearizable {
        key: String,
        linearized: usize,
        operations: usize,
        /// Index (among the key's operations, in history order) of the operation the deepest
        /// attempt could not place: the unplaced one that returned first.
        stuck: usize,
    },
}

#[derive(Debug, Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    prev: usize,
    next: usize,
}

/// A doubly linked list of call/return events in time order, with a sentinel head at 0.
struct Events {
    nodes: Vec<Event>,
    /// Index of each operation's call and return event.
    call_of: Vec<usize>,
    ret_of: Vec<usize>,
}

impl Events {
    fn new(times: &[(u64, Option<u64>)]) -> Events {
        let mut order: Vec<(u64, bool, usize)> = Vec::new();
        for (op, (call, ret)) in times.iter().enumerate() {
            order.push((*call, true, op));
            order.push((ret.unwrap_or(u64::MAX), false, op));
        }
        // At equal times calls come first: such operations count as concurrent.
        order.sort_by_key(|(time, is_call, op)| (*time, !*is_call, *op));
        let mut nodes = vec![Event { op: usize::MAX, is_call: false, prev: 0, next: 1 }];
        let (mut call_of, mut ret_of) = (vec![0; times.len()], vec![0; times.len()]);
        for (i, (_, is_call, op)) in order.iter().enumerate() {
            let index = i + 1;
            nodes.push(Event { op: *op, is_call: *is_call, prev: index - 1, next: index + 1 });
            if *is_call {
                call_of[*op] = index;
            } else {
                ret_of[*op] = index;
            }
        }
        let end = nodes.len();
        if let Some(last) = nodes.last_mut() {
            last.next = end;
        }
        nodes[0].next = if end > 1 { 1 } else { end };
        Events { nodes, call_of, ret_of }
    }

    fn end(&self) -> usize {
        self.nodes.len()
    }

    fn unlink(&mut self, index: usize) {
        let Event { prev, next, .. } = self.nodes[index];
        self.nodes[prev].next = next;
        if next < self.end() {
            self.nodes[next].prev = prev;
        }
    }

    fn relink(&mut self, index: usize) {
        let Event { prev, next, .. } = self.nodes[index];
        self.nodes[prev].next = index;
        if next < self.end() {
            self.nodes[next].prev = index;
        }
    }

    /// Takes an operation out of the list (its call and return).
    fn lift(&mut self, op: usize) {
        self.unlink(self.call_of[op]);
        self.unlink(self.ret_of[op]);
    }

    /// Puts it back (in reverse order of `lift`).
    fn unlift(&mut self, op: usize) {
        self.relink(self.ret_of[op]);
        self.relink(self.call_of[op]);
    }
}

/// An operation of a history of `M`.
pub type HistoryOp<M> = Operation<<M as Model>::Input, <M as Model>::Output>;

/// Checks one key's operations.
fn check_key<M: Model>(model: &M, key: &str, ops: &[&HistoryOp<M>]) -> Verdict {
    let times: Vec<(u64, Option<u64>)> = ops.iter().map(|o| (o.call, o.ret)).collect();
    let mut events = Events::new(&times);
    let mut linearized = vec![false; ops.len()];
    let mut seen: HashSet<(Vec<bool>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut best = 0;
    let mut best_set = linearized.clone();
    let stuck = |placed: &[bool]| {
        (0..ops.len()).filter(|i| !placed[*i]).min_by_key(|i| ops[*i].ret.unwrap_or(u64::MAX)).unwrap_or(0)
    };
    let mut cursor = events.nodes[0].next;
    while events.nodes[0].next != events.end() {
        if cursor == events.end() {
            // Only returns of linearized operations can be left at the end; nothing to try.
            let stuck = stuck(&best_set);
            return Verdict::NotLinearizable { key: key.to_string(), linearized: best, operations: ops.len(), stuck };
        }
        let event = events.nodes[cursor];
        if event.is_call {
            let op = ops[event.op];
            if let Some(next_state) = model.step(&state, &op.input, &op.output) {
                linearized[event.op] = true;
                if seen.insert((linearized.clone(), next_state.clone())) {
                    stack.push((event.op, state));
                    state = next_state;
                    events.lift(event.op);
                    if stack.len() > best {
                        best = stack.len();
                        best_set.clone_from(&linearized);
                    }
                    cursor = events.nodes[0].next;
                    continue;
                }
                linearized[event.op] = false;
            }
            cursor = event.next;
        } else {
            // The return of an operation not linearized yet: undo the last choice.
            let Some((op, previous)) = stack.pop() else {
                let stuck = stuck(&best_set);
                return Verdict::NotLinearizable {
                    key: key.to_string(),
                    linearized: best,
                    operations: ops.len(),
                    stuck,
                };
            };
            events.unlift(op);
            linearized[op] = false;
            state = previous;
            cursor = events.nodes[events.call_of[op]].next;
        }
    }
    Verdict::Linearizable
}

/// Checks a whole history, key by key; the first key that is not linearizable is reported.
pub fn check<M: Model>(model: &M, history: &[HistoryOp<M>]) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<&HistoryOp<M>>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, ops) in by_key {
        let verdict = check_key(model, key, &ops);
        if verdict != Verdict::Linearizable {
            return verdict;
        }
    }
    Verdict::Linearizable
}

/// A register with compare-and-set, the model of a resource read by GET and written with (or
/// without) `If-Match`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Register;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterInput {
    Read,
    Write(String),
    /// Write `to` if the value is `from`.
    Cas {
        from: String,
        to: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterOutput {
    /// What a read saw (`None`: nothing written yet).
    Value(Option<String>),
    Written,
    /// Whether a CAS applied.
    Swapped(bool),
    /// The answer never came.
    Unknown,
}

impl Model for Register {
    type State = Option<String>;
    type Input = RegisterInput;
    type Output = RegisterOutput;

    fn init(&self) -> Self::State {
        None
    }

    fn step(&self, state: &Self::State, input: &Self::Input, output: &Self::Output) -> Option<Self::State> {
        use RegisterInput::*;
        use RegisterOutput::*;
        match (input, output) {
            (Read, Value(seen)) => (seen == state).then(|| state.clone()),
            (Read, Unknown) => Some(state.clone()),
            (Write(value), Written | Unknown) => Some(Some(value.clone())),
            (Cas { from, to }, Swapped(true)) => (state.as_deref() == Some(from)).then(|| Some(to.clone())),
            (Cas { from, .. }, Swapped(false)) => (state.as_deref() != Some(from)).then(|| state.clone()),
            (Cas { from, to }, Unknown) => {
                Some(if state.as_deref() == Some(from) { Some(to.clone()) } else { state.clone() })
            }
            _ => None,
        }
    }
}

/// The register of [`Register`] when nothing is known of its value at the start: the model of
/// a window cut out of a longer history. It never rejects what the full model would accept
/// from some state, so a window it rejects is a real violation.
#[derive(Debug, Clone, Copy, Default)]
pub struct RegisterFromAnyState;

impl Model for RegisterFromAnyState {
    /// `None` while the value is still unknown.
    type State = Option<Option<String>>;
    type Input = RegisterInput;
    type Output = RegisterOutput;

    fn init(&self) -> Self::State {
        None
    }

    fn step(&self, state: &Self::State, input: &Self::Input, output: &Self::Output) -> Option<Self::State> {
        use RegisterInput::*;
        use RegisterOutput::*;
        match state {
            Some(known) => Register.step(known, input, output).map(Some),
            None => Some(match (input, output) {
                (Read, Value(seen)) => Some(seen.clone()),
                (Write(value), _) => Some(Some(value.clone())),
                (Cas { to, .. }, Swapped(true)) => Some(Some(to.clone())),
                // A failed or unanswered compare-and-set leaves the value unknown.
                _ => None,
            }),
        }
    }
}

/// The smallest stretch of one key's operations, around the operation the search could not
/// place (`stuck`, see [`Verdict::NotLinearizable`]), that is still not linearizable on its
/// own, judged from an unknown starting value. The history is cut only at quiet moments, when
/// no answered operation is in flight (what comes after such a moment cannot be ordered before
/// what came before it), so a window that fails shows a real violation. Operations whose answer
/// never came stay in a window once called: they may take effect at any later time.
pub fn minimal_window<I: Clone, O: Clone>(ops: &[Operation<I, O>], stuck: usize) -> Vec<Operation<I, O>>
where
    RegisterFromAnyState: Model<Input = I, Output = O>,
{
    let fails = |w: &[Operation<I, O>]| check(&RegisterFromAnyState, w) != Verdict::Linearizable;
    let Some(stuck_op) = ops.get(stuck) else { return ops.to_vec() };
    // Quiet moments: returns that no answered operation straddles.
    let mut quiet: Vec<u64> = ops
        .iter()
        .filter_map(|o| o.ret)
        .filter(|&t| !ops.iter().any(|o| o.ret.is_some_and(|r| o.call < t && t < r)))
        .collect();
    quiet.sort_unstable();
    quiet.dedup();
    let end = stuck_op.ret.and_then(|r| quiet.iter().copied().find(|&t| t >= r)).unwrap_or(u64::MAX);
    let window = |from: u64| -> Vec<Operation<I, O>> {
        let mut w: Vec<_> = ops
            .iter()
            .filter(|o| o.call <= end && (o.call >= from || o.ret.is_none()))
            .filter(|o| o.ret.is_none_or(|r| r >= from))
            .cloned()
            .collect();
        w.sort_by_key(|o| o.call);
        w
    };
    for &from in quiet.iter().rev().filter(|&&t| t <= stuck_op.call) {
        let candidate = window(from);
        if fails(&candidate) {
            return candidate;
        }
    }
    let whole = window(0);
    if fails(&whole) {
        whole
    } else {
        let mut all = ops.to_vec();
        all.sort_by_key(|o| o.call);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::RegisterInput::*;
    use super::RegisterOutput::*;
    use super::*;

    fn op(
        input: RegisterInput,
        output: RegisterOutput,
        call: u64,
        ret: Option<u64>,
    ) -> Operation<RegisterInput, RegisterOutput> {
        Operation { key: "x".into(), input, output, call, ret }
    }

    fn v(text: &str) -> Option<String> {
        Some(text.to_string())
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // write(1) and write(2) overlap; a later read may see either.
        for seen in ["1", "2"] {
            let history = vec![
                op(Write("1".into()), Written, 0, Some(10)),
                op(Write("2".into()), Written, 5, Some(15)),
                op(Read, Value(v(seen)), 20, Some(25)),
            ];
            assert_eq!(check(&Register, &history), Verdict::Linearizable, "read {seen}");
        }
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let history = vec![
            op(Write("1".into()), Written, 0, Some(10)),
            op(Write("2".into()), Written, 11, Some(20)),
            op(Read, Value(v("1")), 21, Some(30)),
        ];
        assert!(matches!(check(&Register, &history), Verdict::NotLinearizable { .. }));
        // A read overlapping the second write may still see the first value.
        let overlapping = vec![
            op(Write("1".into()), Written, 0, Some(10)),
            op(Write("2".into()), Written, 11, Some(20)),
            op(Read, Value(v("1")), 15, Some(30)),
        ];
        assert_eq!(check(&Register, &overlapping), Verdict::Linearizable);
    }

    #[test]
    fn compare_and_set_answers_must_agree_with_some_order() {
        let ok = vec![
            op(Write("a".into()), Written, 0, Some(1)),
            op(Cas { from: "a".into(), to: "b".into() }, Swapped(true), 2, Some(10)),
            op(Cas { from: "a".into(), to: "c".into() }, Swapped(false), 3, Some(11)),
            op(Read, Value(v("b")), 12, Some(13)),
        ];
        assert_eq!(check(&Register, &ok), Verdict::Linearizable);
        let both_won = vec![
            op(Write("a".into()), Written, 0, Some(1)),
            op(Cas { from: "a".into(), to: "b".into() }, Swapped(true), 2, Some(10)),
            op(Cas { from: "a".into(), to: "c".into() }, Swapped(true), 3, Some(11)),
        ];
        assert!(
            matches!(check(&Register, &both_won), Verdict::NotLinearizable { .. }),
            "two CAS from a cannot both win"
        );
    }

    #[test]
    fn an_operation_without_an_answer_may_or_may_not_have_happened() {
        let happened = vec![
            op(Write("1".into()), Written, 0, Some(5)),
            op(Write("2".into()), Unknown, 6, None),
            op(Read, Value(v("2")), 10, Some(12)),
        ];
        assert_eq!(check(&Register, &happened), Verdict::Linearizable);
        let did_not = vec![
            op(Write("1".into()), Written, 0, Some(5)),
            op(Write("2".into()), Unknown, 6, None),
            op(Read, Value(v("1")), 10, Some(12)),
        ];
        assert_eq!(check(&Register, &did_not), Verdict::Linearizable);
        let never_written = vec![op(Write("2".into()), Unknown, 6, None), op(Read, Value(v("3")), 10, Some(12))];
        assert!(matches!(check(&Register, &never_written), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn keys_are_checked_apart_and_the_bad_one_is_named() {
        let mut history = vec![op(Write("1".into()), Written, 0, Some(1)), op(Read, Value(v("1")), 2, Some(3))];
        history.push(Operation { key: "y".into(), input: Read, output: Value(v("ghost")), call: 0, ret: Some(1) });
        let Verdict::NotLinearizable { key, .. } = check(&Register, &history) else { panic!("not caught") };
        assert_eq!(key, "y");
    }

    /// A long concurrent history produced by a real sequential register (so it is
    /// linearizable by construction) is accepted; corrupting one read is caught. (How fast the
    /// search is belongs to benchmarks: a wall-clock bound here fails on a loaded machine.)
    #[test]
    fn long_histories_are_decided() {
        let mut seed = 42u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut value: Option<String> = None;
        let mut history = Vec::new();
        let mut time: u64 = 0;
        for i in 0..400 {
            // Each operation takes effect at `time`, its call a little before and its return a
            // little after: neighbours overlap, as concurrent clients do.
            let call = time.saturating_sub(next() % 4);
            let ret = time + next() % 4;
            let (input, output) = match next() % 3 {
                0 => {
                    value = Some(i.to_string());
                    (Write(i.to_string()), Written)
                }
                1 => (Read, Value(value.clone())),
                _ => {
                    let from = if next() % 2 == 0 { value.clone().unwrap_or_default() } else { "nope".into() };
                    let swapped = value.as_deref() == Some(from.as_str());
                    if swapped {
                        value = Some(format!("cas{i}"));
                    }
                    (Cas { from, to: format!("cas{i}") }, Swapped(swapped))
                }
            };
            history.push(op(input, output, call, Some(ret)));
            time += 5;
        }
        assert_eq!(check(&Register, &history), Verdict::Linearizable);
        let read = history.iter().position(|o| o.input == Read && matches!(o.output, Value(Some(_)))).unwrap();
        history[read].output = Value(v("never-written"));
        assert!(matches!(check(&Register, &history), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn the_minimal_window_keeps_only_the_write_and_the_stale_read() {
        let history = vec![
            op(Write("a".into()), Written, 0, Some(1)),
            op(Read, Value(v("a")), 2, Some(3)),
            op(Write("b".into()), Written, 4, Some(5)),
            op(Read, Value(v("a")), 6, Some(7)),
            op(Write("c".into()), Written, 8, Some(9)),
            op(Read, Value(v("c")), 10, Some(11)),
        ];
        let Verdict::NotLinearizable { stuck, .. } = check(&Register, &history) else { panic!("not caught") };
        assert_eq!(stuck, 3, "the stale read cannot be placed");
        let window = minimal_window(&history, stuck);
        assert_eq!(window, vec![history[2].clone(), history[3].clone()]);
    }
}

//! The one pattern behind proposal batching ([`crate::batcher`]), forwarding batches
//! ([`crate::forwarding`]) and shared read-index rounds ([`crate::read_index`]): while a few
//! groups are on their way, whatever arrives waits, and leaves as the next group. Writes
//! ([`next_write_group`]) wait for every group on its way unless theirs is full: each of their
//! groups costs a log entry on every member.
//!
//! A group holds its slot until it is done or [`MAX_HOLD`] has passed, whichever is first: a
//! group stuck on a leader that is gone (its RPC runs until the request deadline) must not
//! hold back the groups behind it, which would go to the new leader.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Waits for an item and a free slot of `in_flight`, then takes whatever else is queued by
/// now, up to `max` counted by `weight` (the first item always goes). The permit is the slot:
/// hold it until the group is done. `None` once every sender is gone.
pub(crate) async fn next_group<T>(
    queue: &mut mpsc::UnboundedReceiver<T>,
    in_flight: &Arc<Semaphore>,
    max: usize,
    weight: impl Fn(&T) -> usize,
) -> Option<(OwnedSemaphorePermit, Vec<T>)> {
    let first = queue.recv().await?;
    let permit = in_flight.clone().acquire_owned().await.ok()?;
    let mut taken = weight(&first);
    let mut group = vec![first];
    take_queued(queue, &mut group, &mut taken, max, &weight);
    Some((permit, group))
}

/// Moves what is queued now into `group`, while `taken` (by `weight`) is below `max`.
fn take_queued<T>(
    queue: &mut mpsc::UnboundedReceiver<T>,
    group: &mut Vec<T>,
    taken: &mut usize,
    max: usize,
    weight: &impl Fn(&T) -> usize,
) {
    while *taken < max {
        match queue.try_recv() {
            Ok(item) => {
                *taken += weight(&item);
                group.push(item);
            }
            Err(_) => break,
        }
    }
}

/// An item of a write group.
pub(crate) trait WriteItem {
    /// Its share of a group's [`WriteGroups::max`].
    fn weight(&self) -> usize;
    /// Whether no client's request waits on it (a node's own report: an executor's, a lease's):
    /// a group of only such items lingers for a client's write to go with it.
    fn is_background(&self) -> bool;
}

/// How [`next_write_group`] forms groups.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteGroups {
    /// Groups on their way at most: the permits of the slots' semaphore.
    pub slots: u32,
    /// Groups that leave as soon as they form; past this many on their way, what arrives waits.
    pub at_once: u32,
    /// A group's limit, by [`WriteItem::weight`].
    pub max: usize,
    /// How long a group of background items waits for a client's write to join it (zero: not
    /// at all).
    pub linger: Duration,
}

/// How long a leader's group of background commands waits for a client's write. A node's
/// report of an operation it ran (the second command of every create) used to leave alone, as
/// an entry of its own, and a lone client's next write, arriving a millisecond later, waited
/// for that entry's commit (0.7 ms of a 4 ms create through a load balancer). Lingering, the
/// report goes in the client's entry: one entry, one fsync and one apply fewer per create. Under
/// load groups are mixed and nothing lingers.
pub(crate) const BACKGROUND_LINGER: Duration = Duration::from_millis(2);

/// Like [`next_group`], for writes, where every group costs a log entry (an append, an fsync, a
/// replication message and an apply on every member): a group leaves at once while fewer than
/// `at_once` are on their way; past that, what arrives waits for one to be done and leaves with
/// everything that arrived by then. Only a full group (`max` by weight) leaves at once into
/// another free slot, so a queue longer than a group still keeps up to `slots` groups on their
/// way. A group of only background items first waits up to `linger` for an item that is not.
///
/// `at_once` = 1 against taking any free slot at once (`slots`): 11–15 % less CPU on the
/// members per create at 64 and 256 writing clients, with a lower p99 (interleaved benchmark
/// runs), but a lone write can wait behind another's group (see `--write-groups-at-once`).
pub(crate) async fn next_write_group<T: WriteItem>(
    queue: &mut mpsc::UnboundedReceiver<T>,
    in_flight: &Arc<Semaphore>,
    rule: WriteGroups,
) -> Option<(OwnedSemaphorePermit, Vec<T>)> {
    let WriteGroups { slots, at_once, max, linger } = rule;
    // Free slots that mean fewer than `at_once` groups are on their way.
    let free_enough = slots - at_once.clamp(1, slots) + 1;
    let first = queue.recv().await?;
    let mut lingering = (!linger.is_zero() && first.is_background()).then(|| tokio::time::Instant::now() + linger);
    let mut taken = first.weight();
    let mut group = vec![first];
    loop {
        take_queued(queue, &mut group, &mut taken, max, &T::weight);
        if taken >= max {
            let permit = in_flight.clone().acquire_owned().await.ok()?;
            return Some((permit, group));
        }
        if let Some(until) = lingering.filter(|_| group.iter().all(T::is_background)) {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => lingering = None,
                item = queue.recv() => match item {
                    Some(item) => {
                        taken += item.weight();
                        group.push(item);
                    }
                    None => lingering = None,
                },
            }
            continue;
        }
        tokio::select! {
            // Fewer than `at_once` groups on their way.
            idle = in_flight.clone().acquire_many_owned(free_enough) => {
                let mut all = idle.ok()?;
                let one = all.split(1)?;
                drop(all);
                take_queued(queue, &mut group, &mut taken, max, &T::weight);
                return Some((one, group));
            }
            item = queue.recv() => match item {
                Some(item) => {
                    taken += item.weight();
                    group.push(item);
                }
                // Every sender is gone: what is here leaves in the next free slot.
                None => {
                    let permit = in_flight.clone().acquire_owned().await.ok()?;
                    return Some((permit, group));
                }
            },
        }
    }
}

/// How long a group keeps its slot at most; groups take milliseconds when all is well.
pub(crate) const MAX_HOLD: Duration = Duration::from_millis(100);

/// Runs `work`, giving the slot back when it is done or after [`MAX_HOLD`].
pub(crate) async fn holding<F: Future>(permit: OwnedSemaphorePermit, work: F) -> F::Output {
    tokio::pin!(work);
    tokio::select! {
        done = &mut work => done,
        _ = tokio::time::sleep(MAX_HOLD) => {
            drop(permit);
            work.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl WriteItem for usize {
        fn weight(&self) -> usize {
            *self
        }
        fn is_background(&self) -> bool {
            false
        }
    }

    /// (weight, background)
    impl WriteItem for (usize, bool) {
        fn weight(&self) -> usize {
            self.0
        }
        fn is_background(&self) -> bool {
            self.1
        }
    }

    /// Three slots, `at_once` of them taken at once, groups of 4 by weight, no lingering.
    fn rule(at_once: u32) -> WriteGroups {
        WriteGroups { slots: 3, at_once, max: 4, linger: Duration::ZERO }
    }

    #[tokio::test]
    async fn a_group_is_what_waits_up_to_the_limit_by_weight() {
        let (send, mut queue) = mpsc::unbounded_channel();
        let in_flight = Arc::new(Semaphore::new(1));
        for n in [3, 1, 2, 5, 1] {
            send.send(n).unwrap();
        }
        let (permit, group) = next_group(&mut queue, &in_flight, 4, |n| *n).await.unwrap();
        assert_eq!(group, [3, 1], "stops once the limit is reached");
        assert_eq!(in_flight.available_permits(), 0, "the group holds the slot");
        drop(permit);
        let (permit, group) = next_group(&mut queue, &in_flight, 4, |n| *n).await.unwrap();
        assert_eq!(group, [2, 5], "the limit counts weight, and the first item always goes");
        drop(permit);
        drop(send);
        let (permit, group) = next_group(&mut queue, &in_flight, 4, |n| *n).await.unwrap();
        assert_eq!(group, [1], "what was sent before the senders went");
        drop(permit);
        assert!(next_group(&mut queue, &in_flight, 4, |n| *n).await.is_none());
    }

    #[tokio::test]
    async fn a_write_group_waits_for_the_one_on_its_way_unless_it_is_full() {
        let (send, mut queue) = mpsc::unbounded_channel::<usize>();
        let in_flight = Arc::new(Semaphore::new(3));
        send.send(1).unwrap();
        let (first, group) = next_write_group(&mut queue, &in_flight, rule(1)).await.unwrap();
        assert_eq!(group, [1], "nothing on its way: a lone item leaves at once");

        // While `first` is on its way, a group that is not full waits for it.
        send.send(1).unwrap();
        send.send(1).unwrap();
        let waiting = tokio::spawn({
            let in_flight = in_flight.clone();
            async move {
                let (permit, group) = next_write_group(&mut queue, &in_flight, rule(1)).await.unwrap();
                drop(permit);
                (queue, group)
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "two of four, with a group on its way: it waits");
        send.send(1).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "three of four still wait");
        drop(first);
        let (mut queue, group) = waiting.await.unwrap();
        assert_eq!(group, [1, 1, 1], "the one on its way is done: all that arrived leaves together");

        // A full group leaves at once in another slot, even with one on its way.
        let busy = in_flight.clone().acquire_owned().await.unwrap();
        for n in [2, 3, 1] {
            send.send(n).unwrap();
        }
        let (full, group) =
            tokio::time::timeout(Duration::from_secs(5), next_write_group(&mut queue, &in_flight, rule(1)))
                .await
                .expect("a full group does not wait")
                .unwrap();
        assert_eq!(group, [2, 3], "full by weight");
        assert_eq!(in_flight.available_permits(), 1, "two groups on their way");
        drop((busy, full));
        drop(send);
        let (_, group) = next_write_group(&mut queue, &in_flight, rule(1)).await.unwrap();
        assert_eq!(group, [1], "what was sent before the senders went");
        assert!(next_write_group(&mut queue, &in_flight, rule(1)).await.is_none());
    }

    #[tokio::test]
    async fn the_first_groups_at_once_leave_as_they_form_and_later_ones_wait() {
        let (send, mut queue) = mpsc::unbounded_channel::<usize>();
        let in_flight = Arc::new(Semaphore::new(3));
        send.send(1).unwrap();
        let (first, _) = next_write_group(&mut queue, &in_flight, rule(2)).await.unwrap();
        send.send(1).unwrap();
        let (second, group) =
            tokio::time::timeout(Duration::from_secs(5), next_write_group(&mut queue, &in_flight, rule(2)))
                .await
                .expect("one on its way, two may be: the second leaves at once")
                .unwrap();
        assert_eq!(group, [1]);
        send.send(1).unwrap();
        let waiting = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { next_write_group(&mut queue, &in_flight, rule(2)).await.map(|(_, group)| group) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "two on their way: the third waits although a slot is free");
        drop(first);
        assert_eq!(waiting.await.unwrap(), Some(vec![1]), "one is done: it leaves");
        drop(second);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_of_background_items_lingers_for_a_clients_write() {
        let (send, mut queue) = mpsc::unbounded_channel::<(usize, bool)>();
        let in_flight = Arc::new(Semaphore::new(3));
        let lingering = WriteGroups { linger: Duration::from_millis(2), ..rule(1) };
        send.send((1, true)).unwrap();
        let forming = tokio::spawn(async move {
            let (permit, group) = next_write_group(&mut queue, &in_flight, lingering).await.unwrap();
            drop(permit);
            (queue, in_flight, group)
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!forming.is_finished(), "a report alone waits, with every slot free");
        send.send((1, true)).unwrap();
        tokio::time::sleep(Duration::from_micros(100)).await;
        assert!(!forming.is_finished(), "another report does not end the wait");
        send.send((1, false)).unwrap();
        let (mut queue, in_flight, group) = forming.await.unwrap();
        assert_eq!(group, [(1, true), (1, true), (1, false)], "a client's write arrives: they leave together");

        // Nothing joins: the reports leave when the linger is over.
        send.send((1, true)).unwrap();
        let started = tokio::time::Instant::now();
        let (_, group) = next_write_group(&mut queue, &in_flight, lingering).await.unwrap();
        assert_eq!(group, [(1, true)]);
        assert_eq!(started.elapsed(), Duration::from_millis(2), "it waited the linger, no more");

        // A client's write never lingers, nor does a full group of reports.
        send.send((1, false)).unwrap();
        let (_, group) = next_write_group(&mut queue, &in_flight, lingering).await.unwrap();
        assert_eq!(group, [(1, false)]);
        send.send((4, true)).unwrap();
        let (_, group) = next_write_group(&mut queue, &in_flight, lingering).await.unwrap();
        assert_eq!(group, [(4, true)]);
        assert_eq!(started.elapsed(), Duration::from_millis(2), "neither waited");
    }

    #[tokio::test]
    async fn a_stuck_group_gives_its_slot_back() {
        let in_flight = Arc::new(Semaphore::new(1));
        let permit = in_flight.clone().acquire_owned().await.unwrap();
        let stuck = tokio::spawn(holding(permit, tokio::time::sleep(Duration::from_secs(60))));
        let freed = tokio::time::timeout(MAX_HOLD * 20, in_flight.clone().acquire_owned()).await;
        assert!(freed.is_ok(), "the slot comes back while the stuck group still runs");
        assert!(!stuck.is_finished());
        stuck.abort();
        drop(freed);
        let quick = in_flight.clone().acquire_owned().await.unwrap();
        assert_eq!(holding(quick, async { 7 }).await, 7);
        assert_eq!(in_flight.available_permits(), 1, "given back when done");
    }
}

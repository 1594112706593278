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

/// Like [`next_group`], for writes, where every group costs a log entry (an append, an fsync, a
/// replication message and an apply on every member): a group leaves at once while fewer than
/// `at_once` are on their way; past that, what arrives waits for one to be done and leaves with
/// everything that arrived by then. Only a full group (`max` by `weight`) leaves at once into
/// another free slot, so a queue longer than a group still keeps up to `slots` groups on their
/// way.
///
/// `at_once` = 1 against taking any free slot at once (`slots`): 11–15 % less CPU on the
/// members per create at 64 and 256 writing clients, with a lower p99 (interleaved benchmark
/// runs), but a lone write can wait behind another's group (see `--write-groups-at-once`).
pub(crate) async fn next_write_group<T>(
    queue: &mut mpsc::UnboundedReceiver<T>,
    in_flight: &Arc<Semaphore>,
    (slots, at_once): (u32, u32),
    max: usize,
    weight: impl Fn(&T) -> usize,
) -> Option<(OwnedSemaphorePermit, Vec<T>)> {
    // Free slots that mean fewer than `at_once` groups are on their way.
    let free_enough = slots - at_once.clamp(1, slots) + 1;
    let first = queue.recv().await?;
    let mut taken = weight(&first);
    let mut group = vec![first];
    loop {
        take_queued(queue, &mut group, &mut taken, max, &weight);
        if taken >= max {
            let permit = in_flight.clone().acquire_owned().await.ok()?;
            return Some((permit, group));
        }
        tokio::select! {
            // Fewer than `at_once` groups on their way.
            idle = in_flight.clone().acquire_many_owned(free_enough) => {
                let mut all = idle.ok()?;
                let one = all.split(1)?;
                drop(all);
                take_queued(queue, &mut group, &mut taken, max, &weight);
                return Some((one, group));
            }
            item = queue.recv() => match item {
                Some(item) => {
                    taken += weight(&item);
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
        let (send, mut queue) = mpsc::unbounded_channel();
        let in_flight = Arc::new(Semaphore::new(3));
        send.send(1).unwrap();
        let (first, group) = next_write_group(&mut queue, &in_flight, (3, 1), 4, |n| *n).await.unwrap();
        assert_eq!(group, [1], "nothing on its way: a lone item leaves at once");

        // While `first` is on its way, a group that is not full waits for it.
        send.send(1).unwrap();
        send.send(1).unwrap();
        let waiting = tokio::spawn({
            let in_flight = in_flight.clone();
            async move {
                let (permit, group) = next_write_group(&mut queue, &in_flight, (3, 1), 4, |n| *n).await.unwrap();
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
            tokio::time::timeout(Duration::from_secs(5), next_write_group(&mut queue, &in_flight, (3, 1), 4, |n| *n))
                .await
                .expect("a full group does not wait")
                .unwrap();
        assert_eq!(group, [2, 3], "full by weight");
        assert_eq!(in_flight.available_permits(), 1, "two groups on their way");
        drop((busy, full));
        drop(send);
        let (_, group) = next_write_group(&mut queue, &in_flight, (3, 1), 4, |n| *n).await.unwrap();
        assert_eq!(group, [1], "what was sent before the senders went");
        assert!(next_write_group(&mut queue, &in_flight, (3, 1), 4, |n| *n).await.is_none());
    }

    #[tokio::test]
    async fn the_first_groups_at_once_leave_as_they_form_and_later_ones_wait() {
        let (send, mut queue) = mpsc::unbounded_channel();
        let in_flight = Arc::new(Semaphore::new(3));
        send.send(1).unwrap();
        let (first, _) = next_write_group(&mut queue, &in_flight, (3, 2), 4, |n| *n).await.unwrap();
        send.send(1).unwrap();
        let (second, group) =
            tokio::time::timeout(Duration::from_secs(5), next_write_group(&mut queue, &in_flight, (3, 2), 4, |n| *n))
                .await
                .expect("one on its way, two may be: the second leaves at once")
                .unwrap();
        assert_eq!(group, [1]);
        send.send(1).unwrap();
        let waiting = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { next_write_group(&mut queue, &in_flight, (3, 2), 4, |n| *n).await.map(|(_, group)| group) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "two on their way: the third waits although a slot is free");
        drop(first);
        assert_eq!(waiting.await.unwrap(), Some(vec![1]), "one is done: it leaves");
        drop(second);
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

//! The active queue (Postfix's qmgr): the messages due for delivery, held
//! in memory by destination, and handed to the delivery workers in batches
//! within the connection limits.
//!
//! A batch is a list of lanes, one per destination; each lane holds one
//! connection's worth of messages (up to [`Limits::messages_per_lane`]),
//! which the component sends over one session. One component call carries
//! many lanes and drives them concurrently, so a slow destination costs a
//! socket, not a worker. A lane counts against the limits from the moment it
//! is handed out until its last message is recorded: at most
//! `max_connections` connections in all and `max_per_destination` lanes for
//! one destination.
//!
//! A message is scheduled by the domain of its first pending recipient, but
//! the component opens a session for each domain it has recipients at. So a
//! lane counts as many connections as its messages have domains (an upper
//! bound: lanes of one call that share a domain share its session), and the
//! limit on connections in all holds for messages to several domains too.
//! The limit per destination counts lanes by their first domain only.
//!
//! The queue is bounded, in messages and in bytes of messages held in
//! memory: producers (pickup, the queue scan) wait for room, so memory does
//! not grow with the backlog. Notices (DSNs) queued by a delivery never wait,
//! since only delivery makes room.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::queue::{Control, State};

/// How long a worker waits for a short batch to fill while messages are
/// still coming in: a few accept calls' worth.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// A message due for delivery.
#[derive(Debug, Clone)]
pub struct Message {
    pub control: Control,
    /// Set for a message fresh from pickup that was not written to the
    /// queue (it may never need to be: most are delivered at once).
    pub fresh: Option<Fresh>,
}

/// A message accepted from pickup and held in memory: its claimed file is
/// still in the Queue folder, so a crash loses nothing.
#[derive(Debug, Clone)]
pub struct Fresh {
    /// The claimed pickup file, removed once the message is delivered or
    /// written to the queue.
    pub claimed: String,
    /// The cleaned message, as the component accepted it.
    pub message: Arc<[u8]>,
}

impl Message {
    /// Bytes of the message, for the call budget.
    pub fn size(&self) -> u64 {
        match &self.fresh {
            Some(fresh) => fresh.message.len() as u64,
            None => self.control.size,
        }
    }

    /// Bytes it holds in memory.
    fn memory(&self) -> usize {
        self.fresh.as_ref().map_or(0, |f| f.message.len())
    }
}

/// How a message enters the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Found by the queue scan: skipped when it is already in the queue;
    /// waits for room.
    Scanned,
    /// Accepted from pickup, its queue id reserved when it was claimed;
    /// waits for room.
    Reserved,
    /// Queued by a delivery (a DSN): never waits, since only deliveries
    /// make room.
    Notice,
}

/// One connection's worth of messages for one destination.
#[derive(Debug)]
pub struct Lane {
    pub destination: String,
    pub messages: Vec<Message>,
    /// The connections it counts for: the domains its messages have
    /// pending recipients at (at least one).
    pub connections: usize,
}

/// The domains of a message's pending recipients, lowercased, each once, in
/// the order of the recipients.
pub fn pending_domains(control: &Control) -> Vec<String> {
    let mut domains: Vec<String> = Vec::new();
    for recipient in control
        .recipients
        .iter()
        .filter(|r| r.state == State::Pending)
    {
        if let Some((_, domain)) = recipient.address.rsplit_once('@') {
            let domain = domain.to_ascii_lowercase();
            if !domains.contains(&domain) {
                domains.push(domain);
            }
        }
    }
    domains
}

/// The scheduling key of a message: the domain of its first pending
/// recipient. The limit per destination counts lanes by it; where the mail
/// of each domain really goes is the component's decision.
pub fn destination(control: &Control) -> String {
    pending_domains(control)
        .into_iter()
        .next()
        .unwrap_or_default()
}

/// The limits of the active queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections in flight in all (see [`Lane::connections`]).
    pub max_connections: usize,
    /// Lanes in flight for one destination.
    pub max_per_destination: usize,
    /// Lanes in one component call.
    pub lanes_per_call: usize,
    /// Messages in one lane.
    pub messages_per_lane: usize,
    /// Bytes of messages in one call (the component reads them as it goes,
    /// but this bounds what one call can hold at once).
    pub bytes_per_call: u64,
    /// Messages waiting at most.
    pub max_waiting: usize,
    /// Bytes of fresh messages waiting at most.
    pub max_memory: usize,
}

#[derive(Default)]
struct Destination {
    waiting: VecDeque<Message>,
    lanes: usize,
}

#[derive(Default)]
struct Inner {
    destinations: HashMap<String, Destination>,
    /// Destinations with waiting messages, in turn.
    ready: VecDeque<String>,
    /// Queue ids waiting, in flight, or being accepted: never queued twice.
    ids: HashSet<String>,
    waiting: usize,
    memory: usize,
    connections: usize,
    batches: usize,
    producers: usize,
    stopping: bool,
}

/// The active queue; shared by the producers and the delivery workers.
pub struct ActiveQueue {
    inner: Mutex<Inner>,
    changed: Condvar,
    limits: Limits,
}

impl ActiveQueue {
    pub fn new(limits: Limits) -> Self {
        ActiveQueue {
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        self.changed
            .wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A producer starts: workers wait for it before they call the queue drained.
    pub fn producer_started(&self) {
        self.lock().producers += 1;
    }

    /// A producer is done.
    pub fn producer_done(&self) {
        self.lock().producers -= 1;
        self.changed.notify_all();
    }

    /// Stop handing out batches; the ones in flight finish.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.changed.notify_all();
    }

    /// Whether `queue_id` is waiting, in flight or being accepted.
    pub fn contains(&self, queue_id: &str) -> bool {
        self.lock().ids.contains(queue_id)
    }

    /// Reserve `queue_id` while its message is being accepted, so that the
    /// queue scan leaves its claimed file alone; false when it is taken.
    pub fn reserve(&self, queue_id: &str) -> bool {
        self.lock().ids.insert(queue_id.to_string())
    }

    /// Forget `queue_id` (a reserved one that did not make it into the queue).
    pub fn release(&self, queue_id: &str) {
        self.lock().ids.remove(queue_id);
        self.changed.notify_all();
    }

    /// Add a due message for `destination`; false when it is already
    /// queued (a scanned one) or the queue stopped.
    pub fn push(&self, destination: String, message: Message, admission: Admission) -> bool {
        let mut inner = self.lock();
        let id = message.control.queue_id.clone();
        if admission == Admission::Scanned && inner.ids.contains(&id) {
            return false;
        }
        while admission != Admission::Notice
            && !inner.stopping
            && inner.waiting > 0
            && self.full(&inner, &message)
        {
            inner = self.wait(inner);
        }
        if inner.stopping {
            inner.ids.remove(&id);
            return false;
        }
        inner.ids.insert(id);
        inner.waiting += 1;
        inner.memory += message.memory();
        let entry = inner.destinations.entry(destination.clone()).or_default();
        let was_idle = entry.waiting.is_empty();
        entry.waiting.push_back(message);
        if was_idle {
            inner.ready.push_back(destination);
        }
        drop(inner);
        self.changed.notify_all();
        true
    }

    fn full(&self, inner: &Inner, message: &Message) -> bool {
        inner.waiting >= self.limits.max_waiting
            || inner.memory + message.memory() > self.limits.max_memory
    }

    /// The next batch of lanes; waits until one can be formed. `None` when
    /// the queue stopped, or when nothing waits, nothing is in flight and no
    /// producer is left (the end of a `--once` pass).
    pub fn next_batch(&self) -> Option<Vec<Lane>> {
        let mut inner = self.lock();
        let mut window = None;
        loop {
            if inner.stopping {
                return None;
            }
            // A call is only as wide as the lanes there when it starts: while
            // producers are at work, give a short batch a moment to fill.
            if inner.producers > 0 && self.available_lanes(&inner) < self.limits.lanes_per_call {
                let until = *window.get_or_insert_with(|| Instant::now() + BATCH_WINDOW);
                let left = until.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    inner = self
                        .changed
                        .wait_timeout(inner, left)
                        .map(|(guard, _)| guard)
                        .unwrap_or_else(|poisoned| poisoned.into_inner().0);
                    continue;
                }
            }
            let lanes = self.form_batch(&mut inner, self.limits.lanes_per_call);
            if !lanes.is_empty() {
                inner.batches += 1;
                return Some(lanes);
            }
            if inner.producers == 0 && inner.waiting == 0 && inner.batches == 0 {
                // Wake the other workers: they are done too.
                self.changed.notify_all();
                return None;
            }
            inner = self.wait(inner);
        }
    }

    /// Lanes a batch formed now would get, at most `lanes_per_call`.
    fn available_lanes(&self, inner: &Inner) -> usize {
        let free = self
            .limits
            .max_connections
            .saturating_sub(inner.connections);
        inner
            .ready
            .iter()
            .filter(|key| {
                inner
                    .destinations
                    .get(*key)
                    .is_some_and(|d| d.lanes < self.limits.max_per_destination)
            })
            .take(self.limits.lanes_per_call.min(free))
            .count()
    }

    /// More lanes for a call under way that holds `open_lanes`, without
    /// waiting: as many as it has room for, within the connection limits.
    /// Empty when nothing waits or the queue stopped.
    pub fn more_lanes(&self, open_lanes: usize) -> Vec<Lane> {
        let room = self.limits.lanes_per_call.saturating_sub(open_lanes);
        let mut inner = self.lock();
        if inner.stopping || room == 0 || inner.waiting == 0 {
            return Vec::new();
        }
        self.form_batch(&mut inner, room)
    }

    fn form_batch(&self, inner: &mut Inner, max_lanes: usize) -> Vec<Lane> {
        let limits = &self.limits;
        let mut lanes = Vec::new();
        let mut bytes = 0u64;
        let mut turns = inner.ready.len();
        while turns > 0 && lanes.len() < max_lanes && inner.connections < limits.max_connections {
            turns -= 1;
            let Some(key) = inner.ready.pop_front() else {
                break;
            };
            let Some(destination) = inner.destinations.get_mut(&key) else {
                continue;
            };
            if destination.lanes >= limits.max_per_destination {
                inner.ready.push_back(key);
                continue;
            }
            let mut messages = Vec::new();
            let mut memory = 0;
            let mut domains: Vec<String> = Vec::new();
            while messages.len() < limits.messages_per_lane {
                let Some(next) = destination.waiting.front() else {
                    break;
                };
                let size = next.size();
                // The first message of a call always goes, whatever its size.
                if bytes > 0 && bytes + size > limits.bytes_per_call {
                    break;
                }
                let mut with_next = domains.clone();
                for domain in pending_domains(&next.control) {
                    if !with_next.contains(&domain) {
                        with_next.push(domain);
                    }
                }
                // A message to more domains than the limit still goes when
                // nothing else is in flight, or it never would.
                let connections = inner.connections + with_next.len().max(1);
                if connections > limits.max_connections
                    && (!messages.is_empty() || inner.connections > 0)
                {
                    break;
                }
                domains = with_next;
                bytes += size;
                if let Some(message) = destination.waiting.pop_front() {
                    memory += message.memory();
                    messages.push(message);
                }
            }
            let more = !destination.waiting.is_empty();
            if messages.is_empty() {
                // Over the byte budget or the connections: this destination
                // starts the next call.
                inner.ready.push_front(key);
                break;
            }
            let connections = domains.len().max(1);
            destination.lanes += 1;
            inner.connections += connections;
            inner.waiting -= messages.len();
            inner.memory -= memory;
            if more {
                inner.ready.push_back(key.clone());
            }
            lanes.push(Lane {
                destination: key,
                messages,
                connections,
            });
        }
        if !lanes.is_empty() {
            // Producers may be waiting for room.
            self.changed.notify_all();
        }
        lanes
    }

    /// Every message of a lane is recorded: its connections are free, and
    /// its messages leave the queue (a deferred one comes back with the
    /// scan). `connections` is the lane's [`Lane::connections`].
    pub fn lane_done<'a>(
        &self,
        destination: &str,
        connections: usize,
        queue_ids: impl IntoIterator<Item = &'a str>,
    ) {
        let mut inner = self.lock();
        for id in queue_ids {
            inner.ids.remove(id);
        }
        inner.connections = inner.connections.saturating_sub(connections);
        if let Some(entry) = inner.destinations.get_mut(destination) {
            entry.lanes = entry.lanes.saturating_sub(1);
            if entry.lanes == 0 && entry.waiting.is_empty() {
                inner.destinations.remove(destination);
            }
        }
        drop(inner);
        self.changed.notify_all();
    }

    /// A batch is over (its lanes are all done).
    pub fn batch_done(&self) {
        let mut inner = self.lock();
        inner.batches = inner.batches.saturating_sub(1);
        drop(inner);
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 4,
            max_per_destination: 2,
            lanes_per_call: 3,
            messages_per_lane: 2,
            bytes_per_call: 1 << 20,
            max_waiting: 100,
            max_memory: 1 << 20,
        }
    }

    fn message(id: &str) -> Message {
        Message {
            control: Control {
                queue_id: id.to_string(),
                original_name: format!("{id}.eml"),
                sender: String::new(),
                recipients: Vec::new(),
                attempts: 0,
                first_seen_ms: 0,
                next_attempt_ms: 0,
                delay_notice_sent: false,
                size: 100,
            },
            fresh: None,
        }
    }

    /// A message to `recipients`; those starting with `-` are delivered.
    fn message_to(id: &str, recipients: &[&str]) -> Message {
        let mut message = message(id);
        message.control.recipients = recipients
            .iter()
            .map(|address| crate::queue::Recipient {
                address: address.trim_start_matches('-').to_string(),
                state: if address.starts_with('-') {
                    State::Delivered
                } else {
                    State::Pending
                },
                status: None,
                last_reply: None,
                remote_mta: None,
            })
            .collect();
        message
    }

    #[test]
    fn pending_domains_are_lowercased_once_each_in_order() {
        let m = message_to("m", &["a@B.test", "-c@done.test", "d@b.TEST", "e@c.test"]);
        assert_eq!(pending_domains(&m.control), ["b.test", "c.test"]);
        assert_eq!(destination(&m.control), "b.test");
        assert_eq!(destination(&message_to("n", &["-a@x.test"]).control), "");
    }

    #[test]
    fn a_lane_counts_a_connection_for_each_domain_of_its_messages() {
        let queue = ActiveQueue::new(limits());
        let three = ["r@a.test", "r@b.test", "r@c.test"];
        queue.push(
            "a.test".into(),
            message_to("m1", &three),
            Admission::Scanned,
        );
        queue.push(
            "a.test".into(),
            message_to("m2", &three[..2]),
            Admission::Scanned,
        );
        queue.push(
            "x.test".into(),
            message_to("m3", &["r@x.test", "r@y.test"]),
            Admission::Scanned,
        );
        // m1 and m2 share a lane of three domains; m3's two would pass the
        // limit of four connections.
        let first = queue.next_batch().unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(ids(&first[0]), ["m1", "m2"]);
        assert_eq!(first[0].connections, 3);
        assert!(
            queue.more_lanes(1).is_empty(),
            "one connection is left, m3 needs two"
        );
        queue.lane_done("a.test", 3, ["m1", "m2"]);
        let second = queue.more_lanes(0);
        assert_eq!(second[0].connections, 2);
        // A message to more domains than the limit goes when nothing else
        // is in flight.
        queue.lane_done("x.test", 2, ["m3"]);
        let five = ["r@1.test", "r@2.test", "r@3.test", "r@4.test", "r@5.test"];
        queue.push("1.test".into(), message_to("m4", &five), Admission::Scanned);
        assert_eq!(queue.more_lanes(0)[0].connections, 5);
    }

    fn ids(lane: &Lane) -> Vec<&str> {
        lane.messages
            .iter()
            .map(|m| m.control.queue_id.as_str())
            .collect()
    }

    #[test]
    fn batches_take_one_lane_per_destination_within_the_limits() {
        let queue = ActiveQueue::new(limits());
        for (id, destination) in [
            ("a1", "a"),
            ("a2", "a"),
            ("a3", "a"),
            ("b1", "b"),
            ("c1", "c"),
            ("d1", "d"),
        ] {
            assert!(queue.push(destination.into(), message(id), Admission::Scanned));
        }
        assert!(
            !queue.push("a".into(), message("a1"), Admission::Scanned),
            "already queued"
        );
        let first = queue.next_batch().unwrap();
        let got: Vec<(&str, Vec<&str>)> = first
            .iter()
            .map(|l| (l.destination.as_str(), ids(l)))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", vec!["a1", "a2"]),
                ("b", vec!["b1"]),
                ("c", vec!["c1"])
            ]
        );
        // One connection left in all: destination d, then a's second lane waits.
        let second = queue.next_batch().unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].destination, "d");
        queue.lane_done("b", 1, ["b1"]);
        let third = queue.next_batch().unwrap();
        assert_eq!(
            (third[0].destination.as_str(), ids(&third[0])),
            ("a", vec!["a3"])
        );
        assert!(!queue.contains("b1") && queue.contains("a1"));
    }

    #[test]
    fn a_call_under_way_takes_more_lanes_up_to_its_share() {
        let queue = ActiveQueue::new(limits());
        queue.push("a".into(), message("a1"), Admission::Scanned);
        let first = queue.next_batch().unwrap();
        assert_eq!(first.len(), 1);
        assert!(queue.more_lanes(1).is_empty(), "nothing waits");
        for (id, destination) in [("b1", "b"), ("c1", "c"), ("d1", "d")] {
            queue.push(destination.into(), message(id), Admission::Scanned);
        }
        // Three lanes per call: room for two beside the open one.
        let more = queue.more_lanes(1);
        let got: Vec<&str> = more.iter().map(|l| l.destination.as_str()).collect();
        assert_eq!(got, vec!["b", "c"]);
        assert!(queue.more_lanes(3).is_empty(), "the call is full");
        assert_eq!(queue.more_lanes(0)[0].destination, "d");
    }

    #[test]
    fn the_queue_drains_when_producers_are_done() {
        let queue = ActiveQueue::new(limits());
        queue.producer_started();
        queue.push("a".into(), message("a1"), Admission::Scanned);
        queue.producer_done();
        let batch = queue.next_batch().unwrap();
        queue.lane_done("a", 1, ["a1"]);
        queue.batch_done();
        drop(batch);
        assert!(queue.next_batch().is_none());
    }

    #[test]
    fn a_full_queue_holds_producers_back_until_a_batch_leaves() {
        let queue = Arc::new(ActiveQueue::new(Limits {
            max_waiting: 1,
            ..limits()
        }));
        queue.push("a".into(), message("a1"), Admission::Scanned);
        let producer = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.push("b".into(), message("b1"), Admission::Scanned))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!queue.contains("b1"), "the producer waits for room");
        let batch = queue.next_batch().unwrap();
        assert!(producer.join().unwrap());
        assert_eq!(batch[0].destination, "a");
        assert!(queue.contains("b1"));
    }
}

//! The relay's publisher: sends the relay's messages to JetStream in log order, many in flight
//! at once, and reports each batch once every message of it is acknowledged.
//!
//! # Why the order holds whatever fails
//!
//! The invariant, over everything the relay ever stored in its JetStream stream: a message is
//! stored only after every message that precedes it in the log (among those the relay publishes)
//! is stored. Each origin stream's messages are therefore stored in log order, each once (the
//! duplicate window drops repeats). Two ways of sending keep it:
//!
//! - **Unguarded, at the front.** The first unacknowledged message is sent without a condition
//!   only while every message before it is acknowledged. An acknowledgement (a duplicate's too)
//!   means JetStream has stored that message, and the messages before the publisher's first one
//!   are stored because the runner's checkpoint moves only past acknowledged messages.
//! - **Guarded, behind it.** Every other message carries `Nats-Expected-Last-Msg-Id` = the id of
//!   the message sent right before it, so it is sent at once, without waiting for that one's
//!   acknowledgement. JetStream stores it only if that message is the last one the stream
//!   stored, and by the invariant everything before that one is stored too. JetStream checks
//!   `Nats-Msg-Id` against its duplicate window before the guard, so a message already stored
//!   is acknowledged as a duplicate whatever the guard says.
//!
//! A lost, rejected or timed-out message therefore stores nothing behind it: the guarded
//! messages after it fail (wrong last message id). Then nothing more is sent until every
//! acknowledgement in flight has come back; the first unacknowledged message is sent again,
//! unguarded, and the ones after it guarded again, their stored copies coming back as
//! duplicates. A guard that fails for another reason (the broker restarted and forgot its last
//! message id, something else published to the stream) costs the same restart, never the
//! order. The message at the front is sent at most `attempts` times; then the batch holding it
//! fails, and the publisher stops: whatever was handed to it after that fails too, until the
//! relay is discarded and a new publisher starts from the runner's checkpoint.

use std::collections::VecDeque;
use std::future::Future;

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::Context;
use cqrs_core::{EventId, Position};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::relay::RelayError;

/// One message, built from one event.
pub(crate) struct Outgoing {
    pub(crate) event_id: EventId,
    pub(crate) position: Position,
    pub(crate) subject: String,
    pub(crate) message: Publish,
}

/// A batch handed to the publisher, and where to say that it is acknowledged.
struct Batch {
    messages: Vec<Outgoing>,
    done: oneshot::Sender<Result<(), RelayError>>,
}

/// The handle of a running publisher task; dropping it stops the task.
pub(crate) struct Publisher {
    batches: mpsc::UnboundedSender<Batch>,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Starts a publisher on the current tokio runtime. Its first message is sent unguarded:
    /// start one only where every message before the ones it will be given is acknowledged.
    pub(crate) fn start(jetstream: Context, attempts: u32) -> Self {
        let (batches, input) = mpsc::unbounded_channel();
        let task = tokio::spawn(Run::new(jetstream, attempts).run(input));
        Self { batches, task }
    }

    /// Hands `messages` over (sent after everything handed over before them); the future
    /// resolves once all of them are acknowledged, or with the error that stopped the publisher.
    pub(crate) fn publish(
        &self,
        messages: Vec<Outgoing>,
    ) -> impl Future<Output = Result<(), RelayError>> + Send + 'static {
        let (done, acknowledged) = oneshot::channel();
        let handed = self.batches.send(Batch { messages, done }).is_ok();
        async move {
            if !handed {
                return Err(RelayError::Stopped);
            }
            acknowledged.await.unwrap_or(Err(RelayError::Stopped))
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A message not yet acknowledged.
struct Unacked {
    message: Outgoing,
    acked: bool,
    /// Times it was sent at the front (unguarded).
    front_sends: u32,
    /// Its last failure.
    error: Option<PublishError>,
}

/// An acknowledgement in flight: the message's number, and the outcome.
type Ack = BoxFuture<'static, (u64, Result<(), PublishError>)>;

/// The publisher task's state.
struct Run {
    jetstream: Context,
    attempts: u32,
    /// The unacknowledged messages in log order; the front is the first unacknowledged one.
    queue: VecDeque<Unacked>,
    /// The number of the message at the front (messages are numbered from 0 as handed over).
    base: u64,
    /// The index in `queue` of the next message to send.
    next: usize,
    /// A message failed: send nothing until the acknowledgements in flight are back, then start
    /// again at the front.
    broken: bool,
    /// Each batch's end (the number after its last message), in order, and its reply.
    ends: VecDeque<(u64, oneshot::Sender<Result<(), RelayError>>)>,
    in_flight: FuturesUnordered<Ack>,
}

impl Run {
    fn new(jetstream: Context, attempts: u32) -> Self {
        Self {
            jetstream,
            attempts,
            queue: VecDeque::new(),
            base: 0,
            next: 0,
            broken: false,
            ends: VecDeque::new(),
            in_flight: FuturesUnordered::new(),
        }
    }

    async fn run(mut self, mut input: mpsc::UnboundedReceiver<Batch>) {
        let mut open = true;
        loop {
            if self.broken && self.in_flight.is_empty() {
                if let Err(error) = self.restart() {
                    self.fail(error);
                    return;
                }
            }
            self.send_ready().await;
            self.complete_batches();
            tokio::select! {
                batch = input.recv(), if open => match batch {
                    Some(batch) => self.enqueue(batch),
                    None => open = false,
                },
                Some((number, outcome)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.settle(number, outcome);
                }
                else => return,
            }
        }
    }

    fn enqueue(&mut self, batch: Batch) {
        self.queue
            .extend(batch.messages.into_iter().map(|message| Unacked {
                message,
                acked: false,
                front_sends: 0,
                error: None,
            }));
        let end = self.base + self.queue.len() as u64;
        self.ends.push_back((end, batch.done));
    }

    /// Sends every message not sent yet, in order, unless a failure is being drained. The
    /// acknowledgements in flight are taken in meanwhile: the JetStream context lends each
    /// message a permit of its `max_ack_inflight` until its acknowledgement is taken, so a send
    /// may wait for them.
    async fn send_ready(&mut self) {
        while !self.broken && self.next < self.queue.len() {
            let index = self.next;
            let number = self.base + index as u64;
            let guard = index
                .checked_sub(1)
                .map(|before| self.queue[before].message.event_id);
            let unacked = &mut self.queue[index];
            if guard.is_none() {
                unacked.front_sends += 1;
            }
            let event_id = unacked.message.event_id;
            let subject = unacked.message.subject.clone();
            let mut message = unacked.message.message.clone();
            if let Some(guard) = guard {
                message = message.expected_last_message_id(guard.to_string());
            }
            let jetstream = self.jetstream.clone();
            let send = async move { jetstream.send_publish(subject, message).await };
            tokio::pin!(send);
            let sent = loop {
                tokio::select! {
                    biased;
                    sent = &mut send => break sent,
                    Some((number, outcome)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                        self.settle(number, outcome);
                    }
                }
            };
            match sent {
                Ok(ack) => self.in_flight.push(
                    std::future::IntoFuture::into_future(ack)
                        .map(move |outcome| (number, outcome.map(drop)))
                        .boxed(),
                ),
                Err(error) => {
                    tracing::debug!(%event_id, %error, "sending a message failed");
                    if let Some(unacked) = self.unacked(number) {
                        unacked.error = Some(error);
                    }
                    self.broken = true;
                }
            }
            self.next += 1;
        }
    }

    /// The unacknowledged message numbered `number`.
    fn unacked(&mut self, number: u64) -> Option<&mut Unacked> {
        let index = usize::try_from(number.checked_sub(self.base)?).ok()?;
        self.queue.get_mut(index)
    }

    fn settle(&mut self, number: u64, outcome: Result<(), PublishError>) {
        let Some(unacked) = self.unacked(number) else {
            return;
        };
        match outcome {
            Ok(()) => unacked.acked = true,
            Err(error) => {
                if !unacked.acked {
                    tracing::debug!(event_id = %unacked.message.event_id, %error,
                        "publish failed; the messages from the first unacknowledged one will be sent again");
                    unacked.error = Some(error);
                    self.broken = true;
                }
            }
        }
        while self.queue.front().is_some_and(|u| u.acked) {
            self.queue.pop_front();
            self.base += 1;
            self.next = self.next.saturating_sub(1);
        }
    }

    /// Resolves every batch whose messages are all acknowledged.
    fn complete_batches(&mut self) {
        while self.ends.front().is_some_and(|(end, _)| *end <= self.base) {
            if let Some((_, done)) = self.ends.pop_front() {
                // The relay may have given up on the batch (a stopped runner): nobody to tell.
                let _ = done.send(Ok(()));
            }
        }
    }

    /// Starts sending again at the front, or says why not (it was sent there `attempts` times).
    fn restart(&mut self) -> Result<(), RelayError> {
        self.broken = false;
        self.next = 0;
        let Some(front) = self.queue.front_mut() else {
            return Ok(());
        };
        if front.front_sends < self.attempts {
            return Ok(());
        }
        let Some(source) = front.error.take() else {
            return Ok(());
        };
        Err(RelayError::Publish {
            event_id: front.message.event_id,
            position: front.message.position,
            subject: front.message.subject.clone(),
            source,
        })
    }

    /// Fails the batch holding the front message with `error`; the batches after it learn that
    /// the publisher stopped.
    fn fail(&mut self, error: RelayError) {
        self.complete_batches();
        if let Some((_, done)) = self.ends.pop_front() {
            let _ = done.send(Err(error));
        }
        self.ends.clear();
        self.queue.clear();
    }
}

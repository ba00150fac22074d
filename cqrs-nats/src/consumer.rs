//! The consumer: a durable JetStream pull consumer feeding a projection (or process manager) in
//! another service, with exactly-once effects on its read model.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{self, Message};
use cqrs_core::backend::{BatchError, Lease, ProjectionBackend};
use cqrs_core::{EventId, Position, Projection, ProjectionError, RecordedEvent, StoreError};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::headers::{self, MessageError};

/// De-duplication by event id inside the read model's transaction: JetStream's duplicate window
/// drops a republish only within the window; beyond it a second copy arrives at a new sequence,
/// and the consumer drops it here. Also where skipped messages are recorded.
pub trait Inbox<C>: Send + Sync + 'static {
    /// Records on `context` (the batch's transaction) that `consumer` handled `event`: `true`
    /// the first time, `false` for a copy already handled.
    fn first_delivery<'a>(
        &'a self,
        context: &'a mut C,
        consumer: &'a str,
        event: EventId,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send + 'a;

    /// Records that `consumer` skipped the message at JetStream `sequence` on request, with the
    /// event id if it could be read.
    fn record_skip<'a>(
        &'a self,
        consumer: &'a str,
        sequence: u64,
        event: Option<EventId>,
        reason: &'a str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'a;
}

/// The user's projection behind the inbox: each event reaches it once per consumer name. Built by
/// [`Consumer::new`]; it is public only because backends are bounded by it.
pub struct Deduped<P, I> {
    inner: P,
    inbox: Arc<I>,
    name: Arc<str>,
}

impl<P: Projection, I> std::fmt::Debug for Deduped<P, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deduped")
            .field("projection", &P::NAME)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<P: Projection, I: Inbox<P::Context>> Projection for Deduped<P, I> {
    const NAME: &'static str = P::NAME;
    const EVENT_TYPES: &'static [&'static str] = P::EVENT_TYPES;
    const SUBSCRIPTION: cqrs_core::Subscription = P::SUBSCRIPTION;
    type Context = P::Context;

    async fn handle(
        &mut self,
        event: &RecordedEvent,
        context: &mut P::Context,
    ) -> Result<(), ProjectionError> {
        if !P::SUBSCRIPTION.matches(event) {
            return Ok(());
        }
        let first = self
            .inbox
            .first_delivery(context, &self.name, event.event_id)
            .await
            .map_err(|e| ProjectionError::Handler {
                projection: P::NAME,
                event_type: event.event_type.clone(),
                position: event.position,
                source: e.into(),
            })?;
        if first {
            self.inner.handle(event, context).await
        } else {
            tracing::debug!(event_id = %event.event_id, "redelivered event dropped");
            Ok(())
        }
    }

    fn flush<'a>(
        &'a mut self,
        context: &'a mut P::Context,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send + 'a {
        self.inner.flush(context)
    }

    fn discard(&mut self) {
        self.inner.discard();
    }
}

/// Tuning and naming of a [`Consumer`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// The JetStream stream.
    pub stream: String,
    /// The durable consumer's name, and the checkpoint and inbox name in the read model.
    pub durable: String,
    /// Only subjects matching this filter.
    pub filter_subject: Option<String>,
    /// Messages per batch (one read-model transaction).
    pub batch_size: usize,
    /// How long one fetch waits for messages.
    pub fetch_wait: Duration,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl ConsumerConfig {
    /// Consumes `stream` as durable `durable`.
    pub fn new(stream: impl Into<String>, durable: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            durable: durable.into(),
            filter_subject: None,
            batch_size: 100,
            fetch_wait: Duration::from_millis(500),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }

    /// Only subjects matching `filter` (e.g. `"orders.events.order.>"`).
    pub fn filter_subject(mut self, filter: impl Into<String>) -> Self {
        self.filter_subject = Some(filter.into());
        self
    }

    /// Messages per batch, at least 1.
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// Retry delays.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }
}

/// What a consumer is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsumerState {
    /// Started, not yet holding the lease.
    Starting,
    /// Another consumer of the same name holds the lease.
    Standby,
    /// Consuming.
    Running,
    /// Stopped before a failing message or by a broker or storage failure; retrying.
    Failed,
    /// Ended on request.
    Stopped,
}

/// Why a consumer is failing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerFailure {
    /// The failing message's JetStream stream sequence, when one message is at fault: it can
    /// then be skipped with [`ConsumerHandle::skip`].
    pub sequence: Option<u64>,
    /// The error with its causes.
    pub message: String,
}

/// A consumer's status.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStatus {
    /// What it does.
    pub state: ConsumerState,
    /// The last committed JetStream stream sequence.
    pub sequence: Option<u64>,
    /// Events handled (redeliveries included) since it started.
    pub processed: u64,
    /// The last failure, cleared by the next committed batch.
    pub last_error: Option<ConsumerFailure>,
}

enum Control {
    Stop,
    Skip(u64),
}

/// A running consumer.
#[derive(Debug)]
pub struct ConsumerHandle {
    status: watch::Receiver<ConsumerStatus>,
    control: mpsc::Sender<Control>,
    task: tokio::task::JoinHandle<()>,
}

impl ConsumerHandle {
    /// The current status.
    pub fn status(&self) -> ConsumerStatus {
        self.status.borrow().clone()
    }

    /// Waits until the committed sequence reaches `sequence`, or `timeout`; the status then.
    pub async fn wait_for(&self, sequence: u64, timeout: Duration) -> Option<ConsumerStatus> {
        let mut status = self.status.clone();
        let reached = tokio::time::timeout(
            timeout,
            status.wait_for(|s| s.sequence.is_some_and(|s| s >= sequence)),
        )
        .await;
        reached.ok().and_then(Result::ok).map(|s| s.clone())
    }

    /// Waits until the status satisfies `condition`, or `timeout`.
    pub async fn wait_until(
        &self,
        condition: impl Fn(&ConsumerStatus) -> bool,
        timeout: Duration,
    ) -> Option<ConsumerStatus> {
        let mut status = self.status.clone();
        let reached = tokio::time::timeout(timeout, status.wait_for(|s| condition(s))).await;
        reached.ok().and_then(Result::ok).map(|s| s.clone())
    }

    /// Skips the failing message at `sequence` (recorded through the [`Inbox`]); ignored unless
    /// the consumer is failing on exactly that message.
    pub async fn skip(&self, sequence: u64) {
        let _ = self.control.send(Control::Skip(sequence)).await;
    }

    /// Stops the consumer after its current step.
    pub async fn stop(self) {
        let _ = self.control.send(Control::Stop).await;
        let _ = self.task.await;
    }
}

/// A fetched message and what it decodes to.
struct Held {
    message: Message,
    sequence: u64,
    event: Result<RecordedEvent, MessageError>,
}

/// A durable JetStream pull consumer feeding projection `P` through backend `B` (whose
/// checkpoint stores the JetStream stream sequence as `Position { tx: 0, sequence }`), with
/// de-duplication by event id through `I`. See the crate docs for why it is exactly-once.
pub struct Consumer<P, B, I> {
    projection: Deduped<P, I>,
    backend: Arc<B>,
    inbox: Arc<I>,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    config: ConsumerConfig,
}

impl<P: Projection, B, I> std::fmt::Debug for Consumer<P, B, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("projection", &P::NAME)
            .finish_non_exhaustive()
    }
}

impl<P, B, I> Consumer<P, B, I>
where
    P: Projection,
    I: Inbox<P::Context>,
    B: ProjectionBackend<Deduped<P, I>>,
{
    /// A consumer of `config.stream` on `client`, applying to `projection` through `backend`.
    pub fn new(
        client: async_nats::Client,
        projection: P,
        backend: Arc<B>,
        inbox: Arc<I>,
        config: ConsumerConfig,
    ) -> Self {
        Self {
            projection: Deduped {
                inner: projection,
                inbox: Arc::clone(&inbox),
                name: Arc::from(config.durable.as_str()),
            },
            backend,
            inbox,
            jetstream: jetstream::new(client.clone()),
            client,
            config,
        }
    }

    /// Starts the consumer on the tokio runtime.
    pub fn spawn(self) -> ConsumerHandle {
        let (status_tx, status) = watch::channel(ConsumerStatus {
            state: ConsumerState::Starting,
            sequence: None,
            processed: 0,
            last_error: None,
        });
        let (control, control_rx) = mpsc::channel(8);
        let span = tracing::info_span!("nats_consumer", durable = %self.config.durable);
        let task = tokio::spawn(tracing::Instrument::instrument(
            self.run(status_tx, control_rx),
            span,
        ));
        ConsumerHandle {
            status,
            control,
            task,
        }
    }

    fn failed(
        status: &watch::Sender<ConsumerStatus>,
        sequence: Option<u64>,
        error: &dyn std::error::Error,
    ) {
        let message = chain(error);
        tracing::error!(?sequence, error = %message, "consumer failed; retrying with backoff");
        status.send_modify(|s| {
            s.state = ConsumerState::Failed;
            s.last_error = Some(ConsumerFailure { sequence, message });
        });
    }

    /// (Re)creates the durable consumer at the message after the committed checkpoint: the
    /// read model's checkpoint is the truth, JetStream's ack state only a cache of it.
    async fn cursor(
        jetstream: &jetstream::Context,
        config: &ConsumerConfig,
        checkpoint: Option<u64>,
    ) -> Result<PullConsumer, async_nats::Error> {
        let stream = jetstream.get_stream(&config.stream).await?;
        match stream.delete_consumer(&config.durable).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(e.into()),
        }
        let deliver_policy = match checkpoint {
            Some(sequence) => DeliverPolicy::ByStartSequence {
                start_sequence: sequence + 1,
            },
            None => DeliverPolicy::All,
        };
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(config.durable.clone()),
                deliver_policy,
                ack_policy: AckPolicy::Explicit,
                filter_subject: config.filter_subject.clone().unwrap_or_default(),
                ..Default::default()
            })
            .await?;
        Ok(consumer)
    }

    async fn run(
        mut self,
        status: watch::Sender<ConsumerStatus>,
        mut control: mpsc::Receiver<Control>,
    ) {
        let name = self.config.durable.clone();
        let mut lease: Option<Box<dyn Lease>> = None;
        let mut checkpoint: Option<u64> = None;
        let mut cursor: Option<(PullConsumer, u64)> = None;
        let mut held: VecDeque<Held> = VecDeque::new();
        let mut backoff = self.config.initial_backoff;
        let mut failing_at: Option<u64> = None;
        let mut skip: Option<u64> = None;
        loop {
            let wait = |backoff: &mut Duration| {
                let delay = *backoff;
                *backoff = (*backoff * 2).min(self.config.max_backoff);
                delay
            };
            while let Ok(message) = control.try_recv() {
                match message {
                    Control::Stop => {
                        status.send_modify(|s| s.state = ConsumerState::Stopped);
                        return;
                    }
                    Control::Skip(sequence) => skip = Some(sequence),
                }
            }
            let held_lease = match lease.as_mut() {
                Some(l) => l.is_held().await,
                None => false,
            };
            if !held_lease {
                held.clear();
                cursor = None;
                match self.backend.acquire_lease(&name).await {
                    Ok(Some(l)) => match self.backend.load_checkpoint(&name).await {
                        Ok(c) => {
                            lease = Some(l);
                            checkpoint = c.map(|p| p.sequence);
                            status.send_modify(|s| {
                                s.state = ConsumerState::Running;
                                s.sequence = checkpoint;
                            });
                        }
                        Err(e) => {
                            Self::failed(&status, None, &e);
                            let delay = wait(&mut backoff);
                            if sleep_or_stop(&mut control, &mut skip, delay).await {
                                break;
                            }
                            continue;
                        }
                    },
                    Ok(None) => {
                        status.send_modify(|s| s.state = ConsumerState::Standby);
                        if sleep_or_stop(&mut control, &mut skip, self.config.max_backoff).await {
                            break;
                        }
                        continue;
                    }
                    Err(e) => {
                        Self::failed(&status, None, &e);
                        let delay = wait(&mut backoff);
                        if sleep_or_stop(&mut control, &mut skip, delay).await {
                            break;
                        }
                        continue;
                    }
                }
            }

            if let Some(sequence) = skip.take() {
                let front = held.front().map(|h| h.sequence);
                if failing_at == Some(sequence) && front == Some(sequence) {
                    let reason = status
                        .borrow()
                        .last_error
                        .as_ref()
                        .map_or_else(String::new, |e| e.message.clone());
                    // From the headers: a message whose payload cannot be read still names
                    // its event.
                    let event = held
                        .front()
                        .and_then(|h| headers::event_id(h.message.headers.as_ref()));
                    let expected = checkpoint.map(|s| Position::new(0, s));
                    let to = Position::new(0, sequence);
                    let recorded = async {
                        self.inbox
                            .record_skip(&name, sequence, event, &reason)
                            .await?;
                        self.backend
                            .commit_batch(&mut self.projection, &name, expected, &[], to)
                            .await
                            .map_err(|e| match e {
                                BatchError::Store(e) => e,
                                other => StoreError::Backend(other.into()),
                            })
                    };
                    match recorded.await {
                        Ok(()) => {
                            tracing::warn!(sequence, %reason, "message skipped on request");
                            if let Some(h) = held.pop_front() {
                                ack(&h.message).await;
                            }
                            checkpoint = Some(sequence);
                            failing_at = None;
                            backoff = self.config.initial_backoff;
                            status.send_modify(|s| {
                                s.state = ConsumerState::Running;
                                s.sequence = checkpoint;
                                s.last_error = None;
                            });
                        }
                        Err(e) => Self::failed(&status, Some(sequence), &e),
                    }
                } else {
                    tracing::warn!(
                        sequence,
                        "skip requested for a message that is not failing; ignored"
                    );
                }
            }

            if held.is_empty() {
                // A fetch without a connection would wait for an answer that never comes while
                // the status says it runs: report the broker's failure and retry instead.
                let state = self.client.connection_state();
                if state != async_nats::connection::State::Connected {
                    cursor = None;
                    Self::failed(&status, None, &BrokerUnreachable(state));
                    let delay = wait(&mut backoff);
                    if sleep_or_stop(&mut control, &mut skip, delay).await {
                        break;
                    }
                    continue;
                }
                // A reconnect may have lost messages delivered meanwhile (JetStream redelivers
                // them only after the ack wait, behind later ones): re-create the cursor at the
                // checkpoint instead of reading past them.
                let connects = self.client.statistics().connects.load(Ordering::Relaxed);
                if cursor.as_ref().is_some_and(|(_, seen)| *seen != connects) {
                    cursor = None;
                }
                if cursor.is_none() {
                    match Self::cursor(&self.jetstream, &self.config, checkpoint).await {
                        Ok(c) => cursor = Some((c, connects)),
                        Err(e) => {
                            Self::failed(&status, None, &*e);
                            let delay = wait(&mut backoff);
                            if sleep_or_stop(&mut control, &mut skip, delay).await {
                                break;
                            }
                            continue;
                        }
                    }
                }
                let Some((consumer, _)) = cursor.as_ref() else {
                    continue;
                };
                let fetched = fetch(consumer, &self.config).await;
                let fetched = match fetched {
                    Ok(messages) => messages,
                    Err(e) => {
                        cursor = None;
                        Self::failed(&status, None, &*e);
                        let delay = wait(&mut backoff);
                        if sleep_or_stop(&mut control, &mut skip, delay).await {
                            break;
                        }
                        continue;
                    }
                };
                if self.client.statistics().connects.load(Ordering::Relaxed) != connects {
                    cursor = None;
                    continue;
                }
                for message in fetched {
                    let sequence = match message.info() {
                        Ok(info) => info.stream_sequence,
                        Err(e) => {
                            tracing::warn!(error = %e, "a message without JetStream metadata; ignored");
                            continue;
                        }
                    };
                    if checkpoint.is_some_and(|c| sequence <= c) {
                        // Committed before: its ack was lost. Ack it again, apply nothing.
                        ack(&message).await;
                        continue;
                    }
                    let event =
                        headers::to_event(message.headers.as_ref(), &message.payload, sequence);
                    held.push_back(Held {
                        message,
                        sequence,
                        event,
                    });
                }
            }
            if held.is_empty() {
                continue;
            }

            let events: Vec<RecordedEvent> = held
                .iter()
                .map_while(|h| h.event.as_ref().ok().cloned())
                .collect();
            if events.is_empty() {
                // The front message cannot be read: fail at its sequence, skippable.
                let front = &held[0];
                if let Err(e) = &front.event {
                    failing_at = Some(front.sequence);
                    let error = UndecodableMessage {
                        sequence: front.sequence,
                        source: e.clone(),
                    };
                    Self::failed(&status, Some(front.sequence), &error);
                }
                let delay = wait(&mut backoff);
                if sleep_or_stop(&mut control, &mut skip, delay).await {
                    break;
                }
                continue;
            }
            let expected = checkpoint.map(|s| Position::new(0, s));
            let to = events[events.len() - 1].position;
            let committed = self
                .backend
                .commit_batch(&mut self.projection, &name, expected, &events, to)
                .await;
            match committed {
                Ok(()) => {
                    for h in held.drain(..events.len()) {
                        ack(&h.message).await;
                    }
                    checkpoint = Some(to.sequence);
                    failing_at = None;
                    backoff = self.config.initial_backoff;
                    status.send_modify(|s| {
                        s.state = ConsumerState::Running;
                        s.sequence = checkpoint;
                        s.processed += events.len() as u64;
                        s.last_error = None;
                    });
                }
                Err(BatchError::Projection {
                    index,
                    committed,
                    error,
                    ..
                }) => {
                    // Commit the good prefix, so the consumer stops right before the bad message.
                    let mut good = committed;
                    if index > committed {
                        let prefix = &events[committed..index];
                        let expected = if committed > 0 {
                            Some(events[committed - 1].position)
                        } else {
                            expected
                        };
                        let to = prefix[prefix.len() - 1].position;
                        if self
                            .backend
                            .commit_batch(&mut self.projection, &name, expected, prefix, to)
                            .await
                            .is_ok()
                        {
                            good = index;
                        }
                    }
                    if good > 0 {
                        for h in held.drain(..good) {
                            ack(&h.message).await;
                        }
                        checkpoint = Some(events[good - 1].position.sequence);
                        status.send_modify(|s| {
                            s.sequence = checkpoint;
                            s.processed += good as u64;
                        });
                    }
                    let sequence = error.position().map(|p| p.sequence);
                    failing_at = sequence;
                    Self::failed(&status, sequence, &error);
                    let delay = wait(&mut backoff);
                    if sleep_or_stop(&mut control, &mut skip, delay).await {
                        break;
                    }
                }
                Err(BatchError::Store(StoreError::CheckpointConflict { .. })) => {
                    tracing::warn!("checkpoint moved by another consumer; re-reading");
                    lease = None;
                }
                Err(error) => {
                    failing_at = None;
                    Self::failed(&status, None, &error);
                    let delay = wait(&mut backoff);
                    if sleep_or_stop(&mut control, &mut skip, delay).await {
                        break;
                    }
                }
            }
        }
        status.send_modify(|s| s.state = ConsumerState::Stopped);
    }
}

/// A message the consumer cannot read as an integration event.
#[derive(Debug, thiserror::Error)]
#[error("the message at stream sequence {sequence} cannot be read")]
pub struct UndecodableMessage {
    /// Its JetStream stream sequence.
    pub sequence: u64,
    /// Why.
    #[source]
    pub source: MessageError,
}

/// The client has no connection to the broker (it reconnects by itself).
#[derive(Debug, thiserror::Error)]
#[error("the broker is unreachable (the client is {0})")]
struct BrokerUnreachable(async_nats::connection::State);

async fn fetch(
    consumer: &PullConsumer,
    config: &ConsumerConfig,
) -> Result<Vec<Message>, async_nats::Error> {
    let mut batch = consumer
        .fetch()
        .max_messages(config.batch_size)
        .expires(config.fetch_wait)
        .messages()
        .await?;
    let mut messages = Vec::new();
    // The server ends the batch after `fetch_wait`; a request (or its end) lost with the
    // connection is never answered, so the wait ends at twice that. The messages so far are
    // kept: a reconnect re-creates the cursor at the checkpoint anyway.
    let deadline = tokio::time::sleep(config.fetch_wait * 2);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            message = batch.next() => match message {
                Some(message) => messages.push(message?),
                None => break,
            },
            () = &mut deadline => break,
        }
    }
    Ok(messages)
}

/// Acknowledges a committed message. A lost ack only causes a redelivery, which the checkpoint
/// drops: logged, not failed.
async fn ack(message: &Message) {
    if let Err(error) = message.ack().await {
        tracing::debug!(%error, "ack failed; the message will be redelivered and dropped");
    }
}

/// Sleeps `delay` unless a control message arrives: `true` to stop.
async fn sleep_or_stop(
    control: &mut mpsc::Receiver<Control>,
    skip: &mut Option<u64>,
    delay: Duration,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        message = control.recv() => match message {
            None | Some(Control::Stop) => true,
            Some(Control::Skip(sequence)) => {
                *skip = Some(sequence);
                false
            }
        },
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        message.push_str(": ");
        message.push_str(&e.to_string());
        source = e.source();
    }
    message
}

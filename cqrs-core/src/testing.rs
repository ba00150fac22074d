//! Given/when/then test fixtures for aggregates and projections.
//!
//! ```
//! # use cqrs_core::testing::AggregateFixture;
//! # fn demo<A: cqrs_core::Handle<C>, C>(events: Vec<A::Event>, cmd: C, expected: Vec<A::Event>)
//! # where A::Event: PartialEq + std::fmt::Debug, <A as cqrs_core::Handle<C>>::Error: std::fmt::Debug {
//! AggregateFixture::<A>::given(events).when(&cmd).expect_events(expected);
//! # }
//! ```

use std::fmt::Debug;

use crate::aggregate::{Aggregate, Handle, HandleWith};
use crate::event::{NewEvent, RecordedEvent};
use crate::memory::InMemoryStore;
use crate::projection::{Projection, ProjectionError};
use crate::store::{read_all_batched, EventStore, DEFAULT_BATCH_SIZE};
use crate::stream::StreamId;

/// An aggregate in a known state, built from past events.
pub struct AggregateFixture<A: Aggregate> {
    state: A,
}

impl<A: Aggregate + std::fmt::Debug> std::fmt::Debug for AggregateFixture<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateFixture")
            .field("state", &self.state)
            .finish()
    }
}

impl<A: Aggregate> AggregateFixture<A> {
    /// An aggregate that has seen `events` (oldest first).
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        let mut state = A::default();
        for event in events {
            state.apply_event(&event);
        }
        Self { state }
    }

    /// A brand-new aggregate.
    pub fn given_no_previous_events() -> Self {
        Self::given([])
    }

    /// The state under test.
    pub fn state(&self) -> &A {
        &self.state
    }

    /// Runs `command` against the state.
    pub fn when<C>(self, command: &C) -> Outcome<A, <A as Handle<C>>::Error>
    where
        A: Handle<C>,
    {
        let result = self.state.handle(command);
        Outcome {
            result,
            state: self.state,
        }
    }

    /// Runs `command` with `services` against the state.
    pub async fn when_with<C, S>(
        self,
        command: &C,
        services: &S,
    ) -> Outcome<A, <A as HandleWith<C, S>>::Error>
    where
        A: HandleWith<C, S>,
        S: ?Sized + Sync,
    {
        let result = self.state.handle_with(command, services).await;
        Outcome {
            result,
            state: self.state,
        }
    }
}

/// The result of a command under test; assert on it.
pub struct Outcome<A: Aggregate, E> {
    result: Result<Vec<A::Event>, E>,
    state: A,
}

impl<A, E> std::fmt::Debug for Outcome<A, E>
where
    A: Aggregate + std::fmt::Debug,
    A::Event: std::fmt::Debug,
    E: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome")
            .field("result", &self.result)
            .field("state", &self.state)
            .finish()
    }
}

impl<A: Aggregate, E: Debug> Outcome<A, E> {
    /// Asserts the command produced exactly `expected`, showing a diff otherwise.
    #[track_caller]
    pub fn expect_events(self, expected: impl IntoIterator<Item = A::Event>) -> A
    where
        A::Event: PartialEq + Debug,
    {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.result {
            Ok(actual) if actual == expected => {
                let mut state = self.state;
                for event in &actual {
                    state.apply_event(event);
                }
                state
            }
            Ok(actual) => panic!(
                "the command produced other events than expected\n{}",
                diff(&expected, &actual)
            ),
            Err(error) => panic!(
                "expected events, but the command was rejected: {error:?}\nexpected: {expected:#?}"
            ),
        }
    }

    /// Asserts the command produced no event.
    #[track_caller]
    pub fn expect_no_events(self)
    where
        A::Event: PartialEq + Debug,
    {
        self.expect_events([]);
    }

    /// Asserts the command was rejected with `expected`.
    #[track_caller]
    pub fn expect_error(self, expected: E)
    where
        E: PartialEq,
        A::Event: Debug,
    {
        match self.result {
            Err(actual) if actual == expected => {}
            Err(actual) => panic!(
                "the command was rejected with another error\n{}",
                diff(&expected, &actual)
            ),
            Ok(events) => {
                panic!("expected error {expected:#?}, but the command produced events: {events:#?}")
            }
        }
    }

    /// Asserts the command was rejected with an error whose message is `message`.
    #[track_caller]
    pub fn expect_error_message(self, message: &str)
    where
        E: std::fmt::Display,
        A::Event: Debug,
    {
        match self.result {
            Err(actual) if actual.to_string() == message => {}
            Err(actual) => panic!(
                "expected error message {message:?}, got {:?}",
                actual.to_string()
            ),
            Ok(events) => {
                panic!("expected error {message:?}, but the command produced events: {events:#?}")
            }
        }
    }

    /// The raw result, for custom assertions.
    pub fn into_result(self) -> Result<Vec<A::Event>, E> {
        self.result
    }
}

fn diff(expected: &impl Debug, actual: &impl Debug) -> String {
    let expected = format!("{expected:#?}\n");
    let actual = format!("{actual:#?}\n");
    similar::TextDiff::from_lines(&expected, &actual)
        .unified_diff()
        .header("expected", "actual")
        .to_string()
}

/// A projection fed with given events through a real (in-memory) store, so events get real envelopes.
pub struct ProjectionFixture<P: Projection<Context = ()>> {
    projection: P,
    store: InMemoryStore,
    given: Vec<(StreamId, NewEvent)>,
}

impl<P: Projection<Context = ()>> std::fmt::Debug for ProjectionFixture<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionFixture")
            .field("projection", &P::NAME)
            .field("given", &self.given.len())
            .finish_non_exhaustive()
    }
}

impl<P: Projection<Context = ()>> ProjectionFixture<P> {
    /// Starts from `projection`'s initial state.
    pub fn new(projection: P) -> Self {
        Self {
            projection,
            store: InMemoryStore::new(),
            given: Vec::new(),
        }
    }

    /// Appends `events` to `stream` (in the fixture's store), to be projected by [`Self::run`].
    ///
    /// # Panics
    /// If an event cannot be encoded or appended (a bug in the test).
    #[track_caller]
    pub fn given<S: crate::event::EventSet>(
        mut self,
        stream: StreamId,
        events: impl IntoIterator<Item = S>,
    ) -> Self {
        let encoded: Vec<NewEvent> = events
            .into_iter()
            .map(|e| NewEvent::from_set(&e))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("cannot encode given event: {e}"));
        self.given
            .extend(encoded.into_iter().map(|e| (stream.clone(), e)));
        self
    }

    /// Projects every given event in log order and returns the read model.
    pub async fn run(mut self) -> Result<P, ProjectionError> {
        for (stream, event) in std::mem::take(&mut self.given) {
            self.store.insert_raw(&stream, event).await;
        }
        let events = read_all_batched(
            &self.store,
            crate::stream::Position::START,
            P::SUBSCRIPTION.event_types,
            DEFAULT_BATCH_SIZE,
        );
        futures_util::pin_mut!(events);
        while let Some(event) = futures_util::TryStreamExt::try_next(&mut events)
            .await
            .map_err(|e| ProjectionError::Handler {
                projection: P::NAME,
                event_type: String::new(),
                position: crate::stream::Position::START,
                source: Box::new(e),
            })?
        {
            if P::SUBSCRIPTION.matches(&event) {
                apply(&mut self.projection, &event).await?;
            }
        }
        self.projection.flush(&mut ()).await?;
        Ok(self.projection)
    }

    /// The fixture's store, to append more events or inspect what was stored.
    pub fn store(&self) -> &dyn EventStore {
        &self.store
    }
}

async fn apply<P: Projection<Context = ()>>(
    projection: &mut P,
    event: &RecordedEvent,
) -> Result<(), ProjectionError> {
    projection.handle(event, &mut ()).await
}

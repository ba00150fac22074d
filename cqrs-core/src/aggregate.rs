//! Aggregates: state rebuilt from events, and the decisions commands make against it.

use std::future::Future;

use crate::event::EventSet;

/// A consistency boundary whose state is the fold of its events.
///
/// Usually implemented by `#[derive(Aggregate)]`, which generates [`Aggregate::Event`] (an enum of the
/// listed events) and [`Aggregate::apply_event`] as one `match` over it calling your [`Apply`] impls.
pub trait Aggregate: Default + Send + Sync + 'static {
    /// The stream type stored with every event of this aggregate (`"account"`).
    const TYPE: &'static str;
    /// The schema version of this aggregate's snapshots. Bump it when the state's shape changes:
    /// snapshots with another version are ignored and the stream is replayed.
    const SNAPSHOT_VERSION: u32 = 1;
    /// The events this aggregate produces and applies.
    type Event: EventSet;

    /// Evolves the state by one event. Infallible: an event is a fact that already happened.
    fn apply_event(&mut self, event: &Self::Event);
}

/// Applying one event type to an aggregate's state. `#[derive(Aggregate)]` dispatches to these.
#[diagnostic::on_unimplemented(
    message = "aggregate `{Self}` lists event `{E}` but has no `Apply<{E}>` impl",
    label = "listed here",
    note = "add `impl Apply<{E}> for {Self} {{ fn apply(&mut self, event: &{E}) {{ ... }} }}`"
)]
pub trait Apply<E> {
    /// Evolves the state by this event.
    fn apply(&mut self, event: &E);
}

/// Handling command `C`: validate it against the current state and decide which events happen,
/// or reject it with a typed domain error. Pure: no I/O (see [`HandleWith`] for that).
///
/// The [crate documentation](crate#example) has a complete example.
pub trait Handle<C>: Aggregate {
    /// The domain error this command can be rejected with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides the events `command` produces against the current state.
    fn handle(&self, command: &C) -> Result<Vec<Self::Event>, Self::Error>;
}

/// Handling command `C` with access to services `S` (a uniqueness check, a clock, a price list),
/// asynchronously. Run with [`crate::Repository::execute_with`].
pub trait HandleWith<C, S: ?Sized + Sync>: Aggregate {
    /// The domain error this command can be rejected with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides the events `command` produces against the current state, consulting `services`.
    fn handle_with(
        &self,
        command: &C,
        services: &S,
    ) -> impl Future<Output = Result<Vec<Self::Event>, Self::Error>> + Send;
}

/// A command the [`crate::CommandBus`] routes to its aggregate's repository.
///
/// The aggregate instance is not part of the command: it travels beside it, as the `id` of
/// [`crate::CommandBus::dispatch`] and [`crate::Repository::execute`], so there is one place that
/// says which aggregate a command is for and nothing for it to disagree with.
pub trait Command: Send + Sync + 'static {
    /// The aggregate type that handles it.
    type Aggregate: Aggregate;
}

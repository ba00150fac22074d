//! What a user registers: projections (to rebuild, reset and skip) and aggregates (to show a
//! stream's state), type-erased so one command line serves them all.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use cqrs_core::admin::StoreAdmin;
use cqrs_core::backend::{ProjectionBackend, SkipTarget};
use cqrs_core::subscription::{Progress, ProjectionRunner};
use cqrs_core::{
    Aggregate, EventStore, EventTypes, Position, Projection, Repository, StoreError, StreamVersion,
};
use serde_json::Value;

use crate::connect::Connection;
use crate::AdminError;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
type Reset = Arc<dyn Fn() -> BoxFuture<'static, Result<(), StoreError>> + Send + Sync>;
type Switch =
    Arc<dyn Fn(String, String) -> BoxFuture<'static, Result<(), StoreError>> + Send + Sync>;

/// The checkpoint name a blue/green rebuild of projection `name` builds under.
pub(crate) fn building_name(name: &str) -> String {
    format!("{name}.next")
}

/// How to run projection `P` on one connection: its backend, a fresh (empty) instance for
/// rebuilds, and how to clear its read model.
pub struct ProjectionSetup<P: Projection> {
    ops: Box<dyn OpsOf<P>>,
    _projection: std::marker::PhantomData<fn() -> P>,
}

impl<P: Projection> std::fmt::Debug for ProjectionSetup<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionSetup")
            .field("projection", &P::NAME)
            .finish_non_exhaustive()
    }
}

impl<P: Projection> ProjectionSetup<P> {
    /// `P` run by `backend` (for example `SqliteProjections::new(store)`), `fresh` making the
    /// empty instance a rebuild starts from. Without [`ProjectionSetup::with_reset`], `rebuild`
    /// and `reset` only move the checkpoint back: right for read models whose handlers
    /// overwrite rather than add.
    pub fn new<B: ProjectionBackend<P>>(
        backend: B,
        fresh: impl Fn() -> P + Send + Sync + 'static,
    ) -> Self {
        Self {
            ops: Box::new(Typed {
                backend: Arc::new(backend),
                fresh: Arc::new(fresh),
                reset: None,
                blue_green: None,
            }),
            _projection: std::marker::PhantomData,
        }
    }

    /// Rebuilds blue/green: `rebuild` builds a new version beside the live one, which keeps
    /// serving (and its live runner keeps running), then switches to it.
    ///
    /// - `building` makes the empty instance that writes into the new version's tables (the
    ///   live instance, from [`ProjectionSetup::new`], writes into the live tables);
    /// - `prepare` (re)creates those tables empty;
    /// - `switch(name, built)` makes what was built under checkpoint `built` the live version
    ///   of projection `name`, in one transaction: `PostgresProjections::promote` or
    ///   `SqliteProjections::promote` with the pairs of live and new tables.
    ///
    /// The rebuild runs under checkpoint `<name>.next` and its lease: `prepare`, then the
    /// catch-up with its progress, then `switch`, all with that lease held, so two rebuilds never
    /// interleave. Interrupting it (Ctrl-C, a killed process) leaves the live version serving
    /// and a partial build under `<name>.next`, which the next rebuild prepares afresh.
    pub fn with_blue_green<F, Fut, S, SFut>(
        mut self,
        building: impl Fn() -> P + Send + Sync + 'static,
        prepare: F,
        switch: S,
    ) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StoreError>> + Send + 'static,
        S: Fn(String, String) -> SFut + Send + Sync + 'static,
        SFut: Future<Output = Result<(), StoreError>> + Send + 'static,
    {
        self.ops.set_blue_green(BlueGreen {
            building: Arc::new(building),
            prepare: Arc::new(move || Box::pin(prepare())),
            switch: Arc::new(move |name, built| Box::pin(switch(name, built))),
        });
        self
    }

    /// How to clear the read model (truncate its tables) before a rebuild or on `reset`.
    pub fn with_reset<F, Fut>(mut self, reset: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StoreError>> + Send + 'static,
    {
        let reset: Reset = Arc::new(move || Box::pin(reset()));
        self.ops.set_reset(reset);
        self
    }
}

/// A blue/green setup ([`ProjectionSetup::with_blue_green`]).
struct BlueGreen<P> {
    building: Arc<dyn Fn() -> P + Send + Sync>,
    prepare: Reset,
    switch: Switch,
}

/// A projection's setup while it is being configured, its backend's type erased.
trait OpsOf<P>: Send + Sync {
    fn set_reset(&mut self, reset: Reset);
    fn set_blue_green(&mut self, blue_green: BlueGreen<P>);
    fn into_ops(self: Box<Self>) -> Box<dyn Ops>;
}

/// A projection's operations, whatever its type and backend.
pub(crate) trait Ops: Send + Sync {
    /// Whether `rebuild` builds beside the live version and switches.
    fn blue_green(&self) -> bool;
    fn event_types(&self) -> EventTypes<'static>;
    fn rebuild<'a>(
        &'a self,
        name: &'a str,
        fresh: bool,
        progress: &'a mut (dyn FnMut(Progress) + Send),
    ) -> BoxFuture<'a, Result<(), AdminError>>;
    fn reset<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), AdminError>>;
    fn skip<'a>(
        &'a self,
        name: &'a str,
        position: Position,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), AdminError>>;
}

struct Typed<P, B> {
    backend: Arc<B>,
    fresh: Arc<dyn Fn() -> P + Send + Sync>,
    reset: Option<Reset>,
    blue_green: Option<BlueGreen<P>>,
}

impl<P: Projection, B: ProjectionBackend<P>> OpsOf<P> for Typed<P, B> {
    fn set_reset(&mut self, reset: Reset) {
        self.reset = Some(reset);
    }

    fn set_blue_green(&mut self, blue_green: BlueGreen<P>) {
        self.blue_green = Some(blue_green);
    }

    fn into_ops(self: Box<Self>) -> Box<dyn Ops> {
        self
    }
}

impl<P: Projection, B: ProjectionBackend<P>> Typed<P, B> {
    async fn clear(&self) -> Result<(), StoreError> {
        match &self.reset {
            Some(reset) => reset().await,
            None => Ok(()),
        }
    }

    /// Takes the lease, or says who holds it.
    async fn lease(&self, name: &str) -> Result<Box<dyn cqrs_core::backend::Lease>, AdminError> {
        match self.backend.acquire_lease(name).await? {
            Some(lease) => Ok(lease),
            None => Err(AdminError::LeaseHeld {
                name: name.to_owned(),
                holder: String::new(),
            }),
        }
    }
}

impl<P: Projection, B: ProjectionBackend<P>> Ops for Typed<P, B> {
    fn blue_green(&self) -> bool {
        self.blue_green.is_some()
    }

    fn event_types(&self) -> EventTypes<'static> {
        P::SUBSCRIPTION.event_types
    }

    fn rebuild<'a>(
        &'a self,
        name: &'a str,
        fresh: bool,
        progress: &'a mut (dyn FnMut(Progress) + Send),
    ) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            if let Some(blue_green) = &self.blue_green {
                // Beside the live version, under a name and a lease of its own; the switch runs
                // before that lease is released. A build that was interrupted (or stopped at an
                // event, then skipped under its own name) resumes, unless asked to start afresh.
                let built = building_name(name);
                let runner =
                    ProjectionRunner::shared((blue_green.building)(), Arc::clone(&self.backend))
                        .named(built.clone());
                let switch = |_| (blue_green.switch)(name.to_owned(), built.clone());
                let partial = self.backend.load_checkpoint(&built).await?.is_some();
                if partial && !fresh {
                    runner.catch_up_then(&mut *progress, switch).await?;
                } else {
                    runner
                        .rebuild_then(
                            (blue_green.building)(),
                            || (blue_green.prepare)(),
                            &mut *progress,
                            switch,
                        )
                        .await?;
                }
                return Ok(());
            }
            let runner =
                ProjectionRunner::shared((self.fresh)(), Arc::clone(&self.backend)).named(name);
            runner
                .rebuild((self.fresh)(), || self.clear(), &mut *progress)
                .await?;
            Ok(())
        })
    }

    fn reset<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            // Held throughout, so no runner writes while the read model is cleared.
            let lease = self.lease(name).await?;
            self.clear().await?;
            self.backend.reset_checkpoint(name).await?;
            // Whatever it failed on before, it replays from the start now.
            self.backend.record_failure(name, None).await?;
            drop(lease);
            Ok(())
        })
    }

    fn skip<'a>(
        &'a self,
        name: &'a str,
        position: Position,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            // Held throughout: a live runner keeps its own checkpoint in memory; it skips
            // through its `ProjectionHandle` instead.
            let lease = self.lease(name).await?;
            let checkpoint = self.backend.load_checkpoint(name).await?;
            let after = checkpoint.unwrap_or(Position::START);
            let next = match self
                .backend
                .events()
                .read_all(after, P::SUBSCRIPTION.event_types, 1)
                .await
            {
                Ok(events) => events
                    .into_iter()
                    .next()
                    .map(|event| SkipTarget::of(&event)),
                Err(StoreError::CorruptEvent { position, .. }) => {
                    Some(SkipTarget::unreadable(position))
                }
                Err(other) => return Err(other.into()),
            };
            match next {
                Some(target) if target.position == position => {
                    self.backend
                        .record_skip(name, checkpoint, &target, reason)
                        .await?;
                    // The failure recorded for that event is moved past.
                    let recorded = self.backend.last_failure(name).await?;
                    if recorded.is_some_and(|r| r.failure.position == Some(position)) {
                        self.backend.record_failure(name, None).await?;
                    }
                    drop(lease);
                    Ok(())
                }
                Some(target) => Err(AdminError::Refused(format!(
                    "the next event `{name}` handles after its checkpoint is at position {}, not {position}: only the event it stops at can be skipped",
                    target.position
                ))),
                None => Err(AdminError::Refused(format!(
                    "`{name}` has no event to skip after its checkpoint"
                ))),
            }
        })
    }
}

/// How to run a projection on a connection, if it runs there.
pub(crate) type Setup = Box<dyn Fn(&Connection) -> Option<Box<dyn Ops>> + Send + Sync>;

/// A registered projection: its name and, per connection, how to run it.
pub(crate) struct RegisteredProjection {
    pub(crate) name: &'static str,
    pub(crate) setup: Setup,
}

impl RegisteredProjection {
    pub(crate) fn new<P: Projection>(
        setup: impl Fn(&Connection) -> Option<ProjectionSetup<P>> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: P::NAME,
            setup: Box::new(move |connection| setup(connection).map(|s| s.ops.into_ops())),
        }
    }
}

/// Where to load an aggregate's state up to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StateAt {
    Latest,
    Version(u64),
    Time(chrono::DateTime<chrono::Utc>),
}

type LoadState = Box<
    dyn Fn(
            Arc<dyn EventStore>,
            String,
            StateAt,
        ) -> BoxFuture<'static, Result<(u64, Value), AdminError>>
        + Send
        + Sync,
>;

/// A registered aggregate: its stream type and how to fold a stream into its state.
pub(crate) struct RegisteredAggregate {
    pub(crate) stream_type: &'static str,
    pub(crate) load: LoadState,
}

impl RegisteredAggregate {
    pub(crate) fn new<A: Aggregate + serde::Serialize>() -> Self {
        Self {
            stream_type: A::TYPE,
            load: Box::new(|events, id, at| {
                Box::pin(async move {
                    let repository = Repository::<A>::from_arc(events);
                    let loaded = match at {
                        StateAt::Latest => repository.load(&id).await,
                        StateAt::Version(v) => {
                            repository.load_at_version(&id, StreamVersion::new(v)).await
                        }
                        StateAt::Time(t) => repository.load_as_of(&id, t).await,
                    }
                    .map_err(|e| match e {
                        cqrs_core::LoadError::Store(store) => AdminError::from(store),
                        other => AdminError::Store(StoreError::Backend(Box::new(other))),
                    })?;
                    let state = serde_json::to_value(&loaded.state)
                        .map_err(|e| AdminError::Store(StoreError::Backend(Box::new(e))))?;
                    Ok((loaded.version.get(), state))
                })
            }),
        }
    }
}

/// The lag of `name`: events of its types after its checkpoint.
pub(crate) async fn lag(
    admin: &dyn StoreAdmin,
    checkpoint: Option<Position>,
    types: EventTypes<'_>,
) -> Result<u64, StoreError> {
    admin
        .count_after(checkpoint.unwrap_or(Position::START), types)
        .await
}

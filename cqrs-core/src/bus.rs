//! The command bus: one handler per command type, dispatch by type.
//!
//! Queries never go through the bus or through aggregates: they read read models (projections).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use crate::aggregate::{Command, Handle};
use crate::command::{CommandContext, ExecuteError, Repository};
use crate::stream::{Position, StreamId, StreamVersion};

/// A type-erased domain error, as the bus returns it. Downcast it to the aggregate's error type
/// with [`DomainError::downcast_ref`].
#[derive(Debug)]
pub struct DomainError(Box<dyn StdError + Send + Sync>);

impl DomainError {
    /// Wraps an aggregate's error.
    pub fn new(error: impl StdError + Send + Sync + 'static) -> Self {
        Self(Box::new(error))
    }

    /// The aggregate's error, if it is an `E`.
    pub fn downcast_ref<E: StdError + 'static>(&self) -> Option<&E> {
        self.0.downcast_ref()
    }
}

impl std::fmt::Display for DomainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl StdError for DomainError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0.source()
    }
}

/// What a dispatched command did, without the aggregate's types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The aggregate's stream.
    pub stream: StreamId,
    /// The stream's version after the command.
    pub stream_version: StreamVersion,
    /// Position of the last written event (the consistency token); `None` if nothing was written.
    pub position: Option<Position>,
    /// How many events were written.
    pub events: usize,
}

/// Why a dispatch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// No handler is registered for the command's type.
    #[error("no handler registered for command `{command}`")]
    NoHandler {
        /// The command's type name.
        command: &'static str,
    },
    /// The handler failed.
    #[error(transparent)]
    Execute(#[from] ExecuteError<DomainError>),
}

/// Registering a second handler for one command type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a handler for command `{command}` is already registered")]
pub struct AlreadyRegistered {
    /// The command's type name.
    pub command: &'static str,
}

/// Something that handles command `C` for the aggregate (or other target) `id`. Implemented by
/// [`Repository`] for every [`Command`] its aggregate handles, and by async closures
/// `Fn(String, C, CommandContext) -> Future<Output = Result<Receipt, BusError>>`.
#[async_trait]
pub trait CommandHandler<C>: Send + Sync + 'static {
    /// Handles one command.
    async fn handle(
        &self,
        id: String,
        command: C,
        context: CommandContext,
    ) -> Result<Receipt, BusError>;
}

#[async_trait]
impl<A, C> CommandHandler<C> for Repository<A>
where
    A: Handle<C>,
    C: Command<Aggregate = A>,
{
    async fn handle(
        &self,
        id: String,
        command: C,
        context: CommandContext,
    ) -> Result<Receipt, BusError> {
        let outcome = self
            .execute_in(&id, &command, &context)
            .await
            .map_err(|e| e.map_domain(DomainError::new))?;
        Ok(Receipt {
            stream: outcome.stream,
            stream_version: outcome.stream_version,
            position: outcome.position,
            events: outcome.events.len(),
        })
    }
}

#[async_trait]
impl<C, F, Fut> CommandHandler<C> for F
where
    C: Send + 'static,
    F: Fn(String, C, CommandContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Receipt, BusError>> + Send,
{
    async fn handle(
        &self,
        id: String,
        command: C,
        context: CommandContext,
    ) -> Result<Receipt, BusError> {
        self(id, command, context).await
    }
}

/// Routes each command to the one handler registered for its type.
///
/// ```
/// # use cqrs_core::bus::{CommandBus, BusError};
/// # use cqrs_core::CommandContext;
/// # async fn demo() {
/// struct Ping;
/// let bus = CommandBus::new();
/// let err = bus.dispatch("server-1", Ping, CommandContext::new()).await.unwrap_err();
/// assert!(matches!(err, BusError::NoHandler { .. }));
/// # }
/// ```
#[derive(Default, Clone)]
pub struct CommandBus {
    handlers: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl CommandBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for command type `C`; fails if `C` already has one.
    pub fn register<C: Send + 'static>(
        &mut self,
        handler: impl CommandHandler<C>,
    ) -> Result<&mut Self, AlreadyRegistered> {
        let handler: Arc<dyn CommandHandler<C>> = Arc::new(handler);
        match self.handlers.entry(TypeId::of::<C>()) {
            std::collections::hash_map::Entry::Occupied(_) => Err(AlreadyRegistered {
                command: std::any::type_name::<C>(),
            }),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(Arc::new(handler));
                Ok(self)
            }
        }
    }

    /// Registers a repository as the handler of command `C` (sugar for [`CommandBus::register`]).
    pub fn route<C>(
        &mut self,
        repository: Repository<C::Aggregate>,
    ) -> Result<&mut Self, AlreadyRegistered>
    where
        C: Command,
        C::Aggregate: Handle<C>,
    {
        self.register::<C>(repository)
    }

    /// Whether a handler for `C` is registered.
    pub fn handles<C: 'static>(&self) -> bool {
        self.handlers.contains_key(&TypeId::of::<C>())
    }

    /// Dispatches `command`, for the aggregate `id`, to its handler.
    pub async fn dispatch<C: Send + 'static>(
        &self,
        id: impl Into<String>,
        command: C,
        context: CommandContext,
    ) -> Result<Receipt, BusError> {
        let handler = self
            .handlers
            .get(&TypeId::of::<C>())
            .and_then(|h| h.downcast_ref::<Arc<dyn CommandHandler<C>>>())
            .ok_or(BusError::NoHandler {
                command: std::any::type_name::<C>(),
            })?;
        handler.handle(id.into(), command, context).await
    }
}

impl std::fmt::Debug for CommandBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandBus")
            .field("handlers", &self.handlers.len())
            .finish()
    }
}

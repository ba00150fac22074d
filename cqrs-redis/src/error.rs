//! Redis errors as the core's storage errors.

use cqrs_core::StoreError;

/// A lost or refused connection, or a timeout: [`StoreError::Connection`] (retried by the
/// runner, never a poison event); anything else: [`StoreError::Backend`].
pub(crate) fn store_error(error: redis::RedisError) -> StoreError {
    if is_connection_error(&error) {
        StoreError::Connection(Box::new(error))
    } else {
        StoreError::Backend(Box::new(error))
    }
}

pub(crate) fn is_connection_error(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
}

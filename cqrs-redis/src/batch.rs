//! The handlers' context: a transaction being queued.

/// What a Redis projection's handlers get (`type Context = RedisBatch`): the batch's
/// `MULTI`/`EXEC` pipeline, on which they queue commands. The backend adds the checkpoint's move
/// and sends everything as one transaction after the last handler (and the projection's flush)
/// ran; if a handler fails, nothing of the batch is sent.
///
/// Commands are not executed while handlers run, so a handler cannot read what an earlier
/// handler of the same batch queued: write commands that compose (`HINCRBY`, `SADD`, `HSET` of
/// whole values, `ZADD`). Read the read model with your own connection
/// ([`RedisProjections::connection`](crate::RedisProjections::connection)) for queries.
#[derive(Debug)]
pub struct RedisBatch {
    pipeline: redis::Pipeline,
    prefix: String,
}

impl RedisBatch {
    pub(crate) fn new(prefix: &str) -> Self {
        let mut pipeline = redis::pipe();
        pipeline.atomic();
        Self {
            pipeline,
            prefix: prefix.to_owned(),
        }
    }

    /// The transaction to queue commands on (already atomic: do not call `atomic()` on it, and
    /// do not send it yourself).
    pub fn pipeline(&mut self) -> &mut redis::Pipeline {
        &mut self.pipeline
    }

    /// The backend's key prefix ([`RedisProjections::with_key_prefix`](crate::RedisProjections::with_key_prefix)),
    /// for read-model keys that live and die with the checkpoints.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `prefix` followed by `key`.
    pub fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub(crate) fn into_pipeline(self) -> redis::Pipeline {
        self.pipeline
    }
}

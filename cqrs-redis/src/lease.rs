//! One active runner per projection: a lease key with a random token and a time to live, renewed
//! in the background while it is held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_core::backend::Lease;
use redis::aio::MultiplexedConnection;

/// Renews the lease if the key still holds this holder's token; 0 if it does not (expired and
/// taken by another runner, or lost with the data).
const RENEW: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Deletes the lease only if it is still this holder's.
const RELEASE: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0";

/// Takes the lease if nobody holds it.
pub(crate) async fn acquire(
    mut conn: MultiplexedConnection,
    key: String,
    ttl: Duration,
) -> Result<Option<Box<dyn Lease>>, redis::RedisError> {
    let token = uuid::Uuid::now_v7().to_string();
    let taken: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(millis(ttl))
        .query_async(&mut conn)
        .await?;
    if taken.is_none() {
        return Ok(None);
    }
    let lost = Arc::new(AtomicBool::new(false));
    let renewal = tokio::spawn(renew(
        conn.clone(),
        key.clone(),
        token.clone(),
        ttl,
        Arc::clone(&lost),
    ));
    Ok(Some(Box::new(RedisLease {
        conn,
        key,
        token,
        lost,
        renewal,
    })))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Renews every third of the time to live. The lease counts as lost when the key no longer holds
/// the token, or when no renewal succeeded for a whole time to live (the key may have expired
/// meanwhile, and another runner may hold it).
async fn renew(
    mut conn: MultiplexedConnection,
    key: String,
    token: String,
    ttl: Duration,
    lost: Arc<AtomicBool>,
) {
    let script = redis::Script::new(RENEW);
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        let outcome: Result<i64, _> = script
            .key(&key)
            .arg(&token)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await;
        match outcome {
            Ok(1) => renewed = Instant::now(),
            Ok(_) => {
                tracing::warn!(
                    key,
                    "projection lease lost: the key no longer holds its token"
                );
                break;
            }
            Err(error) if renewed.elapsed() < ttl => {
                tracing::debug!(key, %error, "renewing the projection lease failed; retrying");
                continue;
            }
            Err(error) => {
                tracing::warn!(key, %error, "projection lease lost: not renewed in time");
                break;
            }
        }
    }
    lost.store(true, Ordering::SeqCst);
}

struct RedisLease {
    conn: MultiplexedConnection,
    key: String,
    token: String,
    lost: Arc<AtomicBool>,
    renewal: tokio::task::JoinHandle<()>,
}

#[async_trait::async_trait]
impl Lease for RedisLease {
    async fn is_held(&mut self) -> bool {
        !self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        self.renewal.abort();
        // Released at once where a runtime can send the release; otherwise it expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut conn = self.conn.clone();
            let key = std::mem::take(&mut self.key);
            let token = std::mem::take(&mut self.token);
            runtime.spawn(async move {
                let released: Result<i64, _> = redis::Script::new(RELEASE)
                    .key(&key)
                    .arg(&token)
                    .invoke_async(&mut conn)
                    .await;
                if let Err(error) = released {
                    tracing::debug!(key, %error, "releasing the projection lease failed; it expires");
                }
            });
        }
    }
}

//! A runner's tuning, checked when it is built.

use std::num::NonZeroUsize;
use std::time::Duration;

/// Tuning for a [`ProjectionRunner`](crate::subscription::ProjectionRunner), built (and checked)
/// by [`RunnerConfig::builder`].
///
/// ```
/// use std::time::Duration;
/// use cqrs_core::RunnerConfig;
///
/// let config = RunnerConfig::builder()
///     .batch_size(1_000)
///     .poll_interval(Duration::from_millis(250))
///     .build()?;
/// assert_eq!(config.batch_size(), 1_000);
///
/// // A batch of 0 would move the checkpoint over events never applied: refused when built.
/// assert!(RunnerConfig::builder().batch_size(0).build().is_err());
/// # Ok::<(), cqrs_core::subscription::InvalidConfig>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    batch_size: NonZeroUsize,
    poll_interval: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    standby_interval: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: NonZeroUsize::new(500).unwrap_or(NonZeroUsize::MIN),
            poll_interval: Duration::from_secs(1),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            standby_interval: Duration::from_secs(1),
        }
    }
}

impl RunnerConfig {
    /// Starts from the defaults (500 events per batch, a 1 s polling fallback, backoff from
    /// 100 ms to 30 s, a standby retrying the lease every second).
    pub fn builder() -> RunnerConfigBuilder {
        let defaults = Self::default();
        RunnerConfigBuilder {
            batch_size: defaults.batch_size.get(),
            poll_interval: defaults.poll_interval,
            initial_backoff: defaults.initial_backoff,
            max_backoff: defaults.max_backoff,
            standby_interval: defaults.standby_interval,
        }
    }

    /// Events per batch (and per transaction).
    pub fn batch_size(&self) -> usize {
        self.batch_size.get()
    }

    /// Longest wait for a wake-up before polling anyway.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// First retry delay after a failure; doubles up to [`RunnerConfig::max_backoff`].
    pub fn initial_backoff(&self) -> Duration {
        self.initial_backoff
    }

    /// Longest retry delay.
    pub fn max_backoff(&self) -> Duration {
        self.max_backoff
    }

    /// How often a standby runner tries to take the lease.
    pub fn standby_interval(&self) -> Duration {
        self.standby_interval
    }
}

/// Builds a [`RunnerConfig`]; [`RunnerConfigBuilder::build`] rejects values a runner cannot
/// work with.
#[derive(Debug, Clone)]
pub struct RunnerConfigBuilder {
    batch_size: usize,
    poll_interval: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    standby_interval: Duration,
}

impl RunnerConfigBuilder {
    /// Events per batch (and per transaction); at least 1.
    pub fn batch_size(mut self, events: usize) -> Self {
        self.batch_size = events;
        self
    }

    /// Longest wait for a wake-up before polling anyway; more than zero.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// First retry delay after a failure; more than zero.
    pub fn initial_backoff(mut self, delay: Duration) -> Self {
        self.initial_backoff = delay;
        self
    }

    /// Longest retry delay; at least the initial backoff.
    pub fn max_backoff(mut self, delay: Duration) -> Self {
        self.max_backoff = delay;
        self
    }

    /// How often a standby runner tries to take the lease; more than zero.
    pub fn standby_interval(mut self, interval: Duration) -> Self {
        self.standby_interval = interval;
        self
    }

    /// The configuration, or what is wrong with it.
    pub fn build(self) -> Result<RunnerConfig, InvalidConfig> {
        let invalid = |setting: &'static str, reason: &str| InvalidConfig {
            setting,
            reason: reason.to_owned(),
        };
        let batch_size = NonZeroUsize::new(self.batch_size).ok_or_else(|| {
            invalid(
                "batch_size",
                "must be at least 1 (a batch of 0 events would move the checkpoint over events it never applied)",
            )
        })?;
        for (setting, value) in [
            ("poll_interval", self.poll_interval),
            ("initial_backoff", self.initial_backoff),
            ("standby_interval", self.standby_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(setting, "must be more than zero"));
            }
        }
        if self.max_backoff < self.initial_backoff {
            return Err(invalid("max_backoff", "must be at least initial_backoff"));
        }
        Ok(RunnerConfig {
            batch_size,
            poll_interval: self.poll_interval,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            standby_interval: self.standby_interval,
        })
    }
}

/// A [`RunnerConfig`] setting a runner cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid projection runner configuration: `{setting}` {reason}")]
#[non_exhaustive]
pub struct InvalidConfig {
    /// The setting.
    pub setting: &'static str,
    /// What is wrong with its value.
    pub reason: String,
}

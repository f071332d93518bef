//! The range every number a user writes must be in — in a flow, a plugin's
//! settings file or the host's configuration — checked when it is read, so
//! that no conversion later can wrap (2^44 MiB is not 0 MiB) and no
//! deadline can overflow an `Instant`.

use std::ops::RangeInclusive;

use super::flow::{Problem, RetryPolicy};
use super::settings::PoolSettings;

const DAY_MS: u64 = 86_400_000;

/// A step's timeout: up to a week.
pub(crate) const TIMEOUT_MS: RangeInclusive<u64> = 1..=7 * DAY_MS;
/// Linear memory: a wasm32 memory holds at most 4 GiB.
pub(crate) const MEMORY_MB: RangeInclusive<u64> = 1..=4096;
/// One step's output.
pub(crate) const OUTPUT_BYTES: RangeInclusive<u64> = 1..=1 << 30;
/// One step call's captured log.
pub(crate) const LOG_BYTES: RangeInclusive<u64> = 0..=1 << 30;
/// Steps at once.
pub(crate) const MAX_PARALLEL: RangeInclusive<u64> = 1..=1_000_000;
/// Attempts of one step.
pub(crate) const ATTEMPTS: RangeInclusive<u64> = 1..=1000;
/// A retry's delays.
pub(crate) const BACKOFF_MS: RangeInclusive<u64> = 0..=DAY_MS;
/// Instances a pool keeps ready.
pub(crate) const POOL_MIN: RangeInclusive<u64> = 0..=10_000;
/// Instances a pool holds at most.
pub(crate) const POOL_MAX: RangeInclusive<u64> = 1..=100_000;
/// Calls one instance serves.
pub(crate) const REUSE: RangeInclusive<u64> = 1..=1_000_000_000;
/// A pool's timings.
pub(crate) const POOL_MS: RangeInclusive<u64> = 1..=DAY_MS;

/// Collects the numbers of one owner that are out of range; each field is
/// named after `prefix` (``step `a`: ``, `flow.`, or nothing).
pub(crate) struct Numbers<'a> {
    prefix: &'a str,
    problems: &'a mut Vec<Problem>,
}

impl<'a> Numbers<'a> {
    pub(crate) fn of(prefix: &'a str, problems: &'a mut Vec<Problem>) -> Numbers<'a> {
        Numbers { prefix, problems }
    }

    /// `field` = `value`, if given, must be in `range` (counted in `unit`).
    pub(crate) fn check(
        &mut self,
        field: &str,
        value: Option<u64>,
        range: RangeInclusive<u64>,
        unit: &str,
    ) {
        let Some(value) = value.filter(|v| !range.contains(v)) else { return };
        self.problems.push(Problem::OutOfRange {
            field: format!("{}{field}", self.prefix),
            value,
            range: format!("{} ..= {} ({unit})", range.start(), range.end()),
        });
    }

    /// A retry policy's fields.
    pub(crate) fn retry(&mut self, retry: Option<&RetryPolicy>) {
        let Some(retry) = retry else { return };
        self.check("retry.max_attempts", Some(retry.max_attempts.into()), ATTEMPTS, "attempts");
        self.check("retry.backoff_ms", Some(retry.backoff_ms), BACKOFF_MS, "ms");
        self.check("retry.max_backoff_ms", Some(retry.max_backoff_ms), BACKOFF_MS, "ms");
    }

    /// Pool settings, as `prefix.field` (`pool.min`).
    pub(crate) fn pool(&mut self, prefix: &str, pool: &PoolSettings) {
        let count = |n: Option<usize>| n.map(|n| n as u64);
        self.check(&format!("{prefix}.min"), count(pool.min), POOL_MIN, "instances");
        self.check(&format!("{prefix}.max"), count(pool.max), POOL_MAX, "instances");
        self.check(&format!("{prefix}.reuse"), pool.reuse.map(u64::from), REUSE, "calls");
        for (field, value) in [
            ("idle_timeout_ms", pool.idle_timeout_ms),
            ("health_check_ms", pool.health_check_ms),
            ("create_timeout_ms", pool.create_timeout_ms),
            ("acquire_timeout_ms", pool.acquire_timeout_ms),
        ] {
            self.check(&format!("{prefix}.{field}"), value, POOL_MS, "ms");
        }
    }
}

/// Mebibytes as bytes. The range check came first, so this cannot wrap;
/// were it to, it saturates rather than becoming a small limit.
pub(crate) fn mib(mb: u64) -> u64 {
    mb.saturating_mul(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_out_of_range_name_their_field_and_range() {
        let mut problems = Vec::new();
        let mut numbers = Numbers::of("step `a`: ", &mut problems);
        numbers.check("max_memory_mb", Some(1 << 44), MEMORY_MB, "MiB");
        numbers.check("max_memory_mb", Some(64), MEMORY_MB, "MiB");
        numbers.check("timeout_ms", None, TIMEOUT_MS, "ms");
        Numbers::of("flow.", &mut problems).check("max_parallel", Some(0), MAX_PARALLEL, "steps");
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "step `a`: max_memory_mb = 17592186044416 is out of range: it must be 1 ..= 4096 (MiB)",
                "flow.max_parallel = 0 is out of range: it must be 1 ..= 1000000 (steps)",
            ]
        );
    }

    #[test]
    fn pool_and_retry_fields_are_checked() {
        let mut problems = Vec::new();
        let mut numbers = Numbers::of("", &mut problems);
        numbers.pool("pool", &PoolSettings::default().with_min(1_000_000).with_reuse(0));
        numbers.retry(Some(&RetryPolicy { max_attempts: 0, ..RetryPolicy::default() }));
        let fields: Vec<String> = problems
            .iter()
            .map(|p| match p {
                Problem::OutOfRange { field, .. } => field.clone(),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(fields, ["pool.min", "pool.reuse", "retry.max_attempts"]);
        assert_eq!(mib(4096), 4 << 30);
        assert_eq!(mib(u64::MAX), u64::MAX);
    }
}

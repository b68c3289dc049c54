//! Test-only fault injection, compiled in only with the `failpoints` cargo feature (never in a
//! release build), enabled by `KEYHOLD_FAILPOINTS=name[,name...]` at start. They exist so the
//! robustness suite can prove its checkers catch what they claim to catch:
//! - `stale-read`: linearizable ranges read one revision behind the current one.
//! - `drop-watch-event`: one watch response (the 20th with events) is silently not sent.

/// Whether failpoint `name` is on.
#[cfg(feature = "failpoints")]
pub fn enabled(name: &str) -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<Vec<String>> = OnceLock::new();
    ON.get_or_init(|| {
        std::env::var("KEYHOLD_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    })
    .iter()
    .any(|n| n == name)
}

/// Whether failpoint `name` is on (always false without the `failpoints` feature).
#[cfg(not(feature = "failpoints"))]
pub fn enabled(_name: &str) -> bool {
    false
}

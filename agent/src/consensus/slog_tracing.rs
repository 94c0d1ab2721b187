//! raft-rs logs through `slog`; this drain forwards its records to
//! `tracing` (target `raft`), so the agent has one log stream.
//!
//! raft-rs's `info` is its internals (every election step, every log
//! restore), so it becomes `debug`; warnings and errors keep their level.
//! A key given twice (raft-rs adds `raft_id` to the logger it is handed)
//! is written once.

use std::fmt::Write as _;

use slog::{Drain, KV, Level, OwnedKVList, Record};

pub struct TracingDrain;

/// Collects a record's key-value pairs as ` key=value`, each key once.
#[derive(Default)]
struct Pairs {
    text: String,
    keys: Vec<String>,
}

impl slog::Serializer for Pairs {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments<'_>) -> slog::Result {
        let key = key.to_string();
        if !self.keys.contains(&key) {
            let _ = write!(self.text, " {key}={value}");
            self.keys.push(key);
        }
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let level = record.level();
        let enabled = match level {
            Level::Critical | Level::Error => tracing::enabled!(target: "raft", tracing::Level::ERROR),
            Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
            Level::Info | Level::Debug => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            Level::Trace => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut pairs = Pairs::default();
        let _ = record.kv().serialize(record, &mut pairs);
        let _ = values.serialize(record, &mut pairs);
        let message = record.msg();
        let pairs = pairs.text;
        match level {
            Level::Critical | Level::Error => tracing::error!(target: "raft", "{message}{pairs}"),
            Level::Warning => tracing::warn!(target: "raft", "{message}{pairs}"),
            Level::Info | Level::Debug => tracing::debug!(target: "raft", "{message}{pairs}"),
            Level::Trace => tracing::trace!(target: "raft", "{message}{pairs}"),
        }
        Ok(())
    }
}

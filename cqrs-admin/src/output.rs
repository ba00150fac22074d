//! Tables for people, JSON for scripts.

use std::io::Write;

use cqrs_core::RecordedEvent;
use serde_json::{json, Value};

/// Columns aligned on the widest cell, a header row first.
#[derive(Debug, Default)]
pub(crate) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn write(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[c].saturating_sub(cell.chars().count());
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// An event's payload as JSON: the one place that reads `RecordedEvent::payload`.
pub(crate) fn payload(event: &RecordedEvent) -> Value {
    stored_json(&event.payload)
}

/// Stored JSON text as a value to print; text that does not parse is shown as it is, beside the
/// parser's error, rather than hidden or fatal to the listing.
fn stored_json(raw: &cqrs_core::RawJson) -> Value {
    raw.to_value().unwrap_or_else(
        |error| json!({ "unreadable": error.to_string(), "stored_text": raw.as_str() }),
    )
}

/// The envelope and payload of an event, for `--json`.
pub(crate) fn event_json(event: &RecordedEvent) -> Value {
    json!({
        "position": event.position.to_string(),
        "stream_type": event.stream.stream_type(),
        "stream_id": event.stream.id(),
        "stream_version": event.stream_version.get(),
        "event_id": event.event_id.to_string(),
        "event_type": event.event_type,
        "schema_version": event.schema_version,
        "recorded_at": event.recorded_at.to_rfc3339(),
        "metadata": stored_json(&event.raw_metadata),
        "payload": payload(event),
    })
}

/// The envelope on one line, then the payload pretty-printed and indented.
pub(crate) fn write_event(out: &mut dyn Write, event: &RecordedEvent) -> std::io::Result<()> {
    writeln!(
        out,
        "{} v{} {} (schema {}) at {} position {} id {}",
        event.stream,
        event.stream_version,
        event.event_type,
        event.schema_version,
        event.recorded_at.to_rfc3339(),
        event.position,
        event.event_id,
    )?;
    if let Some(correlation) = event.metadata().ok().and_then(|m| m.correlation_id) {
        writeln!(out, "  correlation {correlation}")?;
    }
    let pretty = serde_json::to_string_pretty(&payload(event)).unwrap_or_default();
    for line in pretty.lines() {
        writeln!(out, "  {line}")?;
    }
    Ok(())
}

/// One line of JSON.
pub(crate) fn write_json(out: &mut dyn Write, value: &Value) -> std::io::Result<()> {
    writeln!(out, "{value}")
}

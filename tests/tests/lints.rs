//! The macros' expansions stay quiet under strict user lints: CI's clippy run compiles this file
//! with `clippy::pedantic` and `warnings` denied.
#![deny(warnings, clippy::pedantic, missing_docs)]

use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

/// Version 1.
#[event(name = "Noted", version = 1)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotedV1 {
    /// Text.
    pub text: String,
}

/// Version 2.
#[event(name = "Noted", version = 2, upcast_from = NotedV1)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Noted {
    /// Text.
    pub text: String,
    /// Importance.
    pub level: u8,
}

impl From<NotedV1> for Noted {
    fn from(v1: NotedV1) -> Self {
        Noted {
            text: v1.text,
            level: 0,
        }
    }
}

/// A note removed; with `Noted`, the aggregate and the projection get the stored-name check.
#[event(name = "Erased")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Erased {
    /// Which note.
    pub index: usize,
}

/// A notebook.
#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "notebook", events(Noted, Erased))]
pub struct Notebook {
    notes: Vec<String>,
}

impl Apply<Noted> for Notebook {
    fn apply(&mut self, e: &Noted) {
        self.notes.push(e.text.clone());
    }
}

impl Apply<Erased> for Notebook {
    fn apply(&mut self, e: &Erased) {
        if e.index < self.notes.len() {
            self.notes.remove(e.index);
        }
    }
}

/// Counts notes.
#[derive(Debug, Default)]
pub struct NoteCount {
    count: usize,
}

#[projection(name = "note_count")]
impl NoteCount {
    async fn on_noted(&mut self, _: &Noted, _: &RecordedEvent) {
        tokio::task::yield_now().await;
        self.count += 1;
    }

    fn on_erased(&mut self, _: &Erased) {
        self.count = self.count.saturating_sub(1);
    }
}

#[test]
fn strict_lints_compile() {
    let mut notebook = Notebook::default();
    notebook.apply_event(&NotebookEvent::Noted(Noted {
        text: "x".into(),
        level: 1,
    }));
    assert_eq!(notebook.notes.len(), 1);
    assert_eq!(NoteCount::NAME, "note_count");
    assert_eq!(NoteCount::default().count, 0);
}

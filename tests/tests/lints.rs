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

/// A notebook.
#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "notebook", events(Noted))]
pub struct Notebook {
    notes: Vec<String>,
}

impl Apply<Noted> for Notebook {
    fn apply(&mut self, e: &Noted) {
        self.notes.push(e.text.clone());
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

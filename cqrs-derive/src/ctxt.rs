//! Error accumulation: every mistake is reported in one build (serde_derive's `Ctxt`).

use std::fmt::Display;

use quote::ToTokens;

/// Collects every user error of one macro call. It must be consumed with [`Ctxt::check`]:
/// dropping it unchecked would lose errors, so it panics in debug builds (as serde's does).
#[derive(Default)]
pub struct Ctxt {
    errors: Option<syn::Error>,
    checked: bool,
}

impl Ctxt {
    pub fn push(&mut self, error: syn::Error) {
        match &mut self.errors {
            Some(errors) => errors.combine(error),
            None => self.errors = Some(error),
        }
    }

    pub fn error_spanned_by(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    /// Every error reported, combined into one (each keeps its own span).
    pub fn check(mut self) -> Result<(), syn::Error> {
        self.checked = true;
        self.errors.take().map_or(Ok(()), Err)
    }
}

impl Drop for Ctxt {
    fn drop(&mut self) {
        if cfg!(debug_assertions) && !self.checked && !std::thread::panicking() {
            panic!("a Ctxt was dropped without `check()`: its errors would be lost");
        }
    }
}

/// Tokens as compact text (`a::B<C>`), for messages and syntactic comparisons.
pub fn text(tokens: impl ToTokens) -> String {
    tokens.to_token_stream().to_string().replace(' ', "")
}

/// `unknown key `naem`; did you mean `name`?` (edit distance at most 2), else the list of keys.
pub fn unknown_key(path: &syn::Path, known: &[&str]) -> syn::Error {
    let found = text(path);
    let hint = suggestion(&found, known).map_or_else(
        || format!("; expected one of: {}", known.join(", ")),
        |k| format!("; did you mean `{k}`?"),
    );
    syn::Error::new_spanned(path, format!("unknown key `{found}`{hint}"))
}

/// The known key `found` is most likely a misspelling of, if any (edit distance at most 2).
pub fn suggestion<'a>(found: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (distance(found, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::Ctxt;

    #[test]
    #[should_panic(expected = "without `check()`")]
    fn a_ctxt_dropped_unchecked_panics() {
        let mut cx = Ctxt::default();
        cx.error_spanned_by(quote::quote!(x), "lost");
    }

    #[test]
    fn check_returns_every_error() {
        let mut cx = Ctxt::default();
        cx.error_spanned_by(quote::quote!(a), "first");
        cx.error_spanned_by(quote::quote!(b), "second");
        let errors = cx.check().unwrap_err();
        assert_eq!(errors.into_iter().count(), 2);
    }
}

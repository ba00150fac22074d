//! Tokens out, from validated models. Never reports user errors: those were reported by `valid`,
//! or are left to rustc through checks spanned at the user's tokens.
//!
//! Output order is deterministic (the order the user wrote things in), and every path is
//! absolute through `<crate>::__private`, so the user's scope cannot change its meaning.

mod aggregate;
mod event;
mod projection;

pub use aggregate::aggregate;
pub(crate) use aggregate::event_enum_def;
pub use event::event;
pub use projection::projection;

use proc_macro2::{Group, Literal, Span, TokenStream, TokenTree};
use quote::{quote, ToTokens};
use syn::Path;

/// `<crate>::__private`, the hidden module generated code names everything through.
fn private(krate: &Path) -> TokenStream {
    quote!(#krate::__private)
}

/// `3` rather than `3u32`, for readable expansions.
fn int(value: u32) -> Literal {
    Literal::u32_unsuffixed(value)
}

/// The tokens with every span set to `span`, so that rustc reports an error *inside* them (a
/// failed const assertion, an unsatisfied bound) at the user's tokens.
fn respan(tokens: impl ToTokens, span: Span) -> TokenStream {
    tokens
        .into_token_stream()
        .into_iter()
        .map(|tt| match tt {
            TokenTree::Group(g) => {
                let mut group = Group::new(g.delimiter(), respan(g.stream(), span));
                group.set_span(span);
                TokenTree::Group(group)
            }
            mut other => {
                other.set_span(span);
                other
            }
        })
        .collect()
}

/// A const assertion whose failure rustc reports at `span` with `message`.
fn const_assert(span: Span, krate: &Path, condition: TokenStream, message: &str) -> TokenStream {
    let message = message.replace('{', "{{").replace('}', "}}");
    let p = private(krate);
    respan(
        quote!(const _: () = #p::core::assert!(#condition, #message);),
        span,
    )
}

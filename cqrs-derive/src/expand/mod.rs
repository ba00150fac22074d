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
/// One const assertion per pair of `types` that their stored names differ, spanned at the later
/// type of the pair; `message(a, b)` explains the clash.
fn distinct_names(
    krate: &Path,
    types: &[&syn::Type],
    message: impl Fn(&syn::Type, &syn::Type) -> String,
) -> Vec<TokenStream> {
    let p = private(krate);
    let mut assertions = Vec::new();
    for (i, a) in types.iter().enumerate() {
        for b in &types[i + 1..] {
            assertions.push(const_assert(
                syn::spanned::Spanned::span(b),
                krate,
                quote!(!#p::str_eq(<#a as #krate::Event>::NAME, <#b as #krate::Event>::NAME)),
                &message(a, b),
            ));
        }
    }
    assertions
}

fn const_assert(span: Span, krate: &Path, condition: TokenStream, message: &str) -> TokenStream {
    let message = message.replace('{', "{{").replace('}', "}}");
    let p = private(krate);
    respan(
        quote!(const _: () = #p::core::assert!(#condition, #message);),
        span,
    )
}

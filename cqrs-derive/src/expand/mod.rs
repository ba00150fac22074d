//! Tokens out, from validated models. Never reports user errors: those were reported by `valid`,
//! or are left to rustc through checks spanned at the user's tokens.
//!
//! Output order is deterministic (the order the user wrote things in), and every path is
//! absolute through `<crate>::__private`, so the user's scope cannot change its meaning.

mod aggregate;
mod event;
mod projection;

pub use aggregate::aggregate;
pub(crate) use aggregate::{event_enum_def, from_impls};
pub use event::event;
pub use projection::projection;

use proc_macro2::{Group, Literal, Span, TokenStream, TokenTree};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
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

/// The generics of a generic type's `impl Event`, with the bounds `Event` needs of it (serde's
/// derives bound each parameter on its own impls only; rustc would suggest nonsense for them).
pub(crate) fn event_generics(krate: &Path, input: &syn::DeriveInput) -> syn::Generics {
    let mut generics = input.generics.clone();
    if input.generics.type_params().next().is_some() {
        let p = private(krate);
        let ident = &input.ident;
        let (_, ty_generics, _) = input.generics.split_for_impl();
        generics
            .make_where_clause()
            .predicates
            .push(syn::parse_quote! {
                #ident #ty_generics: #p::serde::Serialize
                    + #p::serde::de::DeserializeOwned
                    + #p::core::marker::Send
                    + #p::core::marker::Sync
                    + 'static
            });
    }
    generics
}

/// `#[diagnostic::do_not_recommend]` for the `impl Event` of a type without parameters: rustc
/// then leaves it out of the "other types implement `Event`" list it appends to a non-event's
/// error, which would list every event in scope under the one message that matters. Generic
/// impls keep their place: they have bounds, and hiding the impl would hide which bound failed.
pub(crate) fn not_recommended(input: &syn::DeriveInput) -> TokenStream {
    if input.generics.params.is_empty() && input.generics.where_clause.is_none() {
        quote!(#[diagnostic::do_not_recommend])
    } else {
        TokenStream::new()
    }
}

/// The generics of a generic aggregate's `impl Aggregate`, with the bounds it needs: the trait's
/// own, and `Apply<E>` for each listed event (the user's impls may bound the parameters).
pub(crate) fn aggregate_generics(
    krate: &Path,
    events: &[&syn::Type],
    input: &syn::DeriveInput,
) -> syn::Generics {
    let mut generics = input.generics.clone();
    if input.generics.type_params().next().is_some() {
        let p = private(krate);
        let ident = &input.ident;
        let (_, ty_generics, _) = input.generics.split_for_impl();
        generics
            .make_where_clause()
            .predicates
            .push(syn::parse_quote! {
                #ident #ty_generics: #p::core::default::Default
                    + #p::core::marker::Send
                    + #p::core::marker::Sync
                    + 'static
                    #(+ #krate::Apply<#events>)*
            });
    }
    generics
}

/// `<E as Event>::item`, every token spanned at the user's `E`: if `E` is not an event, each
/// use is reported there with `Event`'s `on_unimplemented` message, and rustc shows identical
/// errors once. (A token left at the macro's span would widen the expression's span to the
/// whole attribute, and add an error of its own there.)
fn event_item(krate: &Path, ty: &syn::Type, item: TokenStream) -> TokenStream {
    let span = ty.span();
    let event = respan(quote!(#krate::Event), span);
    let item = respan(item, span);
    quote_spanned!(span=> <#ty as #event>::#item)
}

/// The compile-time check that the stored names of `events` (each a type and the message for a
/// later event clashing with it) differ, linear in the number of events: one check per event
/// finds the first earlier event with its name, and one `match` fails with that event's message.
///
/// Both places are underlined in one error: the check is spanned at the later event (rustc's
/// primary span) and the failing `match` arm at the earlier one (the "inside" note of rustc's
/// const-evaluation backtrace). Each check is a `const` of its own, so every clash is reported.
fn distinct_names(krate: &Path, events: &[(&syn::Type, String)]) -> TokenStream {
    if events.len() < 2 {
        return TokenStream::new();
    }
    let p = private(krate);
    let names = events
        .iter()
        .map(|(ty, _)| event_item(krate, ty, quote!(NAME)));
    // The last event is never the earlier one of a clash.
    let arms = events[..events.len() - 1]
        .iter()
        .enumerate()
        .map(|(i, (ty, message))| {
            let i = Literal::usize_unsuffixed(i);
            let fail = respan(quote!(#p::core::panic!("{}", #message)), ty.span());
            quote!(#i => #fail,)
        });
    let checks = events.iter().enumerate().skip(1).map(|(i, (ty, _))| {
        let i = Literal::usize_unsuffixed(i);
        respan(
            quote! {
                const _: () = if let #p::core::option::Option::Some(earlier) =
                    #p::first_clash(NAMES, #i)
                {
                    stored_under_the_same_name(earlier)
                };
            },
            ty.span(),
        )
    });
    quote! {
        /// Compile-time check: no two events stored under one name.
        const _: () = {
            const NAMES: &[&str] = &[#(#names),*];

            /// Fails with the message for a clash with the `earlier`-th event, at its tokens.
            const fn stored_under_the_same_name(earlier: usize) {
                match earlier {
                    #(#arms)*
                    _ => {}
                }
            }

            #(#checks)*
        };
    }
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

#[cfg(test)]
mod tests {
    use super::distinct_names;

    /// The stored-name check is one lookup and one `match` arm per event, not one assertion per
    /// pair: its size, and the compile time it costs, grow linearly with the number of events.
    #[test]
    fn the_stored_name_check_grows_linearly() {
        let krate: syn::Path = syn::parse_quote!(::cqrs_core);
        for n in [2_usize, 20, 40] {
            let types: Vec<syn::Type> = (0..n)
                .map(|i| syn::parse_str(&format!("Event{i}")).unwrap())
                .collect();
            let events: Vec<_> = types
                .iter()
                .map(|ty| (ty, format!("clash with {}", crate::ctxt::text(ty))))
                .collect();
            let check = distinct_names(&krate, &events).to_string();
            assert_eq!(check.matches("first_clash").count(), n - 1, "{n} events");
            assert_eq!(check.matches("panic").count(), n - 1, "{n} events");
            assert_eq!(check.matches(":: NAME").count(), n, "{n} events");
        }
    }
}

//! `#[projection]`: the impl block as written (minus `#[helper]` markers), plus `impl Projection`
//! whose `handle` is one `match` on the stored type name (the catch-all handler, if any, in the
//! last arm).

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use super::{distinct_names, event_item, private};
use crate::ast::{Handler, Projection, StreamType};
use crate::ctxt::text;

pub fn projection(model: &Projection, item: &syn::ItemImpl) -> TokenStream {
    let Projection {
        krate,
        name,
        context,
        handlers,
        streams,
        flush,
        discard,
    } = model;
    let (catch_all, handlers): (Vec<&Handler>, Vec<&Handler>) =
        handlers.iter().partition(|h| h.catch_all);
    let p = private(krate);
    let self_ty = &item.self_ty;
    let (impl_generics, _, where_clause) = item.generics.split_for_impl();
    let context = context.as_ref().map_or_else(|| quote!(()), |c| quote!(#c));
    let names: Vec<_> = handlers
        .iter()
        .map(|h| event_item(krate, &h.event, quote!(NAME)))
        .collect();
    // Arguments spanned at the user's parameters, so a type mismatch is reported there.
    let call = |h: &Handler, event: TokenStream| {
        let method = &h.method;
        let meta = h.meta.as_ref().map(|m| quote_spanned!(m.span()=> , event));
        let ctx = h
            .context
            .as_ref()
            .map(|c| quote_spanned!(c.span()=> , &mut *context));
        if h.is_async {
            quote!(self.#method(#event #meta #ctx).await)
        } else {
            quote!(self.#method(#event #meta #ctx))
        }
    };
    let routes = handlers.iter().zip(&names).map(|(h, name)| {
        let call = call(h, quote!(&decoded));
        // Spanned at the event parameter: a type that is not an event is reported there once.
        let decode = event_item(
            krate,
            &h.event,
            quote!(decode(event.schema_version, &event.payload)),
        );
        quote! {
            #name => {
                let decoded = #decode;
                let decoded = #p::decoded::<Self, _>(event, decoded)?;
                #p::handled::<Self>(event, #call)
            }
        }
    });
    // Two event types stored under one name (two versions of one event, unrelated types named
    // alike, or one type written two ways, e.g. through an alias) would route to only the first
    // handler.
    let fallback = match catch_all.first() {
        Some(h) => {
            let call = call(h, quote!(event));
            quote!(_ => #p::handled::<Self>(event, #call),)
        }
        None => quote!(_ => #p::Ok(()),),
    };
    // The default (exactly `EVENT_TYPES`, every stream) is left to the trait.
    let subscription = (!catch_all.is_empty() || !streams.is_empty()).then(|| {
        let base = if catch_all.is_empty() {
            quote!(#krate::Subscription::types(Self::EVENT_TYPES))
        } else {
            quote!(#krate::Subscription::ALL)
        };
        let filtered = if streams.is_empty() {
            base
        } else {
            let streams = streams.iter().map(|s| match s {
                StreamType::Name(name) => quote!(#name),
                StreamType::Aggregate(ty) => {
                    // Spanned at the user's type: one that is not an aggregate is reported there.
                    quote_spanned!(ty.span()=> <#ty as #krate::Aggregate>::TYPE)
                }
            });
            quote!(#base.in_streams(&[#(#streams),*]))
        };
        quote! {
            const SUBSCRIPTION: #krate::Subscription = #filtered;
        }
    });
    let handled: Vec<_> = handlers
        .iter()
        .map(|h| {
            let message = format!(
                "this event is stored under the same name as `{}` (below), which `{}` handles, so only one of the two handlers would run: give one of them its own `#[event(name = \"...\")]`; or, if they are two versions of one event, handle only the current one (older versions are upcast to it)",
                text(&h.event),
                h.method
            );
            (&h.event, message)
        })
        .collect();
    let distinct_names = distinct_names(krate, &handled);
    // Without `#[flush]`/`#[discard]`, the trait's no-op defaults apply.
    let flush = flush.as_ref().map(|f| {
        let method = &f.method;
        let args = if f.takes_context {
            quote!(context)
        } else {
            quote!()
        };
        let call = if f.is_async {
            quote!(self.#method(#args).await)
        } else {
            quote!(self.#method(#args))
        };
        quote! {
            /// Writes what the handlers buffered: calls the `#[flush]` method.
            #[allow(unused_variables)]
            fn flush<'__cqrs>(
                &'__cqrs mut self,
                context: &'__cqrs mut Self::Context,
            ) -> impl #p::core::future::Future<
                Output = #p::Result<(), #krate::ProjectionError>,
            > + #p::core::marker::Send + '__cqrs {
                async move { #p::flushed::<Self>(#call) }
            }
        }
    });
    let discard = discard.as_ref().map(|method| {
        quote! {
            /// Drops what the handlers buffered: calls the `#[discard]` method.
            fn discard(&mut self) {
                self.#method();
            }
        }
    });
    quote! {
        #item

        const _: () = {
            #[automatically_derived]
            impl #impl_generics #krate::Projection for #self_ty #where_clause {
                const NAME: &'static str = #name;
                const EVENT_TYPES: &'static [&'static str] = &[#(#names),*];
                #subscription
                type Context = #context;

                /// Decodes the event and calls the handler for its type; events of other types
                /// are skipped without being decoded.
                // Two arms for one stored name are reported by the name check below; rustc's
                // lint would point at the same tokens again.
                #[allow(unused_variables, unreachable_patterns)]
                fn handle<'__cqrs>(
                    &'__cqrs mut self,
                    event: &'__cqrs #krate::RecordedEvent,
                    context: &'__cqrs mut Self::Context,
                ) -> impl #p::core::future::Future<
                    Output = #p::Result<(), #krate::ProjectionError>,
                > + #p::core::marker::Send + '__cqrs {
                    async move {
                        match event.event_type.as_str() {
                            #(#routes)*
                            #fallback
                        }
                    }
                }

                #flush
                #discard
            }

            #distinct_names
        };
    }
}

//! `#[projection]`: the impl block as written (minus `#[helper]` markers), plus `impl Projection`
//! whose `handle` is one `match` on the stored type name.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use super::{distinct_names, private};
use crate::ast::Projection;
use crate::valid::text;

pub fn projection(model: &Projection, item: &syn::ItemImpl) -> TokenStream {
    let Projection {
        krate,
        name,
        context,
        handlers,
        flush,
        discard,
    } = model;
    let p = private(krate);
    let self_ty = &item.self_ty;
    let (impl_generics, _, where_clause) = item.generics.split_for_impl();
    let context = context.as_ref().map_or_else(|| quote!(()), |c| quote!(#c));
    let types: Vec<_> = handlers.iter().map(|h| &h.event).collect();
    let routes = handlers.iter().map(|h| {
        let (method, ty) = (&h.method, &h.event);
        // Arguments spanned at the user's parameters, so a type mismatch is reported there.
        let meta = h.meta.as_ref().map(|m| quote_spanned!(m.span()=> , event));
        let ctx = h
            .context
            .as_ref()
            .map(|c| quote_spanned!(c.span()=> , &mut *context));
        let call = if h.is_async {
            quote!(self.#method(&decoded #meta #ctx).await)
        } else {
            quote!(self.#method(&decoded #meta #ctx))
        };
        quote! {
            <#ty as #krate::Event>::NAME => {
                let decoded = #p::decode_for::<Self, #ty>(event)?;
                #p::handled::<Self>(event, #call)
            }
        }
    });
    // One marker impl per handler, spanned at its event parameter: two handlers for one event
    // type, even written through an alias, conflict here and rustc shows both parameters.
    let one_handler = handlers.iter().map(|h| {
        let ty = &h.event;
        quote_spanned! {ty.span()=>
            impl #impl_generics OneHandlerPerEventType<#ty> for #self_ty #where_clause {}
        }
    });
    // Two event types stored under one name (e.g. two versions of one event) would route to
    // only the first handler.
    let distinct_names = distinct_names(krate, &types, |a, b| {
        format!(
            "`{}` and `{}` are stored under the same name, so one handler would never run; handle only the current version (older ones are upcast to it)",
            text(a),
            text(b)
        )
    });
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
            trait OneHandlerPerEventType<E: ?Sized> {}
            #(#one_handler)*

            #[automatically_derived]
            impl #impl_generics #krate::Projection for #self_ty #where_clause {
                const NAME: &'static str = #name;
                const EVENT_TYPES: &'static [&'static str] = &[#(<#types as #krate::Event>::NAME),*];
                type Context = #context;

                /// Decodes the event and calls the handler for its type; events of other types
                /// are skipped without being decoded.
                #[allow(unused_variables)]
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
                            _ => #p::Ok(()),
                        }
                    }
                }

                #flush
                #discard
            }

            #(#distinct_names)*
        };
    }
}

//! The HTTP example's OpenTelemetry export: a command's span reaches an OTLP/HTTP receiver (a
//! local axum server standing in for a collector) with the aggregate type and the correlation id
//! the request carried.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use cqrs_core::InMemoryStore;
use examples::http::CORRELATION_HEADER;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

/// A receiver for `POST /v1/traces`: every body it gets, decoded.
async fn receiver() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
) {
    let (sender, received) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sender = sender.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).unwrap();
                let _ = sender.send(request);
                // An empty ExportTraceServiceResponse.
                Vec::<u8>::new()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), received)
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(text) => Some(text.as_str()),
            _ => None,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_spans_reach_the_otlp_endpoint() {
    let (collector, mut received) = receiver().await;
    let provider = examples::telemetry::tracer_provider(&format!("{collector}/v1/traces")).unwrap();
    examples::telemetry::install(&provider).unwrap();

    let app = examples::http::app(InMemoryStore::new(), Duration::from_secs(5)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let correlation = uuid::Uuid::now_v7().to_string();
    let opened = reqwest::Client::new()
        .post(format!("{base}/accounts"))
        .header(CORRELATION_HEADER, &correlation)
        .json(&json!({ "id": "traced", "owner": "Ada" }))
        .send()
        .await
        .unwrap();
    assert_eq!(opened.status(), reqwest::StatusCode::CREATED);
    assert_eq!(opened.headers()[CORRELATION_HEADER], correlation.as_str());

    // Sends what the batch processor holds (a blocking call: off the runtime's threads).
    let flushing = provider.clone();
    tokio::task::spawn_blocking(move || flushing.force_flush())
        .await
        .unwrap()
        .unwrap();
    let mut spans = Vec::new();
    while let Ok(request) = received.try_recv() {
        for resource in request.resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
    }
    let command = spans
        .iter()
        .find(|s| s.name == "command" && attribute(s, "id") == Some("traced"))
        .unwrap_or_else(|| {
            let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
            panic!("no command span among {names:?}")
        });
    assert_eq!(attribute(command, "aggregate"), Some("account"));
    assert_eq!(
        attribute(command, "correlation_id"),
        Some(correlation.as_str())
    );
    assert!(
        attribute(command, "command").is_some_and(|c| c.ends_with("OpenAccount")),
        "{command:?}"
    );
    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn nothing_is_exported_without_an_endpoint() {
    // The variables this process was started with decide; the test's own run sets neither.
    if std::env::var_os(examples::telemetry::ENDPOINT_VARIABLE).is_none()
        && std::env::var_os(examples::telemetry::TRACES_ENDPOINT_VARIABLE).is_none()
    {
        assert_eq!(examples::telemetry::traces_endpoint_from_env(), None);
        assert!(examples::telemetry::init_from_env().unwrap().is_none());
    }
}

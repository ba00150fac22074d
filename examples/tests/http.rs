//! The HTTP example end to end over a real socket.
// Tests: failing assertions panic by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cqrs_core::InMemoryStore;
use examples::http::CONSISTENCY_HEADER;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn serve(wait: Duration) -> String {
    let app = examples::http::app(InMemoryStore::new(), wait).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_return_a_token_and_reads_wait_for_it() {
    let base = serve(Duration::from_secs(5)).await;
    let http = reqwest::Client::new();
    let opened = http
        .post(format!("{base}/accounts"))
        .json(&json!({ "id": "a1", "owner": "Ada" }))
        .send()
        .await
        .unwrap();
    assert_eq!(opened.status(), StatusCode::CREATED);
    let deposit = http
        .post(format!("{base}/accounts/a1/deposits"))
        .json(&json!({ "amount": 500, "memo": "salary" }))
        .send()
        .await
        .unwrap();
    assert_eq!(deposit.status(), StatusCode::OK);
    let token = deposit.headers()[CONSISTENCY_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = deposit.json().await.unwrap();
    assert_eq!(body["stream_version"], 2);
    assert_eq!(body["position"], token.as_str());

    let read = http
        .get(format!("{base}/accounts/a1/balance"))
        .header(CONSISTENCY_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    let body: Value = read.json().await.unwrap();
    assert_eq!(body["balance"], 500, "the read saw its own write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_the_future_gets_202_with_retry_after() {
    let base = serve(Duration::from_millis(100)).await;
    let http = reqwest::Client::new();
    http.post(format!("{base}/accounts"))
        .json(&json!({ "id": "a2", "owner": "Ada" }))
        .send()
        .await
        .unwrap();
    let read = http
        .get(format!("{base}/accounts/a2/balance"))
        .header(CONSISTENCY_HEADER, "999999.999999")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::ACCEPTED);
    assert_eq!(read.headers()["retry-after"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_mistakes_are_4xx_json_never_500() {
    let base = serve(Duration::from_secs(1)).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: &str| {
        http.post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    post("/accounts", r#"{"id":"b1","owner":"Bo"}"#)
        .await
        .unwrap();
    let cases = [
        (
            post("/accounts", "{not json").await.unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            post("/accounts", r#"{"id":"x"}"#).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            post("/accounts/b1/deposits", r#"{"amount":"ten"}"#)
                .await
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            post("/accounts", r#"{"id":"b1","owner":"Bo"}"#)
                .await
                .unwrap(),
            StatusCode::CONFLICT,
            "already_open",
        ),
        (
            post("/accounts/b1/deposits", r#"{"amount":-5}"#)
                .await
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_amount",
        ),
        (
            post("/accounts/b1/withdrawals", r#"{"amount":5}"#)
                .await
                .unwrap(),
            StatusCode::CONFLICT,
            "insufficient_funds",
        ),
        (
            post("/accounts/nobody/deposits", r#"{"amount":5}"#)
                .await
                .unwrap(),
            StatusCode::NOT_FOUND,
            "account_not_found",
        ),
        (
            post("/accounts", r#"{"id":"","owner":"Bo"}"#)
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            http.get(format!("{base}/accounts/b1/balance"))
                .header(CONSISTENCY_HEADER, "yesterday")
                .send()
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            http.get(format!("{base}/accounts/ghost/balance"))
                .send()
                .await
                .unwrap(),
            StatusCode::NOT_FOUND,
            "account_not_found",
        ),
    ];
    for (response, status, code) in cases {
        assert_eq!(response.status(), status);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], code, "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    let no_type = http
        .post(format!("{base}/accounts"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(no_type.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

/// The service's metrics at `/metrics` while it serves requests (the recorder is this test
/// binary's, so other tests' commands may be counted too: the assertions are lower bounds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_prometheus_format() {
    // Installed first: runners register their metrics when they start.
    let metrics = examples::http::install_metrics().unwrap();
    let app = examples::http::app(InMemoryStore::new(), Duration::from_secs(5))
        .unwrap()
        .merge(examples::http::metrics_router(metrics));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    let opened = client
        .post(format!("{base}/accounts"))
        .json(&json!({ "id": "m1", "owner": "Ada" }))
        .send()
        .await
        .unwrap();
    assert!(opened.status().is_success());
    let token = opened.headers()[CONSISTENCY_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    let balance = client
        .get(format!("{base}/accounts/m1/balance"))
        .header(CONSISTENCY_HEADER, token)
        .send()
        .await
        .unwrap();
    assert_eq!(balance.status(), StatusCode::OK);
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains(r#"cqrs_commands_total{aggregate="account",outcome="ok"}"#),
        "{text}"
    );
    assert!(text.contains("cqrs_events_appended_total"), "{text}");
    assert!(
        text.contains("cqrs_projection_events_applied_total"),
        "{text}"
    );
    assert!(text.contains("cqrs_command_duration_seconds"), "{text}");
}

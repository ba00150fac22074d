//! An HTTP service over the bank domain: POST endpoints dispatch commands through the command bus
//! and answer with a consistency token; GET endpoints read the balance projection and, when the
//! request carries a token, wait for the projection to reach it (or answer 202 with `Retry-After`).

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cqrs_core::bus::{BusError, CommandBus, DomainError};
use cqrs_core::prelude::*;
use cqrs_core::subscription::{InProcess, ProjectionHandle, ProjectionRunner};
use cqrs_core::{projection, ExecuteError, StoreError};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::json;

use crate::bank::{
    Account, AccountOpened, BankError, Deposit, MoneyDeposited, MoneyWithdrawn, OpenAccount,
    Withdraw,
};

/// The header carrying the read-your-own-writes token (a [`Position`]).
pub const CONSISTENCY_HEADER: &str = "x-consistency-token";

/// The header carrying a request's correlation id (a UUID): the command's correlation id,
/// stored in its events' metadata and recorded on its `command` span; one is made when a
/// request has none, and the response carries it back.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// Balances shared between the projection runner (writer) and the HTTP handlers (readers).
#[derive(Debug, Default, Clone)]
pub struct SharedBalances {
    balances: Arc<RwLock<BTreeMap<String, i64>>>,
}

impl SharedBalances {
    /// The balance of `account`, if it is open.
    pub fn get(&self, account: &str) -> Option<i64> {
        self.balances
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(account)
            .copied()
    }

    fn add(&self, account: &str, delta: i64) {
        *self
            .balances
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(account.to_owned())
            .or_default() += delta;
    }
}

#[projection(name = "http_balances")]
impl SharedBalances {
    fn on_opened(&mut self, _: &AccountOpened, meta: &RecordedEvent) {
        self.add(meta.stream.id(), 0);
    }

    fn on_deposited(&mut self, e: &MoneyDeposited, meta: &RecordedEvent) {
        self.add(meta.stream.id(), e.amount);
    }

    fn on_withdrawn(&mut self, e: &MoneyWithdrawn, meta: &RecordedEvent) {
        self.add(meta.stream.id(), -e.amount);
    }
}

/// Everything the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    bus: Arc<CommandBus>,
    balances: SharedBalances,
    projection: Arc<ProjectionHandle<SharedBalances>>,
    wait: Duration,
}

/// Builds the service over `store`, starting the balance projection. `wait` is how long a GET with a
/// consistency token waits for the projection before answering 202.
pub fn app<S: EventStore + Clone>(
    store: S,
    wait: Duration,
) -> Result<Router, cqrs_core::bus::AlreadyRegistered> {
    let accounts = Repository::<Account>::new(store.clone()).with_retry(RetryPolicy::retries(3));
    let mut bus = CommandBus::new();
    bus.route::<OpenAccount>(accounts.clone())?
        .route::<Deposit>(accounts.clone())?
        .route::<Withdraw>(accounts)?;
    let balances = SharedBalances::default();
    let projection = ProjectionRunner::new(balances.clone(), InProcess::new(store)).spawn();
    let state = AppState {
        bus: Arc::new(bus),
        balances,
        projection: Arc::new(projection),
        wait,
    };
    Ok(Router::new()
        .route("/accounts", post(open_account))
        .route("/accounts/{id}/deposits", post(deposit))
        .route("/accounts/{id}/withdrawals", post(withdraw))
        .route("/accounts/{id}/balance", get(balance))
        .with_state(state))
}

/// Installs the process's metrics recorder (Prometheus's text format) and returns the handle
/// that renders what it collected: every metric of [`cqrs_core::metrics`]. Once per process, and
/// before runners start: a metric registered before a recorder is installed stays a no-op.
pub fn install_metrics() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new().install_recorder()
}

/// `GET /metrics`: what `metrics` collected, in Prometheus's text format.
pub fn metrics_router(metrics: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    metrics.render(),
                )
            }
        }),
    )
}

/// An error answered as JSON: `{"error": "...", "message": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.code, "message": self.message })),
        )
            .into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = match rejection {
            JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            JsonRejection::JsonDataError(_) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, "invalid_body", rejection.body_text())
    }
}

impl From<BusError> for ApiError {
    fn from(error: BusError) -> Self {
        match error {
            BusError::Execute(ExecuteError::Domain(domain)) => domain_error(&domain),
            BusError::Execute(ExecuteError::Concurrency(c)) => {
                ApiError::new(StatusCode::CONFLICT, "concurrency_conflict", c.to_string())
            }
            // The repository re-sent the events and still got no answer: they may be stored, so
            // a client that retries would run the command twice. Say so.
            BusError::Execute(ExecuteError::Store(StoreError::OutcomeUnknown(_))) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "outcome_unknown",
                "the command may or may not have been applied; read the account before retrying",
            ),
            BusError::Execute(ExecuteError::Store(e)) if e.is_transient() => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                e.to_string(),
            ),
            other => {
                tracing::error!(error = %other, "command failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

fn domain_error(error: &DomainError) -> ApiError {
    let message = error.to_string();
    match error.downcast_ref::<BankError>() {
        Some(BankError::NonPositiveAmount(_)) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_amount", message)
        }
        Some(BankError::NotOpen) => {
            ApiError::new(StatusCode::NOT_FOUND, "account_not_found", message)
        }
        Some(BankError::AlreadyOpen) => {
            ApiError::new(StatusCode::CONFLICT, "already_open", message)
        }
        Some(BankError::InsufficientFunds { .. }) => {
            ApiError::new(StatusCode::CONFLICT, "insufficient_funds", message)
        }
        None => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "rejected", message),
    }
}

fn valid_id(id: &str) -> Result<(), ApiError> {
    StreamId::new(Account::TYPE, id)
        .validate()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_id", e.to_string()))
}

/// The request's correlation id: its [`CORRELATION_HEADER`], or a new one.
fn correlation_id(headers: &HeaderMap) -> Result<uuid::Uuid, ApiError> {
    match headers.get(CORRELATION_HEADER) {
        None => Ok(uuid::Uuid::now_v7()),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_correlation_id",
                    format!("{CORRELATION_HEADER} must be a UUID"),
                )
            }),
    }
}

async fn accepted(
    state: &AppState,
    request: &HeaderMap,
    account: String,
    command: impl Send + 'static,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let correlation = correlation_id(request)?;
    let context = CommandContext::new().with_correlation_id(correlation);
    let receipt = state.bus.dispatch(account, command, context).await?;
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&correlation.to_string()) {
        headers.insert(CORRELATION_HEADER, value);
    }
    if let Some(position) = receipt.position {
        if let Ok(value) = HeaderValue::from_str(&position.to_string()) {
            headers.insert(CONSISTENCY_HEADER, value);
        }
    }
    let body = json!({
        "stream_version": receipt.stream_version.get(),
        "position": receipt.position.map(|p| p.to_string()),
    });
    Ok((status, headers, Json(body)).into_response())
}

#[derive(Deserialize)]
struct OpenBody {
    id: String,
    owner: String,
}

async fn open_account(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<OpenBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    valid_id(&body.id)?;
    accepted(
        &state,
        &headers,
        body.id,
        OpenAccount { owner: body.owner },
        StatusCode::CREATED,
    )
    .await
}

#[derive(Deserialize)]
struct DepositBody {
    amount: i64,
    #[serde(default)]
    memo: String,
}

async fn deposit(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<DepositBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    valid_id(&id)?;
    accepted(
        &state,
        &headers,
        id,
        Deposit {
            amount: body.amount,
            memo: body.memo,
        },
        StatusCode::OK,
    )
    .await
}

#[derive(Deserialize)]
struct WithdrawBody {
    amount: i64,
}

async fn withdraw(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<WithdrawBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    valid_id(&id)?;
    accepted(
        &state,
        &headers,
        id,
        Withdraw {
            amount: body.amount,
        },
        StatusCode::OK,
    )
    .await
}

async fn balance(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(token) = headers.get(CONSISTENCY_HEADER) {
        let position: Position = token
            .to_str()
            .map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_token",
                    "the consistency token is not text",
                )
            })?
            .parse()
            .map_err(|e: cqrs_core::stream::ParsePositionError| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_token", e.to_string())
            })?;
        if state
            .projection
            .wait_for(position, state.wait)
            .await
            .is_err()
        {
            let mut response = (
                StatusCode::ACCEPTED,
                Json(json!({ "status": "pending", "message": "the read model has not caught up with your write yet" })),
            )
                .into_response();
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            return Ok(response);
        }
    }
    match state.balances.get(&id) {
        Some(balance) => Ok(Json(json!({ "id": id, "balance": balance })).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "account_not_found",
            format!("no account `{id}`"),
        )),
    }
}

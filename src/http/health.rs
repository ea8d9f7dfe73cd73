//! Health and metrics for operators: `GET /healthz` and `/livez` (the process answers),
//! `GET /readyz` (every dependency the process cannot work without answers), and
//! `GET /metrics` (Prometheus text; the series are described in [`crate::telemetry`]).
//!
//! # Where they are served
//! - On the API port of `serve`: `/healthz`, `/readyz`, `/metrics` (in the OpenAPI document),
//!   always, with or without an admin listener, so existing probes and scrapes keep working.
//! - On the admin listener (`server.admin_listen`, see [`admin_router`]) of every
//!   long-running process: `serve`, `relay`, `archive --loop`, `project rebuild`. It adds
//!   `/livez`, and is the only way to scrape a process that serves no API.
//!
//! # Readiness
//! A [`Readiness`] is a list of named [`Check`]s (async, each answering `Ok` or why not) and
//! of reports (values shown, never decisive: replicas in rotation, the cache). Every probe
//! runs all the checks at once, each cut off at `server.readiness_timeout_ms`, so a probe
//! answers within about that whatever hangs. A check that fails or does not answer in time
//! makes the process unready and is named in `failing`; its cause is logged (never sent:
//! database error text stays in the logs). Once shutdown has begun ([`Readiness::start_draining`])
//! every probe answers 503 `shutting_down` at once, without running the checks.
//!
//! The answer: `{"ready": bool, "status": "ready" | "unready" | "shutting_down", "failing":
//! [names], "checks": {name: true | "failed" | "timed_out" | report}}`, 200 when ready, else
//! 503.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures::future::BoxFuture;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Map, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::telemetry;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// What a check's probe answers: `Ok`, or why not (logged, never sent).
pub type Probe = Box<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// One named readiness check.
pub struct Check {
    name: String,
    probe: Probe,
}

impl Check {
    /// A check named `name` (a key of the answer's `checks`, e.g. `shards:orders0`) that runs
    /// `probe` on every readiness probe.
    pub fn new<F, Fut>(name: impl Into<String>, probe: F) -> Check
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Check {
            name: name.into(),
            probe: Box::new(move || Box::pin(probe())),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A value `/readyz` shows and never decides on.
struct Report {
    name: String,
    read: Box<dyn Fn() -> Value + Send + Sync>,
}

/// The readiness of one process: its checks, its reports, and whether it is shutting down.
pub struct Readiness {
    checks: Vec<Check>,
    reports: Vec<Report>,
    timeout: Duration,
    draining: AtomicBool,
    /// The last verdict and when it was reached; its lock is held by the evaluation running.
    last: tokio::sync::Mutex<Option<(std::time::Instant, Verdict)>>,
}

/// A verdict this fresh answers the probes that waited for it (or came right after); older,
/// the checks run again.
const SHARED_VERDICT: Duration = Duration::from_millis(100);

/// What one readiness probe found.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub ready: bool,
    /// `ready`, `unready` or `shutting_down`.
    pub status: &'static str,
    /// The checks that failed or did not answer in time.
    pub failing: Vec<String>,
    /// Every check (`true`, `"failed"`, `"timed_out"`) and report, by name.
    pub checks: Map<String, Value>,
}

impl Readiness {
    /// No checks yet; each will be cut off at `timeout`.
    pub fn new(timeout: Duration) -> Readiness {
        Readiness {
            checks: Vec::new(),
            reports: Vec::new(),
            timeout,
            draining: AtomicBool::new(false),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Adds `check`.
    pub fn with(mut self, check: Check) -> Readiness {
        self.checks.push(check);
        self
    }

    /// Adds every check of `checks`.
    pub fn with_all(mut self, checks: impl IntoIterator<Item = Check>) -> Readiness {
        self.checks.extend(checks);
        self
    }

    /// Adds a report: `read()` is shown under `name`, never a reason to be unready.
    pub fn with_report(
        mut self,
        name: impl Into<String>,
        read: impl Fn() -> Value + Send + Sync + 'static,
    ) -> Readiness {
        self.reports.push(Report {
            name: name.into(),
            read: Box::new(read),
        });
        self
    }

    /// The names of the checks, in order.
    pub fn check_names(&self) -> Vec<&str> {
        self.checks.iter().map(Check::name).collect()
    }

    /// From now on every probe answers 503 `shutting_down` (see [`crate::app`]'s shutdown).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Runs every check at once, each within the timeout, and reads the reports. One
    /// evaluation at a time: probes that arrive while one runs wait for it and share its
    /// verdict (a flood of `/readyz` costs the databases one check each per
    /// [`SHARED_VERDICT`], not one per request).
    pub async fn evaluate(&self) -> Verdict {
        if self.is_draining() {
            return Verdict {
                ready: false,
                status: "shutting_down",
                failing: Vec::new(),
                checks: Map::new(),
            };
        }
        let mut last = self.last.lock().await;
        if let Some((at, verdict)) = last.as_ref() {
            if at.elapsed() < SHARED_VERDICT {
                return verdict.clone();
            }
        }
        let verdict = self.run_checks().await;
        *last = Some((std::time::Instant::now(), verdict.clone()));
        verdict
    }

    async fn run_checks(&self) -> Verdict {
        let outcomes = futures::future::join_all(self.checks.iter().map(|c| async move {
            let outcome = tokio::time::timeout(self.timeout, (c.probe)()).await;
            (c.name.as_str(), outcome)
        }))
        .await;
        let mut checks = Map::new();
        let mut failing = Vec::new();
        for (name, outcome) in outcomes {
            let value = match outcome {
                Ok(Ok(())) => Value::Bool(true),
                Ok(Err(cause)) => {
                    tracing::warn!(check = name, %cause, "readiness check failed");
                    Value::from("failed")
                }
                Err(_) => {
                    tracing::warn!(check = name, timeout = ?self.timeout, "readiness check did not answer in time");
                    Value::from("timed_out")
                }
            };
            if value != Value::Bool(true) {
                failing.push(name.to_owned());
            }
            checks.insert(name.to_owned(), value);
        }
        for r in &self.reports {
            checks.insert(r.name.clone(), (r.read)());
        }
        let ready = failing.is_empty();
        Verdict {
            ready,
            status: if ready { "ready" } else { "unready" },
            failing,
            checks,
        }
    }
}

impl IntoResponse for Verdict {
    fn into_response(self) -> Response {
        let status = if self.ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = json!({
            "ready": self.ready,
            "status": self.status,
            "failing": self.failing,
            "checks": self.checks,
        });
        (status, Json(body)).into_response()
    }
}

/// The Prometheus text exposition format, version 0.0.4.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn prometheus_text(handle: &PrometheusHandle) -> Response {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
        telemetry::render(handle),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "service",
    security(()),
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain; version=0.0.4"))
)]
async fn metrics(State(state): State<AppState>) -> Response {
    prometheus_text(&state.metrics)
}

#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "service",
    security(()),
    responses((status = 200, description = "The process is up: `{\"status\": \"ok\"}`", body = Object))
)]
async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "service",
    security(()),
    responses(
        (status = 200, description = "Every check passed: `{\"ready\": true, \"status\": \"ready\", \"failing\": [], \"checks\": {…}}`; replicas and the cache are reported, never decisive", body = Object),
        (status = 503, description = "A check failed or did not answer within `server.readiness_timeout_ms` (`status` `unready`, named in `failing`), or the process is shutting down (`status` `shutting_down`)", body = Object),
    )
)]
async fn readyz(State(state): State<AppState>) -> Verdict {
    state.readiness.evaluate().await
}

/// What the admin listener's handlers read.
#[derive(Clone)]
struct Admin {
    readiness: Arc<Readiness>,
    metrics: PrometheusHandle,
}

/// The routes of the admin listener: `/metrics`, `/healthz`, `/livez` and `/readyz`, with no
/// authentication, limits or request metrics (bind it where only operators reach it). Not
/// part of the API: not in the OpenAPI document.
pub fn admin_router(readiness: Arc<Readiness>, metrics: PrometheusHandle) -> Router {
    use axum::routing::get;
    Router::new()
        .route("/metrics", get(admin_metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(admin_readyz))
        .with_state(Admin { readiness, metrics })
}

async fn admin_metrics(State(admin): State<Admin>) -> Response {
    prometheus_text(&admin.metrics)
}

async fn admin_readyz(State(admin): State<Admin>) -> Verdict {
    admin.readiness.evaluate().await
}

/// Liveness: the process's runtime still runs tasks and answers. No dependency is looked at:
/// a database outage must not get the process restarted (readiness takes it out instead).
async fn livez() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Checks run at once: one that hangs is cut off at the timeout and named, the others
    /// still answer; reports never decide; draining answers at once.
    /// A flood of probes runs the checks once, not once per probe.
    #[tokio::test]
    async fn probes_that_arrive_together_share_one_round_of_checks() {
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = runs.clone();
        let readiness = Readiness::new(Duration::from_millis(500)).with(Check::new("db", move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(())
            }
        }));
        let verdicts = futures::future::join_all((0..50).map(|_| readiness.evaluate())).await;
        assert!(verdicts.iter().all(|v| v.ready));
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Later, the checks run again.
        tokio::time::sleep(SHARED_VERDICT * 2).await;
        readiness.evaluate().await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn checks_run_at_once_each_within_the_timeout() {
        let timeout = Duration::from_millis(300);
        let readiness = Readiness::new(timeout)
            .with(Check::new("fine", || async { Ok(()) }))
            .with(Check::new("hangs", || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(())
            }))
            .with(Check::new("slow_but_fine", || async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(())
            }))
            .with(Check::new("broken", || async { Err("refused".to_owned()) }))
            .with_report("cache", || Value::from("degraded"));
        let started = Instant::now();
        let v = readiness.evaluate().await;
        let took = started.elapsed();
        assert!(!v.ready);
        assert_eq!(v.status, "unready");
        assert_eq!(v.failing, vec!["hangs".to_owned(), "broken".to_owned()]);
        assert_eq!(v.checks["fine"], true);
        assert_eq!(v.checks["slow_but_fine"], true);
        assert_eq!(v.checks["hangs"], "timed_out");
        assert_eq!(v.checks["broken"], "failed");
        assert_eq!(v.checks["cache"], "degraded");
        // One after another would take 500 ms or more.
        assert!(took < Duration::from_millis(450), "{took:?}");

        let fine = Readiness::new(timeout)
            .with(Check::new("fine", || async { Ok(()) }))
            .with_report("cache", || Value::from("degraded"));
        let v = fine.evaluate().await;
        assert!(v.ready, "a report never makes it unready: {v:?}");
        assert_eq!(v.status, "ready");

        fine.start_draining();
        let v = fine.evaluate().await;
        assert!(!v.ready);
        assert_eq!(v.status, "shutting_down");
    }
}

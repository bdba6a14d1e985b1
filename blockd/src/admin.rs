//! The admin API: HTTP/JSON on a Unix socket in the data directory (mode 0600), and
//! `/metrics` in Prometheus text. Types and routes are documented in `volmgr::api`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use volmgr::api::{ApiError, CreateVolume, OrphanInfo, ResizeVolume, StatusInfo, VolumeInfo};
use volmgr::{ErrorKind, VolumeManager};

use crate::budget::Budgets;

#[derive(Clone)]
pub struct AdminState {
    pub mgr: Arc<VolumeManager>,
    pub prometheus: PrometheusHandle,
    pub started: Instant,
    pub nbd_tcp: Vec<String>,
    pub nbd_unix: String,
    pub budgets: Arc<Budgets>,
}

struct ApiFailure(StatusCode, String);

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<volmgr::Error> for ApiFailure {
    fn from(e: volmgr::Error) -> Self {
        let status = match e.kind() {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "admin request failed");
        }
        ApiFailure(status, e.to_string())
    }
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/volumes", get(list).post(create))
        .route("/v1/volumes/{name}", get(show).delete(delete))
        .route("/v1/volumes/{name}/resize", post(resize))
        .route("/v1/orphans", get(orphans))
        .route("/v1/orphans/{file}", axum::routing::delete(remove_orphan))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiFailure(
                StatusCode::NOT_FOUND,
                "no such endpoint; see volmgr::api for the routes".into(),
            )
        })
        .with_state(state)
}

async fn status(State(st): State<AdminState>) -> Json<StatusInfo> {
    let volumes = st.mgr.list();
    let unavailable = st.mgr.unavailable_count();
    // Status must answer even when the volumes directory cannot be listed.
    let orphans = st.mgr.orphans().await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot list orphan files");
        Vec::new()
    });
    Json(StatusInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: st.started.elapsed().as_secs(),
        data_dir: st.mgr.data_dir().display().to_string(),
        engine: st.mgr.engine().kind().to_string(),
        nbd_tcp: st.nbd_tcp.clone(),
        nbd_unix: st.nbd_unix.clone(),
        volumes: volumes.len() + unavailable,
        connections: volumes.iter().map(|v| v.connections()).sum(),
        catalog_generation: st.mgr.catalog_generation(),
        unavailable,
        orphans,
        budgets: st.budgets.infos(),
    })
}

async fn list(State(st): State<AdminState>) -> Json<Vec<VolumeInfo>> {
    Json(st.mgr.infos())
}

async fn show(
    State(st): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<VolumeInfo>, ApiFailure> {
    Ok(Json(st.mgr.info_of(&name)?))
}

async fn orphans(State(st): State<AdminState>) -> Result<Json<Vec<OrphanInfo>>, ApiFailure> {
    Ok(Json(st.mgr.orphans().await?))
}

async fn remove_orphan(
    State(st): State<AdminState>,
    Path(file): Path<String>,
) -> Result<StatusCode, ApiFailure> {
    st.mgr.remove_orphan(&file).await?;
    tracing::info!(file = %file, "orphan file removed");
    Ok(StatusCode::NO_CONTENT)
}

async fn create(
    State(st): State<AdminState>,
    body: Result<Json<CreateVolume>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<VolumeInfo>), ApiFailure> {
    let Json(req) = body.map_err(|e| ApiFailure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let cache = match req.cache.as_deref() {
        None => None,
        Some(text) => Some(
            text.parse()
                .map_err(|e: String| ApiFailure(StatusCode::BAD_REQUEST, e))?,
        ),
    };
    let volume = st
        .mgr
        .create(&req.name, req.size_bytes, req.read_only, cache)
        .await?;
    tracing::info!(volume = %req.name, size = req.size_bytes, "volume created");
    Ok((StatusCode::CREATED, Json(VolumeManager::info(&volume))))
}

async fn resize(
    State(st): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<ResizeVolume>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<VolumeInfo>, ApiFailure> {
    let Json(req) = body.map_err(|e| ApiFailure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let volume = st.mgr.resize(&name, req.size_bytes).await?;
    tracing::info!(volume = %name, size = req.size_bytes, "volume resized");
    Ok(Json(VolumeManager::info(&volume)))
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(st): State<AdminState>,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<StatusCode, ApiFailure> {
    st.mgr.delete(&name, q.force).await?;
    tracing::info!(volume = %name, force = q.force, "volume deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn metrics(State(st): State<AdminState>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], {
        st.budgets.publish();
        st.prometheus.render()
    })
}

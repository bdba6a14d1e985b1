//! A minimal admin-API client: HTTP/1.1 over the daemon's Unix socket (hyper), JSON bodies.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach blockd at {path}: {source} (is blockd running? pass --socket DATA_DIR/admin.sock)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin API: {0}")]
    Http(#[from] hyper::Error),
    #[error("admin API: {0}")]
    Build(#[from] hyper::http::Error),
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    #[error("unexpected answer from blockd: {0}")]
    Decode(#[from] serde_json::Error),
}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends one request; returns the status and body, or an `Api` error for non-2xx answers.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "blockd")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        driver.abort();
        if !status.is_success() {
            let message = serde_json::from_slice::<volmgr::api::ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| {
                    format!(
                        "blockd answered {status}: {}",
                        String::from_utf8_lossy(&bytes)
                    )
                });
            return Err(ClientError::Api { status, message });
        }
        Ok((status, bytes))
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (_, body) = self.call(Method::GET, path, None).await?;
        Ok(serde_json::from_slice(&body)?)
    }

    pub async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let (_, bytes) = self
            .call(Method::POST, path, Some(serde_json::to_vec(body)?))
            .await?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

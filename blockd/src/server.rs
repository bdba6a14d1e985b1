//! Wiring: start-up, listeners, connection handling and clean shutdown.
//!
//! Start-up takes an exclusive lock on the data directory, opens the catalog (a corrupt one
//! stops start-up with its reason), creates `--volume`s, and binds the NBD TCP listener(s),
//! the NBD Unix socket (`nbd.sock`) and the admin socket (`admin.sock`, mode 0600).
//!
//! Shutdown on SIGINT/SIGTERM: stop accepting; a client still in the handshake gets
//! `NBD_REP_ERR_SHUTDOWN` to its next option (for [`HANDSHAKE_SHUTDOWN_GRACE`]); sessions
//! finish and answer the requests in flight, answer the ones already received but not started
//! with `ESHUTDOWN`, and close (bounded by [`SHUTDOWN_GRACE`]); then every volume is flushed
//! and the process exits 0.

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusBuilder;
use raid::{DeviceEngine, EnginePreference};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use volmgr::catalog::LocalFileStore;
use volmgr::{ManagerConfig, VolumeManager};

use crate::admin::{self, AdminState};
use crate::budget::{Budgets, HandshakeSlot, RateLimited};
use crate::config::{Config, EngineArg};
use crate::metrics as m;
use crate::nbd::conn;
use crate::nbd::handshake::{self, Admission, Handshake, Outcome, TlsState};
use crate::nbd::limits::{
    HANDSHAKES_MAX, HANDSHAKE_SHUTDOWN_GRACE, HANDSHAKE_TIMEOUT, SHUTDOWN_GRACE,
};
use crate::nbd::socket::{Plain, Socket};
use crate::nbd::tls::{TlsContext, TlsFiles, TlsMode};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Volume(#[from] volmgr::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("engine: {0}")]
    Engine(#[from] raid::engine::EngineError),
    #[error("TLS: {0}")]
    Tls(#[from] crate::nbd::tls::TlsError),
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartupError {
    let context = context.into();
    move |source| StartupError::Io { context, source }
}

/// Runs the daemon until SIGINT/SIGTERM.
pub fn run(config: Config) -> Result<(), StartupError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log))
        .map_err(|e| StartupError::Config(format!("--log {:?}: {e}", config.log)))?;
    // rustls warns about every client that sends an IP address as its TLS server name (qemu
    // and libnbd do): keep its errors only, unless the filter names it.
    let filter = match (
        filter.to_string().contains("rustls"),
        "rustls=error".parse(),
    ) {
        (false, Ok(directive)) => filter.add_directive(directive),
        _ => filter,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("blockd");
    if config.threads > 0 {
        builder.worker_threads(config.threads);
    }
    let runtime = builder
        .build()
        .map_err(io_ctx("cannot start the async runtime"))?;
    runtime.block_on(serve(config))
}

fn lock_data_dir(dir: &Path) -> Result<File, StartupError> {
    // Owner-only whatever the umask (volume files and the catalog live here).
    volmgr::files::ensure_private_dir(dir).map_err(io_ctx(format!(
        "cannot create data directory {}",
        dir.display()
    )))?;
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(volmgr::files::PRIVATE_FILE_MODE)
        .open(&path)
        .map_err(io_ctx(format!("cannot open {}", path.display())))?;
    // flock via std (stable since 1.89): released when the process exits, however it exits.
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartupError::Config(format!(
            "data directory {} is in use by another blockd (lock held on {})",
            dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(io_ctx(format!("cannot lock {}", path.display()))(e))
        }
    }
}

fn bind_unix(path: &Path, group: Option<&str>) -> Result<UnixListener, StartupError> {
    // The data directory lock is held, so a socket file left here is stale.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_ctx(format!("cannot remove stale {}", path.display()))(e)),
    }
    let listener =
        UnixListener::bind(path).map_err(io_ctx(format!("cannot bind {}", path.display())))?;
    let mode = match group {
        None => 0o600,
        Some(name) => {
            let gid = nix::unistd::Group::from_name(name)
                .map_err(|e| StartupError::Config(format!("--socket-group {name:?}: {e}")))?
                .ok_or_else(|| {
                    StartupError::Config(format!("--socket-group {name:?}: no such group"))
                })?
                .gid;
            std::os::unix::fs::chown(path, None, Some(gid.as_raw())).map_err(io_ctx(format!(
                "cannot give {} to group {name}",
                path.display()
            )))?;
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_ctx(format!("cannot chmod {}", path.display())))?;
    Ok(listener)
}

async fn serve(config: Config) -> Result<(), StartupError> {
    let started = Instant::now();
    let data_dir = config.data_dir.clone();
    let _lock = lock_data_dir(&data_dir)?;
    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| StartupError::Config(format!("metrics recorder: {e}")))?;

    let preference = match config.engine {
        EngineArg::Auto => EnginePreference::Auto,
        EngineArg::Uring => EnginePreference::Uring,
        EngineArg::Sync => EnginePreference::Sync,
    };
    let engine = DeviceEngine::start("data", preference)?;
    let default_volume = config
        .default_volume
        .clone()
        .or_else(|| config.file.as_ref().map(|_| config.file_name.clone()));
    let mgr_config = ManagerConfig {
        data_dir: data_dir.clone(),
        default_cache: config.cache.into(),
        default_volume,
    };
    let store = Arc::new(LocalFileStore::new(&data_dir));
    let mgr = Arc::new(VolumeManager::open(mgr_config, store, engine)?);

    for spec in &config.volumes {
        let (name, size) = spec.split_once('=').ok_or_else(|| {
            StartupError::Config(format!(
                "--volume {spec:?}: expected NAME=SIZE, e.g. disk0=10G"
            ))
        })?;
        let size = volmgr::size::parse_size(size)
            .map_err(|e| StartupError::Config(format!("--volume {spec:?}: {e}")))?;
        match mgr.lookup(name).filter(|_| !name.is_empty()) {
            Some(v) if v.size_bytes() != size => {
                tracing::warn!(
                    volume = name,
                    size = v.size_bytes(),
                    requested = size,
                    "volume exists with another size; keeping it as it is"
                )
            }
            Some(_) => {}
            None if mgr.unavailable(name).is_some() => {
                tracing::warn!(volume = name, "volume is unavailable; not re-created")
            }
            None => {
                mgr.create(name, size, false, None).await?;
                tracing::info!(volume = name, size, "volume created");
            }
        }
    }
    if let Some(path) = &config.file {
        mgr.add_file_volume(&config.file_name, path, config.cache.into(), false)?;
    }

    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: config.tls_ca.clone(),
            };
            let mode = config.tls.unwrap_or(TlsMode::Require);
            let ctx = Arc::new(TlsContext::load(files, mode)?);
            tracing::info!(
                ?mode,
                client_certificates = config.tls_ca.is_some(),
                "NBD TLS on"
            );
            Some(ctx)
        }
        _ => None,
    };

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let budgets = Budgets::new(
        config.max_connections,
        Duration::from_secs(config.send_timeout),
    );
    raise_file_limit(config.max_connections);
    let acceptor = Acceptor {
        mgr: Arc::clone(&mgr),
        tls: tls.clone(),
        admission: Admission {
            shutdown: shutdown.clone(),
            budgets: Arc::clone(&budgets),
        },
        tracker: tracker.clone(),
        accept_errors: Arc::new(RateLimited::default()),
    };

    let mut tcp_names = Vec::new();
    if !config.no_tcp {
        for addr in &config.listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(io_ctx(format!("cannot listen on {addr}")))?;
            let local: SocketAddr = listener.local_addr().map_err(io_ctx("local_addr"))?;
            tcp_names.push(local.to_string());
            tracing::info!(%local, "NBD listening on TCP");
            tracker.spawn(accept_tcp(listener, acceptor.clone()));
        }
    }
    let nbd_sock = data_dir.join("nbd.sock");
    let nbd_unix = bind_unix(&nbd_sock, config.socket_group.as_deref())?;
    tracing::info!(path = %nbd_sock.display(), "NBD listening on Unix socket");
    tracker.spawn(accept_unix(nbd_unix, acceptor));

    let admin_sock = data_dir.join("admin.sock");
    let admin_listener = bind_unix(&admin_sock, None)?;
    let state = AdminState {
        mgr: Arc::clone(&mgr),
        prometheus,
        started,
        nbd_tcp: tcp_names,
        nbd_unix: nbd_sock.display().to_string(),
        budgets,
    };
    let admin_stop = shutdown.clone();
    let admin_task = tokio::spawn(async move {
        let server = axum::serve(admin_listener, admin::router(state))
            .with_graceful_shutdown(async move { admin_stop.cancelled().await });
        if let Err(e) = server.await {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    tracing::info!(path = %admin_sock.display(), volumes = mgr.list().len(), engine = %mgr.engine().kind(), "blockd ready");

    wait_for_signal(tls.as_deref()).await;
    tracing::info!("shutting down: finishing in-flight requests");
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions did not finish within {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    let _ = admin_task.await;
    let mut failed = false;
    for (volume, e) in mgr.flush_all().await {
        tracing::error!(%volume, error = %e, "flush at shutdown failed");
        failed = true;
    }
    for path in [&nbd_sock, &admin_sock] {
        let _ = std::fs::remove_file(path);
    }
    if failed {
        return Err(StartupError::Config(
            "flush at shutdown failed; see the log".into(),
        ));
    }
    tracing::info!("stopped");
    Ok(())
}

/// Waits for SIGINT or SIGTERM; on SIGHUP re-reads the TLS certificates meanwhile.
async fn wait_for_signal(tls: Option<&TlsContext>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = hup.recv() => match tls.map(TlsContext::reload) {
                None => tracing::info!("SIGHUP: no TLS configured; nothing to reload"),
                Some(Ok(())) => tracing::info!("SIGHUP: TLS certificates reloaded"),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the previous certificates")
                }
            },
        }
    }
}

/// An accepted connection, before the handshake.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A negotiated connection: what the client chose, and its TLS session if it upgraded.
type Established = (handshake::Negotiated, Option<rustls::ServerConnection>);

impl Accepted {
    async fn negotiate(
        &mut self,
        mgr: &VolumeManager,
        tls: Option<&TlsContext>,
        admission: &Admission,
    ) -> Result<Option<Established>, handshake::HandshakeError> {
        match self {
            Accepted::Tcp(s) => negotiate_on(s, mgr, tls, admission).await,
            Accepted::Unix(s) => negotiate_on(s, mgr, tls, admission).await,
        }
    }

    /// The socket in blocking mode, for the connection thread.
    fn into_blocking(self, tls: Option<rustls::ServerConnection>) -> std::io::Result<Socket> {
        let plain = match self {
            Accepted::Tcp(s) => {
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                Plain::Tcp(s)
            }
            Accepted::Unix(s) => {
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                Plain::Unix(s)
            }
        };
        Ok(match tls {
            None => Socket::plain(plain),
            Some(conn) => Socket::tls(plain, conn),
        })
    }
}

/// The option loop, with the TLS upgrade in the middle when the client asks for it.
async fn negotiate_on<S>(
    s: &mut S,
    mgr: &VolumeManager,
    tls: Option<&TlsContext>,
    admission: &Admission,
) -> Result<Option<Established>, handshake::HandshakeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let state = tls.map_or(TlsState::Off, |t| TlsState::Offered(t.mode()));
    let mut hs = Handshake::greet(s, state, admission).await?;
    match hs.options(s, mgr).await? {
        Outcome::Go(neg) => return Ok(Some((neg, None))),
        Outcome::Aborted => return Ok(None),
        Outcome::StartTls => {}
    }
    let Some(ctx) = tls else {
        return Err(handshake::HandshakeError::Protocol(
            "STARTTLS accepted without TLS".into(),
        ));
    };
    let mut stream = ctx
        .acceptor()
        .accept(&mut *s)
        .await
        .map_err(handshake::HandshakeError::Tls)?;
    m::tls_handshake(true);
    hs.secured();
    match hs.options(&mut stream, mgr).await? {
        Outcome::Go(neg) => {
            let (_, conn) = stream.into_inner();
            Ok(Some((neg, Some(conn))))
        }
        Outcome::Aborted => {
            use tokio::io::AsyncWriteExt;
            let _ = stream.shutdown().await;
            Ok(None)
        }
        Outcome::StartTls => Err(handshake::HandshakeError::Protocol("STARTTLS twice".into())),
    }
}

/// What every accepted connection needs.
#[derive(Clone)]
struct Acceptor {
    mgr: Arc<VolumeManager>,
    tls: Option<Arc<TlsContext>>,
    admission: Admission,
    tracker: TaskTracker,
    accept_errors: Arc<RateLimited>,
}

impl Acceptor {
    /// Starts the connection's handshake, in a handshake slot (evicting the oldest
    /// connection still negotiating when all are taken).
    fn admit(&self, conn: Accepted, peer: String) {
        let slot = self.admission.budgets.handshakes.admit();
        let (mgr, admission, tls) = (
            Arc::clone(&self.mgr),
            self.admission.clone(),
            self.tls.clone(),
        );
        self.tracker
            .spawn(connection(conn, mgr, tls, admission, slot, peer));
    }

    /// After a failed accept (out of file descriptors, say): log at most once a second, and
    /// let the condition pass before trying again.
    async fn backoff(&self, e: std::io::Error) {
        m::accept_failed();
        self.accept_errors
            .log(|n| tracing::warn!(error = %e, failures = n, "accept failed"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Raises the soft limit on open files to the hard limit: each session holds a few
/// descriptors and each connection in the handshake one, beyond the volumes' own.
fn raise_file_limit(max_sessions: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let need = (max_sessions * 4 + HANDSHAKES_MAX + 256) as u64;
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            }
            if hard < need {
                tracing::warn!(
                    hard,
                    need,
                    "the open-file limit is below what the budgets need"
                );
            }
        }
        Ok((soft, _)) if soft < need => {
            tracing::warn!(
                soft,
                need,
                "the open-file limit is below what the budgets need"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

async fn accept_tcp(listener: TcpListener, acc: Acceptor) {
    loop {
        let accepted = tokio::select! {
            _ = acc.admission.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                acc.admit(Accepted::Tcp(stream), peer.to_string());
            }
            Err(e) => acc.backoff(e).await,
        }
    }
}

async fn accept_unix(listener: UnixListener, acc: Acceptor) {
    loop {
        let accepted = tokio::select! {
            _ = acc.admission.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => acc.admit(Accepted::Unix(stream), "unix".into()),
            Err(e) => acc.backoff(e).await,
        }
    }
}

async fn connection(
    mut conn: Accepted,
    mgr: Arc<VolumeManager>,
    tls: Option<Arc<TlsContext>>,
    admission: Admission,
    handshake_slot: HandshakeSlot,
    peer: String,
) {
    let t0 = Instant::now();
    let stop = admission.shutdown.clone();
    // At shutdown the handshake goes on a little, refusing options with ERR_SHUTDOWN.
    let refused = async {
        stop.cancelled().await;
        tokio::time::sleep(HANDSHAKE_SHUTDOWN_GRACE).await
    };
    let negotiated = tokio::select! {
        _ = refused => return,
        // Counted and logged by the budget.
        _ = handshake_slot.evicted().cancelled() => return,
        res = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.negotiate(&mgr, tls.as_deref(), &admission)) => res,
    };
    drop(handshake_slot);
    let (mut neg, session) = match negotiated {
        Ok(Ok(Some(established))) => {
            m::handshake(t0.elapsed(), true);
            established
        }
        Ok(Ok(None)) => {
            m::handshake(t0.elapsed(), true);
            return;
        }
        Ok(Err(handshake::HandshakeError::Tls(e))) => {
            m::handshake(t0.elapsed(), false);
            m::tls_handshake(false);
            tracing::info!(%peer, error = %e, "TLS handshake failed; client refused");
            return;
        }
        Ok(Err(e)) => {
            m::handshake(t0.elapsed(), false);
            tracing::debug!(%peer, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            m::handshake(t0.elapsed(), false);
            tracing::info!(%peer, "handshake timed out after {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let (sock, control) = match conn
        .into_blocking(session)
        .and_then(|s| s.try_clone().map(|c| (s, c)))
    {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot hand the socket to a connection thread");
            return;
        }
    };
    let volume = Arc::clone(&neg.volume);
    let name = volume.name().to_string();
    let _attached = volume.attach();
    let closed = volume.closed();
    tracing::debug!(%peer, volume = %name, structured = neg.structured, extended = neg.extended, "session started");
    m::session_started(match (neg.extended, neg.structured) {
        (true, _) => "extended",
        (false, true) => "structured",
        (false, false) => "simple",
    });
    m::connection_opened(&name);
    let metrics = Arc::new(m::SessionMetrics::new(&name));
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    // Cancelled (before the read side is shut) by shutdown or a force-delete: requests
    // received but not started are then answered ESHUTDOWN.
    let stopping = stop.child_token();
    let budgets = Arc::clone(&admission.budgets);
    // Given back when the session's threads are done.
    let _session_slot = neg.slot.take();
    let thread_stopping = stopping.clone();
    let spawned = std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            let _ = done_tx.send(conn::run(
                sock,
                neg,
                runtime,
                metrics,
                thread_stopping,
                budgets,
            ));
        });
    let end = match spawned {
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot start a connection thread");
            None
        }
        Ok(_) => tokio::select! {
            end = &mut done_rx => end.ok(),
            _ = stop.cancelled() => { control.shutdown_read(); done_rx.await.ok() }
            _ = closed.cancelled() => { stopping.cancel(); control.shutdown_read(); done_rx.await.ok() }
        },
    };
    m::connection_closed(&name);
    match end {
        Some(conn::End::Framing(e)) => {
            tracing::info!(%peer, volume = %name, error = %e, "session ended on a framing error")
        }
        other => tracing::debug!(%peer, volume = %name, end = ?other, "session ended"),
    }
}

//! Listeners: the proxy (HTTP/1.1 and HTTP/2, optionally TLS), the admin endpoints
//! (`/healthz`, `/readyz`, `/metrics`, and the admin API under `/v1/`: [`admin_api`]), the
//! optional demo store, graceful shutdown, and hot reload of the config ([`reload`]: SIGHUP
//! and a polled config file; each request runs on one snapshot of the state).

pub mod admin_api;
mod conn_timer;
mod limits;
mod linger;
mod readiness;
pub mod reload;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use linger::Lingering;
use tokio::net::TcpListener;
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::audit::AuditLog;
use crate::config::{Config, RouteKind};
use crate::keys::keyring::Keyring;
use crate::keys::{KeyService, RootKeyProvider};

use crate::metrics::Metrics;
use crate::pipeline::{self, AppState, ClientInfo, ProxyBody, UpstreamClient, full_body};

/// A started proxy: its bound addresses and a handle to stop it.
pub struct Running {
    /// The TCP listener's address (`None`: `[server] listen` omitted, the unix socket only).
    pub addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub demo_store_addr: Option<SocketAddr>,
    /// The unix socket served beside `addr` (`[server] unix_socket`).
    pub unix_socket: Option<std::path::PathBuf>,
    /// The state requests are served with, swapped on reload.
    live: Arc<reload::Live>,
    /// Set when shutting down: `/readyz` answers 503 from then on.
    draining: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// The state new requests are served with now.
    pub fn state(&self) -> Arc<AppState> {
        self.live.load()
    }

    /// Reload the config file now, as SIGHUP does (see [`reload`]).
    pub async fn reload(&self) -> Result<bool, String> {
        self.live.reload(reload::Trigger::Signal).await
    }

    /// Stop accepting, let in-flight requests finish (up to `[server] drain_timeout`; those
    /// still running then are cut), and return.
    pub async fn stop(self) {
        self.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        // Each listener drains for at most `drain_timeout`, then cuts what is left.
        let bound = self.live.load().config.server.drain_timeout + Duration::from_secs(5);
        for t in self.tasks {
            let _ = tokio::time::timeout(bound, t).await;
        }
    }

    /// The graceful shutdown of SIGTERM: `/readyz` fails at once (load balancers and
    /// Kubernetes endpoints stop sending new requests), `[server] shutdown_delay` passes while
    /// requests are still served, then [`Running::stop`].
    pub async fn shutdown(self) {
        self.draining.store(true, Ordering::Relaxed);
        let state = self.live.load();
        let delay = state.config.server.shutdown_delay;
        let drain = state.config.server.drain_timeout;
        drop(state);
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            drain_timeout_ms = drain.as_millis() as u64,
            "shutting down: /readyz fails from now; still serving until the delay has passed, then finishing in-flight requests"
        );
        tokio::time::sleep(delay).await;
        tracing::info!("shutdown: no longer accepting; draining in-flight requests");
        self.stop().await;
    }
}

/// Open the keyring, build the state and bind every listener.
pub async fn start(config: Config) -> Result<Running, String> {
    Builder::new(config).start().await
}

/// A server with root-key providers of the program embedding envelope-proxy, beside the
/// config: each serves the `[backend.NAME]` with `kind = "embedded"` whose name is the
/// provider's `name()` (examples/custom_provider.rs).
///
/// ```no_run
/// # async fn run(config: envelope_proxy::config::Config,
/// #              mine: std::sync::Arc<dyn envelope_proxy::keys::RootKeyProvider>) -> Result<(), String> {
/// let running = envelope_proxy::server::Builder::new(config).provider(mine).start().await?;
/// # running.stop().await; Ok(()) }
/// ```
pub struct Builder {
    config: Config,
    providers: Vec<Arc<dyn RootKeyProvider>>,
    file: Option<(PathBuf, [u8; 32])>,
}

impl Builder {
    pub fn new(config: Config) -> Builder {
        Builder {
            config,
            providers: Vec::new(),
            file: None,
        }
    }

    /// A server whose config comes from `path`: it reloads on SIGHUP and when the file's
    /// content changes (see [`reload`]).
    pub fn from_file(path: &Path) -> Result<Builder, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let hash = reload::hash_of(&bytes);
        let text =
            String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8", path.display()))?;
        let config = crate::config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Builder {
            config,
            providers: Vec::new(),
            file: Some((path.to_path_buf(), hash)),
        })
    }

    /// Add a root-key provider (a provider the config names no embedded backend for is an
    /// error at start, as is an embedded backend without a provider).
    pub fn provider(mut self, provider: Arc<dyn RootKeyProvider>) -> Builder {
        self.providers.push(provider);
        self
    }

    /// Open the keyring, connect the backends, build the state and bind every listener.
    pub async fn start(self) -> Result<Running, String> {
        start_with(self.config, &self.providers, self.file).await
    }
}

async fn start_with(
    config: Config,
    providers: &[Arc<dyn RootKeyProvider>],
    file: Option<(PathBuf, [u8; 32])>,
) -> Result<Running, String> {
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let metrics = Arc::new(Metrics::new());
    let keyring = crate::keys::open_keyring(&config)?;
    if let Some(keyring) = &keyring {
        keyring.report_to(metrics.clone());
        keyring.watch(Duration::from_secs(1));
    }
    let tls = match &config.server.tls {
        Some((cert, key)) => {
            let tls = tls::Tls::load(cert, key, config.server.client_ca_file.as_deref())?;
            tls.watch(Duration::from_secs(1));
            Some(tls)
        }
        None => None,
    };
    let (path, hash) = match file {
        Some((p, h)) => (Some(p), Some(h)),
        None => (None, None),
    };
    let base = reload::Base {
        keyring: keyring.clone(),
        metrics,
        providers: providers.to_vec(),
        tls: tls.clone(),
        path,
    };
    let state = build_state(config, &base, None).await?;
    let live = Arc::new(reload::Live::new(state, base, hash));
    let state = live.load();
    let config = &state.config;

    let limits = Arc::new(limits::Limits::new(
        config.server.limits,
        "data",
        state.metrics.clone(),
    ));
    // The admin listener has its own connection budget: a flood of the data port must not
    // take the probes and metrics down with it.
    let admin_limits = Arc::new(limits::Limits::new(
        crate::config::ListenerLimits {
            max_connections: 256,
            max_requests: 256,
            ..config.server.limits
        },
        "admin",
        state.metrics.clone(),
    ));
    let draining = Arc::new(AtomicBool::new(false));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let demo_store_addr = match config.demo_store {
        Some(addr) => {
            let listener = bind(addr).await?;
            let bound = listener.local_addr().map_err(|e| e.to_string())?;
            let store = crate::devstore::Store::default();
            tasks.push(tokio::spawn(crate::devstore::serve(
                listener,
                store,
                shutdown_rx.clone(),
            )));
            tracing::info!(%bound, "demo store listening (in-memory, for trying the proxy out)");
            Some(bound)
        }
        None => None,
    };

    let listener = match config.server.listen {
        Some(a) => {
            let l = bind(a).await?;
            let bound = l.local_addr().map_err(|e| e.to_string())?;
            Some((l, bound))
        }
        None => None,
    };
    let addr = listener.as_ref().map(|(_, bound)| *bound);
    let admin = match &config.admin {
        Some(a) => Some((a.listen, admin_token(a)?, a.api_auth)),
        None => None,
    };
    // The admin API with client certificates: the admin listener speaks TLS with the
    // listener's certificate and client CAs (reloaded with them).
    let admin_tls = match admin.as_ref().and_then(|a| a.2) {
        Some(crate::config::RouteAuth::Mtls) => tls.clone(),
        _ => None,
    };

    // Quotas forget idle principals once a minute (memory stays bounded by active callers).
    let weak = Arc::downgrade(&live);
    let mut stop = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            match weak.upgrade() {
                Some(l) => l.load().quotas.shrink(),
                None => break,
            }
        }
    }));
    // The config file is polled for changes (see `reload`).
    if live.base.path.is_some() {
        tokio::spawn(live.clone().poll(shutdown_rx.clone()));
    }

    // Readiness is probed in the background; `/readyz` reads the result (see `readiness`).
    let readiness = Arc::new(readiness::Readiness::default());
    readiness.probe(&state).await;
    tokio::spawn(
        readiness
            .clone()
            .run(Arc::downgrade(&live), shutdown_rx.clone()),
    );

    let admin_addr = match admin {
        Some((a, token, api_auth)) => {
            let l = bind(a).await?;
            let bound = l.local_addr().map_err(|e| e.to_string())?;
            // Config validation refuses the admin API without a keyring.
            let api = match (api_auth, &keyring) {
                (Some(auth), Some(keyring)) => Some(Arc::new(admin_api::AdminApi {
                    live: live.clone(),
                    keyring: keyring.clone(),
                    auth,
                })),
                _ => None,
            };
            tasks.push(tokio::spawn(serve_admin(
                l,
                live.clone(),
                Admin {
                    token,
                    api,
                    tls: admin_tls,
                    limits: admin_limits,
                    draining: draining.clone(),
                    readiness,
                },
                shutdown_rx.clone(),
            )));
            Some(bound)
        }
        None => None,
    };

    let unix_socket = match &config.server.unix_socket {
        Some(path) => {
            let (l, file) = bind_unix(path, config.server.unix_socket_mode).await?;
            tasks.push(tokio::spawn(accept_unix(
                l,
                path.clone(),
                file,
                live.clone(),
                limits.clone(),
                shutdown_rx.clone(),
            )));
            tracing::info!(path = %path.display(), "envelope-proxy listening on a unix socket");
            Some(path.clone())
        }
        None => None,
    };
    if let Some((listener, bound)) = listener {
        tasks.push(tokio::spawn(accept_loop(
            listener,
            live.clone(),
            tls,
            limits,
            shutdown_rx,
        )));
        tracing::info!(addr = %bound, "envelope-proxy listening");
    }
    Ok(Running {
        addr,
        admin_addr,
        demo_store_addr,
        unix_socket,
        live,
        draining,
        shutdown,
        tasks,
    })
}

/// Build the state requests are served with from `config`: at start, and for each reload
/// (`prior`: the state it replaces, whose data-key cache, grants and audit writer are kept
/// when their settings did not change). Everything is checked here, so a state that builds
/// can serve: backends connected, every route key present, gateways, authenticators and
/// secrets loaded.
async fn build_state(
    config: Config,
    base: &reload::Base,
    prior: Option<&AppState>,
) -> Result<AppState, String> {
    fn same<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }
    let keyring = base.keyring.as_ref();
    // The data-key cache and the backends' circuit state stay when nothing about them changed.
    let keys = match prior {
        Some(p)
            if same(&p.config.backends, &config.backends)
                && same(&p.config.cache, &config.cache) =>
        {
            p.keys.clone()
        }
        _ => {
            let backends =
                crate::keys::connect_backends_beside(&config, &base.providers, keyring).await?;
            KeyService::new(backends, config.cache.clone(), base.metrics.clone())
        }
    };
    // Key vaults (format v2) by label: new routes' vaults are added, existing ones replaced.
    crate::keys::vault::register_all(&keys, &config)?;
    check_route_keys(&config, keyring.map(|k| &**k), &keys).await?;
    let grants = match prior {
        Some(p) if same(&p.config.access.grants, &config.access.grants) => {
            p.policies.grants().clone()
        }
        _ => {
            let grants = Arc::new(
                crate::policy::Grants::for_proxy(&config.access.grants, keyring.map(|k| &**k))
                    .map_err(|e| format!("grants: {e}"))?,
            );
            grants.watch(config.access.grants.reload);
            grants
        }
    };
    let policies = Arc::new(crate::policy::Policies::new(
        &config.access.key_policies,
        grants,
    ));
    let audit = match (prior, &config.audit_path) {
        // The same file: the running writer goes on (its chain is in memory).
        (Some(p), Some(path)) if p.config.audit_path.as_deref() == Some(path.as_path()) => {
            p.audit.clone()
        }
        (_, Some(p)) => AuditLog::to_file(
            p,
            crate::audit::key_of(&config, keyring.map(|k| &**k))?,
            config.audit_checkpoint_every,
        )
        .map_err(|e| format!("audit log: {e}"))?,
        (_, None) => AuditLog::to_tracing(),
    };
    let upstream = UpstreamClient::new(&config.server)?;
    let mut gateways = std::collections::HashMap::new();
    for route in &config.routes {
        if let RouteKind::S3(cfg) = &route.kind {
            let gw = crate::s3::gateway::Gateway::build(cfg)
                .map_err(|e| format!("route {:?}: {e}", route.name))?;
            gateways.insert(route.name.clone(), gw);
        }
    }
    let authenticators = crate::auth::Authenticators::build(&config.access.auth).await?;
    let mask_key = match &config.access.masking.hash_key {
        Some(s) => Some(crate::transform::mask::MaskKey::new(
            crate::secret::read_secret(s)
                .map_err(|e| format!("masking.hash_key_file: {e}"))?
                .as_bytes(),
        )),
        None => None,
    };
    let quotas = crate::pipeline::quota::Quotas::new(&config.routes);
    Ok(AppState {
        quotas,
        mask_key,
        policies,
        authenticators,
        gateways,
        config,
        keys,
        upstream,
        audit,
        metrics: base.metrics.clone(),
    })
}

/// Every key a route names must exist before the proxy takes traffic: missing local keys are
/// created only with `create_missing_keys`; remote keys are looked up (a backend that is down
/// at start is a warning, not a failure: it may come back, and `/readyz` says so meanwhile).
async fn check_route_keys(
    config: &Config,
    keyring: Option<&Keyring>,
    keys: &KeyService,
) -> Result<(), String> {
    for route in &config.routes {
        for k in route.kind.keys() {
            if k.backend == crate::keys::KeyRef::DEFAULT_BACKEND {
                let (Some(keyring), Some(settings)) = (keyring, &config.keyring) else {
                    return Err(format!(
                        "route {:?} uses the local key {:?}, and there is no [keyring]",
                        route.name, k.key_id
                    ));
                };
                // An alias names the key it points to (`keys alias create`).
                let name = keyring.resolve(&k.key_id);
                if keyring.list().iter().any(|s| s.name == name) {
                    continue;
                }
                if k.key_id.starts_with("alias/") {
                    return Err(format!(
                        "route {:?} uses {:?}, which is no alias in the keyring: run `envelope-proxy keys alias create {} KEY`",
                        route.name, k.key_id, k.key_id
                    ));
                }
                if !settings.create_missing_keys {
                    return Err(format!(
                        "route {:?} uses root key {:?}, which is not in the keyring: run `envelope-proxy keys create {}`",
                        route.name, k.key_id, k.key_id
                    ));
                }
                keyring.create_key(&k.key_id).map_err(|e| e.to_string())?;
                tracing::warn!(key = %k.key_id, "created missing root key (keyring.create_missing_keys = true)");
                continue;
            }
            let Ok(backend) = keys.backend(&k.backend) else {
                return Err(format!(
                    "route {:?}: no backend {:?}",
                    route.name, k.backend
                ));
            };
            match backend.describe_key(&k.key_id).await {
                Ok(d) if d.enabled => {}
                Ok(_) => return Err(format!("route {:?}: root key {k} is disabled", route.name)),
                Err(e) if e.retryable() => {
                    tracing::warn!(key = %k, error = %e, "key backend unreachable at start; requests needing it get 503 until it is back")
                }
                Err(e) => return Err(format!("route {:?}: root key {k}: {e}", route.name)),
            }
        }
    }
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// Run until SIGINT/SIGTERM, then shut down gracefully.
pub async fn run(config: Config) -> Result<(), String> {
    let running = start(config).await?;
    wait_for_signal(&running).await;
    running.shutdown().await;
    Ok(())
}

/// [`run`] with the config from `path`, reloaded on SIGHUP and when the file changes.
pub async fn run_file(path: &Path) -> Result<(), String> {
    let running = Builder::from_file(path)?.start().await?;
    wait_for_signal(&running).await;
    running.shutdown().await;
    Ok(())
}

/// Wait for SIGTERM or SIGINT. SIGHUP does not end the process (its default action): it
/// reloads the config and reopens the audit file (see [`reload`]).
async fn wait_for_signal(running: &Running) {
    use tokio::signal::unix::{SignalKind, signal};
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
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config and reopening the audit file");
                // A refusal is logged, counted and shown by /readyz; the old config serves on.
                let _ = running.live.reload(reload::Trigger::Signal).await;
            }
        }
    }
}

/// The drain of one listener: in-flight requests get `deadline` to finish; the connections
/// still open then are cut (their tasks in `conns` aborted), which drops their requests: an
/// upload being streamed upstream is aborted mid-body, so the store never completes the
/// object.
async fn drain(
    graceful: hyper_util::server::graceful::GracefulShutdown,
    deadline: Duration,
    mut conns: tokio::task::JoinSet<()>,
) {
    if tokio::time::timeout(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            deadline_ms = deadline.as_millis() as u64,
            "drain deadline passed: cutting the requests still in flight"
        );
        conns.abort_all();
        // Wait until the cut connections' tasks have run their drop.
        while conns.join_next().await.is_some() {}
    }
}

/// Serve one connection until it ends (or its task is aborted at the drain deadline);
/// `_slot` (its place under `max_connections`) is given back when it ends. Nothing else is
/// polled beside the connection: this runs on every wake-up of every request.
async fn serve_connection<E: std::fmt::Display>(
    conn: impl Future<Output = Result<(), E>>,
    _slot: limits::Slot,
) {
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Spawn a connection's task in `conns`, first taking the tasks that have ended out of it.
fn spawn_connection(
    conns: &mut tokio::task::JoinSet<()>,
    task: impl Future<Output = ()> + Send + 'static,
) {
    while conns.try_join_next().is_some() {}
    conns.spawn(task);
}

async fn accept_loop(
    listener: TcpListener,
    live: Arc<reload::Live>,
    tls: Option<Arc<tls::Tls>>,
    limits: Arc<limits::Limits>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Some(slot) = limits.connection() else {
            // Over `max_connections`: closed at once (see `limits`).
            tracing::debug!(%peer, "connection refused: max_connections reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let builder = limits.builder();
        match &tls {
            None => {
                let client = ClientInfo {
                    addr: peer,
                    tls: false,
                    peer_certs: None,
                    unix: false,
                };
                let service = proxy_service(live.clone(), client, limits.clone());
                let conn = builder
                    .serve_connection(TokioIo::new(Lingering::new(stream)), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                spawn_connection(&mut conns, serve_connection(conn, slot));
            }
            Some(tls) => {
                // The config current now: a reload while this handshake runs applies to the next.
                let acceptor = tls.acceptor();
                let watcher = graceful.watcher();
                let st = live.clone();
                let limits = limits.clone();
                spawn_connection(&mut conns, async move {
                    let stream = match tokio::time::timeout(
                        limits.settings.header_read_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            // A client certificate that does not verify ends here.
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let client = client_info(peer, &stream);
                    let service = proxy_service(st, client, limits);
                    let conn = builder
                        .serve_connection(TokioIo::new(Lingering::new(stream)), service)
                        .into_owned();
                    serve_connection(watcher.watch(conn), slot).await;
                });
            }
        }
    }
    let deadline = live.load().config.server.drain_timeout;
    drain(graceful, deadline, conns).await;
}

/// The caller of a TLS connection: its address and the client certificate chain the
/// handshake verified (rustls reports peer certificates only after verifying them).
pub fn client_info<IO>(
    addr: SocketAddr,
    stream: &tokio_rustls::server::TlsStream<IO>,
) -> ClientInfo {
    let peer_certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .filter(|c| !c.is_empty())
        .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
    ClientInfo {
        addr,
        tls: true,
        peer_certs,
        unix: false,
    }
}

/// The unix socket's file as bound: its device and inode, so that stopping removes it only
/// while the path still names it (not a socket another process has put there since).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketFile {
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn of(m: &std::fs::Metadata) -> SocketFile {
        use std::os::unix::fs::MetadataExt;
        SocketFile {
            dev: m.dev(),
            ino: m.ino(),
        }
    }

    fn remove_if_ours(self, path: &std::path::Path) {
        if std::fs::symlink_metadata(path).is_ok_and(|m| SocketFile::of(&m) == self) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Bind the unix socket at `path` with permissions `mode`.
///
/// - A socket nobody serves any more (a crashed process's: connecting is refused) is replaced;
///   one that answers belongs to a running process and is left alone (start fails); anything
///   else at the path (a file, a directory, a symbolic link) is never removed (start fails).
/// - The socket is bound in a fresh private directory (0700) beside the path, given `mode`
///   there, then hard-linked into place: nobody can connect while it still has the umask's
///   permissions, and the link fails rather than replaces if something appeared at the path
///   meanwhile. The private directory goes whatever happens.
async fn bind_unix(
    path: &std::path::Path,
    mode: u32,
) -> Result<(tokio::net::UnixListener, SocketFile), String> {
    use std::io::ErrorKind;
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            let probe = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::UnixStream::connect(path),
            )
            .await;
            match probe {
                Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)
                        .map_err(|e| format!("{shown}: cannot replace the stale socket: {e}"))?;
                }
                Ok(Ok(_)) => {
                    return Err(format!(
                        "{shown}: in use by a running process (another proxy?); refusing to take it over"
                    ));
                }
                Ok(Err(e)) => {
                    return Err(format!(
                        "{shown}: cannot tell whether the socket there is in use ({e}); refusing to replace it"
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "{shown}: the socket there does not answer in time; refusing to replace it"
                    ));
                }
            }
        }
        Ok(_) => {
            return Err(format!(
                "{shown}: exists and is not a socket; refusing to replace it"
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{shown}: {e}")),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let mut name = [0u8; 3];
    getrandom::fill(&mut name).map_err(|e| format!("{shown}: no randomness: {e}"))?;
    let private = parent.join(format!(".{}", hex::encode(name)));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| format!("cannot listen on {shown}: {}: {e}", private.display()))?;
    let bound = private.join("s");
    let result = (|| {
        let listener = tokio::net::UnixListener::bind(&bound)
            .map_err(|e| format!("cannot listen on {shown}: {e}"))?;
        std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{shown}: cannot set its mode: {e}"))?;
        std::fs::hard_link(&bound, path).map_err(|e| match e.kind() {
            ErrorKind::AlreadyExists => {
                format!("{shown}: appeared while the proxy was starting; refusing to replace it")
            }
            _ => format!("cannot listen on {shown}: {e}"),
        })?;
        let file = std::fs::symlink_metadata(path)
            .map(|m| SocketFile::of(&m))
            .map_err(|e| format!("{shown}: {e}"))?;
        Ok((listener, file))
    })();
    let _ = std::fs::remove_file(&bound);
    let _ = std::fs::remove_dir(&private);
    result
}

/// The unix-socket listener: the same service, every caller labelled `unix` (trusted as a
/// local process: `trusted-header` believes its header; its audit lines say `unix`). Stopping
/// removes the socket file (if the path still names it) before waiting for in-flight requests.
async fn accept_unix(
    listener: tokio::net::UnixListener,
    path: std::path::PathBuf,
    file: SocketFile,
    live: Arc<reload::Live>,
    limits: Arc<limits::Limits>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "unix accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Some(slot) = limits.connection() else {
            tracing::debug!("unix connection refused: max_connections reached");
            continue;
        };
        // `addr` is a placeholder that nothing reads when `unix` is set (see `ClientInfo`).
        let client = ClientInfo {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: false,
            peer_certs: None,
            unix: true,
        };
        let service = proxy_service(live.clone(), client, limits.clone());
        let conn = limits
            .builder()
            .serve_connection(TokioIo::new(Lingering::new(stream)), service)
            .into_owned();
        let conn = graceful.watch(conn);
        spawn_connection(&mut conns, serve_connection(conn, slot));
    }
    drop(listener);
    file.remove_if_ours(&path);
    let deadline = live.load().config.server.drain_timeout;
    drain(graceful, deadline, conns).await;
}

fn proxy_service(
    live: Arc<reload::Live>,
    client: ClientInfo,
    limits: Arc<limits::Limits>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send,
> + Clone {
    service_fn(move |req: Request<Incoming>| {
        // The request's one snapshot of the state: it finishes on it, whatever reloads meanwhile.
        let st = live.load();
        let client = client.clone();
        // Shed before any work when `max_requests` are in flight (see `limits`).
        let slot = limits.request();
        async move {
            let Some(_slot) = slot else {
                return Ok::<_, Infallible>(limits::overloaded(
                    &st.config.routes,
                    req.uri().path(),
                ));
            };
            Ok::<_, Infallible>(pipeline::handle(st, req, client).await)
        }
    })
}

/// The admin bearer token, read once at start through the one secret reader (0600 check).
fn admin_token(a: &crate::config::AdminSettings) -> Result<Option<Arc<Zeroizing<String>>>, String> {
    let Some(source) = &a.token else {
        return Ok(None);
    };
    let token = crate::secret::read_secret(source).map_err(|e| format!("admin.token_file: {e}"))?;
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "admin.token_file: the token must be at least 16 printable characters \
             without spaces (e.g. `openssl rand -hex 32`)"
                .into(),
        );
    }
    Ok(Some(Arc::new(token)))
}

/// Whether `req` carries `Authorization: Bearer <token>` (compared in constant time).
fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|given| bool::from(given.ct_eq(token.as_bytes())))
}

/// What the admin listener serves with.
struct Admin {
    token: Option<Arc<Zeroizing<String>>>,
    api: Option<Arc<admin_api::AdminApi>>,
    tls: Option<Arc<tls::Tls>>,
    limits: Arc<limits::Limits>,
    /// Shutting down: `/readyz` answers 503.
    draining: Arc<AtomicBool>,
    readiness: Arc<readiness::Readiness>,
}

async fn serve_admin(
    listener: TcpListener,
    live: Arc<reload::Live>,
    admin_cfg: Admin,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
            _ = shutdown.changed() => break,
        };
        let Some(slot) = admin_cfg.limits.connection() else {
            drop(stream);
            continue;
        };
        let live = live.clone();
        let token = admin_cfg.token.clone();
        let api = admin_cfg.api.clone();
        let tls = admin_cfg.tls.clone();
        let tls_on = tls.is_some();
        let limits = admin_cfg.limits.clone();
        let draining = admin_cfg.draining.clone();
        let readiness = admin_cfg.readiness.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let serve = |certs, io| {
                let peer = crate::auth::Peer {
                    addr,
                    certs,
                    unix: false,
                };
                let service = service_fn(move |req: Request<Incoming>| {
                    let live = live.clone();
                    let token = token.clone();
                    let api = api.clone();
                    let peer = peer.clone();
                    let draining = draining.load(Ordering::Relaxed);
                    let readiness = readiness.clone();
                    async move {
                        let (mut parts, body) = req.into_parts();
                        let pending = admin_access(&live, &mut parts, &peer, tls_on);
                        let req = Request::from_parts(parts, body);
                        let resp = if req.uri().path().starts_with("/v1/") {
                            match &api {
                                Some(api) => admin_api::serve(api, req, peer).await,
                                None => admin_api_off(),
                            }
                        } else {
                            // Without a token configured, the listener is on loopback (config checks).
                            let authorized = token.as_ref().is_none_or(|t| authorized(&req, t));
                            admin(&live, req, authorized, draining, &readiness).await
                        };
                        let note = pipeline::access::AccessNote::default();
                        Ok::<_, Infallible>(pipeline::access::Logged::wrap(resp, pending, note))
                    }
                });
                limits.http1_builder().serve_connection(io, service)
            };
            match tls {
                None => {
                    let _ = serve(None, TokioIo::new(Box::new(stream) as Box<dyn AdminIo>)).await;
                }
                Some(tls) => {
                    let acceptor = tls.acceptor();
                    let Ok(Ok(stream)) = tokio::time::timeout(
                        limits.settings.header_read_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    else {
                        return;
                    };
                    let certs = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
                    let _ = serve(certs, TokioIo::new(Box::new(stream) as Box<dyn AdminIo>)).await;
                }
            }
        });
    }
}

/// The access line of an admin request (see `pipeline::access`): its ids settled on `parts`.
fn admin_access(
    live: &reload::Live,
    parts: &mut http::request::Parts,
    peer: &crate::auth::Peer,
    tls: bool,
) -> pipeline::access::Pending {
    let ids = pipeline::access::ids(&mut parts.headers);
    let bytes = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    pipeline::access::Pending {
        state: live.load(),
        ids,
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        client: ClientInfo {
            addr: peer.addr,
            tls,
            peer_certs: peer.certs.clone(),
            unix: false,
        },
        started: std::time::Instant::now(),
        request: Arc::new(pipeline::access::Progress {
            bytes: std::sync::atomic::AtomicU64::new(bytes),
            finished: std::sync::atomic::AtomicBool::new(true),
        }),
        admin: true,
    }
}

/// A connection of the admin listener, plain or TLS.
trait AdminIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> AdminIo for T {}

fn admin_api_off() -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": { "code": "admin_api_off",
        "message": "the admin API is off; set [admin] auth to \"jwt\" or \"mtls\"" } });
    let mut resp = Response::new(full_body(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The admin endpoints. `/healthz` is open (liveness says nothing); `/readyz` answers its
/// status to anyone (probes need no token) but names backends and problems only to an
/// authorized caller; `/metrics` needs authorization (401 without it).
async fn admin(
    live: &reload::Live,
    req: Request<Incoming>,
    authorized: bool,
    draining: bool,
    readiness: &readiness::Readiness,
) -> Response<ProxyBody> {
    let state = live.load();
    let (status, ctype, body) = match req.uri().path() {
        // Shutting down: not ready at once, whatever the backends say.
        "/readyz" if draining => (
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            r#"{"ready":false,"draining":true}"#.to_string(),
        ),
        "/healthz" => (
            StatusCode::OK,
            "application/json",
            r#"{"status":"ok"}"#.to_string(),
        ),
        // The background probe's last result: no backend call here.
        "/readyz" => {
            let snapshot = readiness.snapshot();
            let mut problems = snapshot.problems.clone();
            let mut backends = serde_json::Map::new();
            for (name, health) in state.keys.backend_health() {
                let h = match health {
                    crate::keys::resilience::Health::Up => "up",
                    crate::keys::resilience::Health::Down => "down",
                    crate::keys::resilience::Health::Recovering => "recovering",
                };
                if h == "down" {
                    problems.push(format!("backend {name} is down"));
                }
                backends.insert(name, h.into());
            }
            let ready = readiness.ready(&state);
            let reload = live.status();
            if let Some(e) = &reload.last_error {
                problems.push(format!(
                    "config reload refused (the previous config serves): {e}"
                ));
            }
            let body = if authorized {
                serde_json::json!({ "ready": ready, "backends": backends, "problems": problems,
                    "keys": snapshot.keys, "usable_keys": snapshot.usable,
                    "probes": readiness.rounds(),
                    "config_reload": { "applied": reload.applied, "refused": reload.refused,
                        "last_failed": reload.last_error.is_some(), "error": reload.last_error } })
            } else {
                serde_json::json!({ "ready": ready })
            };
            (
                if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                "application/json",
                body.to_string(),
            )
        }
        "/metrics" if !authorized => (
            StatusCode::UNAUTHORIZED,
            "application/json",
            r#"{"error":"unauthorized: send Authorization: Bearer <admin token>"}"#.to_string(),
        ),
        "/metrics" => {
            // Circuit states change with time alone (open → half-open): read them now.
            for (name, health) in state.keys.backend_health() {
                let code = match health {
                    crate::keys::resilience::Health::Up => 0,
                    crate::keys::resilience::Health::Down => 1,
                    crate::keys::resilience::Health::Recovering => 2,
                };
                state.metrics.circuit_state(&name, code);
            }
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.encode(),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"error":"not found"}"#.to_string(),
        ),
    };
    let mut resp = Response::new(full_body(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

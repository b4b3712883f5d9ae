//! The consumer-facing listener: the worker threads, each running a single-threaded tokio runtime, and the accept
//! loop that hands each connection to the one with the fewest (so that a connection and its exchanges stay on one
//! thread); the connection limit, TLS handshake with its timeout, the peer identity
//! read once per connection, HTTP/1.1 and HTTP/2 (by ALPN), the idle rule (which also bounds a slow request head), a
//! graceful drain on shutdown, and the staged close of every connection ssp ends (RFC 9112 section 9.6). Knows
//! nothing of request contents: each request goes to [`Proxy::handle`].
//!
//! The idle rule: a connection with no request in flight (from the end of the handshake, and from the end of each
//! response) is shut down once it has been idle for `server.header_read_timeout` (HTTP/1.1, or before the protocol
//! is known) or `server.http2_idle_timeout` (HTTP/2: GOAWAY, then close), whatever it sends or does not send.

//!
//! - `connection`: one accepted connection: PROXY header, handshake, serving, and how it ends.
//! - `idle_rule`: the idle rule's bookkeeping: requests in flight and since when there have been none.
//! - `close`: the staged close of a connection ssp ends (RFC 9112 section 9.6).
//! - `hangup`: a consumer that closes its HTTP/1.1 connection while a request is handled.
//! - `proxy_protocol`: the PROXY protocol header (v1 and v2) a trusted layer-4 balancer sends first.

mod close;
mod connection;
mod hangup;
mod idle_rule;
mod proxy_protocol;

use close::CLOSE_GRACE;
use connection::Connection;
use idle_rule::IdleTimeouts;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::proxy::{Door, Proxy};

/// A bound consumer listener, ready to run on its workers.
pub(crate) struct Server {
    /// The listening socket, bound; the accept loop registers it on the runtime that runs it.
    listener: std::net::TcpListener,
    shared: Arc<Listening>,
    /// The patient-facing listener, when there is one: its own socket and TLS, the same workers, connection
    /// limit and drain.
    patient_facing: Option<(std::net::TcpListener, Arc<Listening>)>,
    /// Worker threads, each running a single-threaded runtime (`server.workers`).
    workers: usize,
    /// Serve on the runtime that calls [`Server::run`] instead, as one worker (tests that drive tokio's clock).
    on_caller_runtime: bool,
    /// True while the listener accepts connections (`/readyz` reads it).
    serving: Arc<AtomicBool>,
}

/// What every worker shares: the connection limit and counter, and what a connection needs to be served.
struct Listening {
    /// Read once per accepted connection, so a reload applies to every new handshake.
    tls: ServerTls,
    /// Which listener this is.
    door: Door,
    proxy: Arc<Proxy>,
    http: auto::Builder<TokioExecutor>,
    handshake_timeout: Duration,
    /// The idle rule's bounds: HTTP/1.1 (and before the protocol is known), HTTP/2.
    idle: IdleTimeouts,
    /// Balancers whose connections start with a PROXY protocol header (`server.proxy_protocol_from`).
    proxy_protocol_from: Arc<[ipnet::IpNet]>,
    /// Bounds concurrent connections across all workers; when exhausted, the accept loop waits and further
    /// connections wait in the kernel's backlog.
    connections: Arc<Semaphore>,
    /// Shared by both listeners: a connection id names one connection of the process.
    next_conn_id: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

/// Where a listener's TLS config comes from.
enum ServerTls {
    Clinical(Arc<crate::tls::Reloadable>),
    PatientFacing(Arc<crate::patient_facing::Front>),
}

impl ServerTls {
    fn config(&self) -> Arc<rustls::ServerConfig> {
        match self {
            ServerTls::Clinical(tls) => tls.server(),
            ServerTls::PatientFacing(front) => front.server_tls(),
        }
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("workers", &self.workers)
            .field("handshake_timeout", &self.shared.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// hyper's bound on a request head's fields for ssp's `limits.max_header_count`: 100 while that is below 100, so
/// that hyper parses heads into arrays on the stack (it allocates them per request past 100: `hyper::proto::h1::
/// role`, `DEFAULT_MAX_HEADERS`), and twice it for a larger limit, which then costs those allocations.
fn hyper_max_headers(max_header_count: usize) -> usize {
    const HYPER_STACK_HEADERS: usize = 100;
    if max_header_count < HYPER_STACK_HEADERS {
        HYPER_STACK_HEADERS
    } else {
        max_header_count * 2
    }
}

impl Server {
    /// Binds the listener, whose connections' requests go to `proxy`; `serving` is set while it accepts. Fails
    /// only on the socket.
    pub(crate) async fn bind(
        cfg: &ServerConfig,
        limits: &crate::config::LimitsConfig,
        tls: Arc<crate::tls::Reloadable>,
        proxy: Arc<Proxy>,
        metrics: Arc<Metrics>,
        serving: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        // Bound here, registered with each worker's reactor there (non-blocking, as tokio leaves it).
        let listener = TcpListener::bind(cfg.listen).await?.into_std()?;
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            // hyper's timeouts do nothing (or panic) without a timer.
            .timer(TokioTimer::new())
            // No header-read timer per request: the idle rule (`idle_rule`) already cuts a connection whose head
            // has not arrived `header_read_timeout` after its last response, whatever it sends, and hyper's would
            // set a timer on the worker's wheel for every request.
            .header_read_timeout(None)
            // No read-ahead while a request is handled: `hangup` notices a consumer that goes away instead.
            .half_close(true)
            .keep_alive(true)
            // hyper's own limits sit above ours, so that a request just over ours reaches the proxy and gets a
            // documented 431 with its audit records; beyond hyper's, hyper answers a bare 431 and closes.
            .max_headers(hyper_max_headers(limits.max_header_count))
            // At most the limit plus room for the request line and separators: with the default limit this stays
            // under the 128 KiB after which some clients (curl) stop sending a head and wait, which would leave
            // them waiting for header_read_timeout instead of getting their 431.
            .max_buf_size((limits.max_header_bytes + 16 * 1024).max(8192));
        http.http2().timer(TokioTimer::new()).max_header_list_size(
            u32::try_from(limits.max_header_bytes * 2 + 16 * 1024).unwrap_or(u32::MAX),
        );
        Ok(Self {
            listener,
            shared: Arc::new(Listening {
                tls: ServerTls::Clinical(tls),
                door: Door::Clinical,
                proxy,
                http,
                handshake_timeout: cfg.handshake_timeout,
                idle: IdleTimeouts {
                    http1: cfg.header_read_timeout,
                    http2: cfg.http2_idle_timeout,
                },
                proxy_protocol_from: Arc::from(cfg.proxy_protocol_from.as_slice()),
                connections: Arc::new(Semaphore::new(cfg.max_connections)),
                next_conn_id: Arc::new(AtomicU64::new(1)),
                metrics,
            }),
            patient_facing: None,
            workers: cfg.workers.max(1),
            on_caller_runtime: false,
            serving,
        })
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Binds the patient-facing listener at `front`'s address: its connections are served by the same workers,
    /// under its own connection limit (`patient_facing.max_connections`), with `front`'s TLS config, and their requests go to the same proxy
    /// marked [`Door::PatientFacing`]. Fails only on the socket.
    pub(crate) async fn bind_patient_facing(
        &mut self,
        front: Arc<crate::patient_facing::Front>,
    ) -> io::Result<()> {
        let listener = TcpListener::bind(front.config().listen).await?.into_std()?;
        let connections = Arc::new(Semaphore::new(front.config().max_connections));
        let clinical = &self.shared;
        let shared = Listening {
            tls: ServerTls::PatientFacing(front),
            door: Door::PatientFacing,
            proxy: Arc::clone(&clinical.proxy),
            http: clinical.http.clone(),
            handshake_timeout: clinical.handshake_timeout,
            idle: clinical.idle,
            // Apps reach it over the internet through the platform in front, not through ssp's balancer.
            proxy_protocol_from: Arc::from(Vec::new()),
            // Its own bound: connections that need no certificate cannot take the clinical door's places.
            connections,
            next_conn_id: Arc::clone(&clinical.next_conn_id),
            metrics: Arc::clone(&clinical.metrics),
        };
        self.patient_facing = Some((listener, Arc::new(shared)));
        Ok(())
    }

    /// The patient-facing listener's address, when there is one.
    pub(crate) fn patient_facing_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.patient_facing.as_ref().map(|(l, _)| l.local_addr())
    }

    /// Serves on the runtime that calls [`Server::run`], as a single worker, instead of on worker threads: for
    /// tests that pause and advance tokio's clock, which is per runtime.
    pub(crate) fn on_caller_runtime(&mut self) {
        self.on_caller_runtime = true;
    }

    /// Serves until `shutdown` completes, then stops accepting and lets open exchanges finish for up to `grace`.
    ///
    /// The accept loop runs here; each accepted connection is handed to the worker with the fewest open
    /// connections. A worker is a thread running a single-threaded tokio runtime, and a connection handed to it
    /// (its handshake, its requests, their provider exchanges) stays on that thread to the end. Fails only when a
    /// worker cannot be started.
    pub(crate) async fn run(
        self,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) -> io::Result<()> {
        // Every connection holds a receiver of what it is asked to do, and the sender's `closed()` resolves when
        // the last connection has gone.
        let (stop, stop_rx) = watch::channel(Stop::Serve);
        // Ends the workers' runtimes once their connections are done (or the last grace is over).
        let (exit, exit_rx) = watch::channel(false);
        let mut threads = Vec::new();
        let mut workers = Vec::new();
        if !self.on_caller_runtime {
            for n in 0..self.workers {
                let (handoff, mut accepted) = mpsc::unbounded_channel::<Accepted>();
                let mut exit_rx = exit_rx.clone();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let thread = std::thread::Builder::new()
                    .name(format!("ssp-worker-{n}"))
                    .spawn(move || {
                        runtime.block_on(async move {
                            while let Some(conn) = accepted.recv().await {
                                match TcpStream::from_std(conn.tcp) {
                                    Ok(tcp) => {
                                        tokio::spawn(conn.shared.serve(
                                            tcp,
                                            conn.remote,
                                            conn.guard,
                                            conn.stop,
                                        ));
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "accepted connection lost")
                                    }
                                }
                            }
                            // The listener has stopped. The connections run on this runtime until it says they are
                            // done (or its `run` is gone); dropping the runtime then drops whatever is left.
                            let _ = exit_rx.wait_for(|exit| *exit).await;
                        });
                    })?;
                threads.push(thread);
                workers.push(Worker {
                    handoff,
                    load: Arc::default(),
                });
            }
        }
        drop(exit_rx);
        let listener = TcpListener::from_std(self.listener)?;
        let patient_facing = match self.patient_facing {
            Some((listener, shared)) => Some((TcpListener::from_std(listener)?, shared)),
            None => None,
        };
        self.serving.store(true, Ordering::Release);
        // Both listeners stop accepting together.
        let (stopping, stopped) = watch::channel(false);
        let stop_accepting = |mut stopped: watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        tokio::join!(
            accept_loop(
                &self.shared,
                &listener,
                &workers,
                stop_rx.clone(),
                stop_accepting(stopped.clone()),
            ),
            async {
                if let Some((listener, shared)) = &patient_facing {
                    accept_loop(
                        shared,
                        listener,
                        &workers,
                        stop_rx.clone(),
                        stop_accepting(stopped.clone()),
                    )
                    .await;
                }
            },
            async {
                shutdown.await;
                let _ = stopping.send(true);
            },
        );
        drop(stop_rx);
        // Closed at once, so that a balancer's next connection is refused instead of waiting in a backlog.
        drop(listener);
        drop(patient_facing);
        drop(workers);
        // Draining: a load balancer polling /readyz takes this instance out of rotation.
        self.serving.store(false, Ordering::Release);
        tracing::info!("listener closed; draining open connections");
        let _ = stop.send(Stop::Drain);
        if tokio::time::timeout(grace, stop.closed()).await.is_err() {
            tracing::warn!(
                grace_s = grace.as_secs(),
                "grace period over; closing remaining connections"
            );
            // Dropping an exchange ends it (`client_closed`) and queues its response record, so the records are
            // queued before the caller closes the audit log rather than lost with the runtime.
            let _ = stop.send(Stop::Drop);
            if tokio::time::timeout(CLOSE_GRACE, stop.closed())
                .await
                .is_err()
            {
                tracing::warn!("connections still in their handshake at shutdown");
            }
        }
        let _ = exit.send(true);
        if !threads.is_empty() {
            let joined = tokio::task::spawn_blocking(move || {
                threads.into_iter().all(|thread| thread.join().is_ok())
            })
            .await;
            if !matches!(joined, Ok(true)) {
                tracing::error!("a worker thread panicked");
            }
        }
        Ok(())
    }
}

/// A worker thread as the accept loop sees it.
struct Worker {
    handoff: mpsc::UnboundedSender<Accepted>,
    /// Its open connections (counted from the handoff to the end of the connection's staged close).
    load: Arc<AtomicUsize>,
}

/// An accepted connection on its way to a worker.
struct Accepted {
    /// The listener that accepted it.
    shared: Arc<Listening>,
    tcp: std::net::TcpStream,
    remote: SocketAddr,
    guard: ConnGuard,
    stop: watch::Receiver<Stop>,
}

/// Takes a place under `server.max_connections`, then a connection, and hands it to the least-loaded worker (or,
/// with none, serves it on this runtime), until `shutdown` completes.
async fn accept_loop(
    shared: &Arc<Listening>,
    listener: &TcpListener,
    workers: &[Worker],
    stop: watch::Receiver<Stop>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let metrics = &shared.metrics;
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&shared.connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        metrics.connections_total.inc();
        let mut guard = ConnGuard {
            _permit: permit,
            _active: ActiveConnection::new(Arc::clone(metrics)),
            _load: None,
        };
        let Some(worker) = workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
        else {
            tokio::spawn(Arc::clone(shared).serve(tcp, remote, guard, stop.clone()));
            continue;
        };
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "accepted connection lost");
                continue;
            }
        };
        guard._load = Some(WorkerLoad::new(Arc::clone(&worker.load)));
        let accepted = Accepted {
            shared: Arc::clone(shared),
            tcp,
            remote,
            guard,
            stop: stop.clone(),
        };
        if worker.handoff.send(accepted).is_err() {
            tracing::error!("a worker thread has stopped");
        }
    }
}

impl Listening {
    /// Serves one accepted connection to its end.
    async fn serve(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        guard: ConnGuard,
        stop: watch::Receiver<Stop>,
    ) {
        let conn = Connection {
            id: self.next_conn_id.fetch_add(1, Ordering::Relaxed),
            acceptor: TlsAcceptor::from(self.tls.config()),
            proxy: Arc::clone(&self.proxy),
            metrics: Arc::clone(&self.metrics),
            http: self.http.clone(),
            handshake_timeout: self.handshake_timeout,
            idle: self.idle,
            proxy_protocol_from: Arc::clone(&self.proxy_protocol_from),
            door: self.door,
        };
        conn.serve(tcp, remote, guard, stop).await;
    }
}

/// What the listener asks of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    Serve,
    /// Finish the exchanges in flight, take no new requests, then close (HTTP/2: GOAWAY).
    Drain,
    /// The grace period is over: drop the connection and whatever is in flight on it.
    Drop,
}

/// What a consumer connection holds for as long as it is open, including its staged close: its place under
/// `server.max_connections` and its count in `ssp_connections_active`.
#[derive(Debug)]
pub(super) struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    _active: ActiveConnection,
    /// Its count in its worker's load, when it was handed to one.
    _load: Option<WorkerLoad>,
}

/// Counts a connection in its worker's load for as long as it lives.
#[derive(Debug)]
pub(super) struct WorkerLoad(Arc<AtomicUsize>);

impl WorkerLoad {
    fn new(load: Arc<AtomicUsize>) -> Self {
        load.fetch_add(1, Ordering::Relaxed);
        Self(load)
    }
}

impl Drop for WorkerLoad {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a consumer connection in `ssp_connections_active` for as long as it lives.
#[derive(Debug)]
pub(super) struct ActiveConnection(Arc<crate::metrics::Metrics>);

impl ActiveConnection {
    pub(super) fn new(metrics: Arc<crate::metrics::Metrics>) -> Self {
        metrics.connections_active.inc();
        Self(metrics)
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.connections_active.dec();
    }
}

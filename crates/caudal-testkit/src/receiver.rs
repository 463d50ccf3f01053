//! A real HTTP server on loopback that records what sinks send to it and
//! answers the way a test tells it to.
//!
//! The [`Receiver`] listens on `127.0.0.1` on a port the kernel picks. Every
//! request is recorded (method, path, headers, raw and decoded body, JSON,
//! arrival time, the status answered) before the reply is sent, so a test can
//! wait for what it expects with [`Receiver::wait_for`] and then assert.
//!
//! Replies come from a [`Behaviour`] that can be changed while the receiver
//! runs, preceded by any one-shot replies queued with
//! [`Receiver::fail_next`] or [`Receiver::queue_replies`]. [`Receiver::stop`]
//! closes the port and every open connection, so clients get "connection
//! refused" as from a crashed receiver; [`Receiver::restart`] listens on the
//! same port again with the recorded requests kept.
//!
//! The server is a plain HTTP/1.1 accept loop on hyper rather than
//! `axum::serve`, because stopping must kill open connections at once and a
//! [`Reply::reset`] must drop exactly one connection; graceful shutdown would
//! let them finish.

mod behaviour;
mod request;

pub use behaviour::{Behaviour, Reply};
pub use request::ReceivedRequest;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// How long [`Receiver::restart`] keeps trying to bind its old port.
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP server on `127.0.0.1` that records every request and answers as
/// told. See the [module docs](self).
///
/// Dropping the receiver stops the server.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::sync::Mutex<Option<Running>>,
}

/// State shared between the handle and the connection tasks; it outlives
/// stop/restart cycles.
struct Shared {
    requests: Mutex<Vec<ReceivedRequest>>,
    /// Bumped on every change to `requests`, to wake [`Receiver::wait_for`].
    changes: watch::Sender<u64>,
    rules: Mutex<Rules>,
}

struct Rules {
    behaviour: Behaviour,
    queued: VecDeque<Reply>,
}

/// A running accept loop.
struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Receiver {
    /// Starts a receiver on `127.0.0.1` on a free port, answering `200 OK`
    /// to everything.
    ///
    /// # Panics
    ///
    /// When no loopback port can be bound, or when called outside a Tokio
    /// runtime.
    pub async fn start() -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap_or_else(|err| panic!("caudal-testkit: cannot bind 127.0.0.1:0: {err}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|err| panic!("caudal-testkit: no local address: {err}"));
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            changes: watch::Sender::new(0),
            rules: Mutex::new(Rules {
                behaviour: Behaviour::default(),
                queued: VecDeque::new(),
            }),
        });
        let running = Running::spawn(listener, Arc::clone(&shared));
        Self {
            addr,
            shared,
            server: tokio::sync::Mutex::new(Some(running)),
        }
    }

    /// The address the receiver listens on (also while stopped: it comes back
    /// on the same one).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path>`; a `/` is put in front of `path` when it
    /// has none.
    pub fn url(&self, path: &str) -> String {
        let slash = if path.starts_with('/') { "" } else { "/" };
        format!("http://{}{slash}{path}", self.addr)
    }

    /// A copy of every request recorded so far, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// How many requests have been recorded so far.
    pub fn request_count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Forgets the recorded requests (behaviour and queued replies stay).
    pub fn clear(&self) {
        lock(&self.shared.requests).clear();
        self.shared.changes.send_modify(|n| *n += 1);
    }

    /// The records of every recorded request, in order, as
    /// [`ReceivedRequest::records_at`] finds them under `pointer` (`"/requests"`
    /// for a body `{"requests": [...]}`, `""` for a body that is an array or
    /// newline-delimited JSON).
    ///
    /// This includes requests that were answered with an error; see
    /// [`accepted_records_at`](Self::accepted_records_at) for the records the
    /// client was told were stored.
    pub fn records_at(&self, pointer: &str) -> Vec<Value> {
        lock(&self.shared.requests)
            .iter()
            .flat_map(|r| r.records_at(pointer))
            .collect()
    }

    /// Like [`records_at`](Self::records_at), but only from requests answered
    /// with a 2xx status.
    ///
    /// A request is recorded when it arrives, so a request answered 2xx after a
    /// [`Reply::delay`] that the client gave up on still counts here, as it
    /// would at a real receiver.
    pub fn accepted_records_at(&self, pointer: &str) -> Vec<Value> {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.accepted())
            .flat_map(|r| r.records_at(pointer))
            .collect()
    }

    /// Waits until `done` returns true for the recorded requests, or until
    /// `timeout` has passed; returns whether `done` became true.
    ///
    /// `done` is called once at the start and again after each new request
    /// (no polling). It runs while the request list is locked, so it must not
    /// call the receiver.
    pub async fn wait_for(
        &self,
        mut done: impl FnMut(&[ReceivedRequest]) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.changes.subscribe();
        loop {
            changes.borrow_and_update();
            if done(&lock(&self.shared.requests)) {
                return true;
            }
            // The sender lives in `self.shared`, so `changed` never fails here.
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return done(&lock(&self.shared.requests));
            }
        }
    }

    /// Waits until at least `count` requests have arrived, or `timeout` has
    /// passed; returns whether they did.
    pub async fn wait_for_requests(&self, count: usize, timeout: Duration) -> bool {
        self.wait_for(|reqs| reqs.len() >= count, timeout).await
    }

    /// Waits until at least `count` records under `pointer` have been
    /// accepted (answered 2xx), or `timeout` has passed; returns whether they
    /// were.
    pub async fn wait_for_accepted_records(
        &self,
        pointer: &str,
        count: usize,
        timeout: Duration,
    ) -> bool {
        self.wait_for(
            |reqs| {
                reqs.iter()
                    .filter(|r| r.accepted())
                    .map(|r| r.records_at(pointer).len())
                    .sum::<usize>()
                    >= count
            },
            timeout,
        )
        .await
    }

    /// From now on, answer every request with `status` and an empty body.
    pub fn set_status(&self, status: u16) {
        self.set_behaviour(Reply::status(status));
    }

    /// From now on, answer every request with `reply`.
    pub fn set_reply(&self, reply: Reply) {
        self.set_behaviour(reply);
    }

    /// From now on, let `behaviour` decide the replies (after any queued
    /// one-shot replies are used up).
    pub fn set_behaviour(&self, behaviour: impl Into<Behaviour>) {
        lock(&self.shared.rules).behaviour = behaviour.into();
    }

    /// Answer the next `count` requests with `status`, then go back to the
    /// behaviour.
    pub fn fail_next(&self, count: usize, status: u16) {
        self.queue_replies(std::iter::repeat_n(Reply::status(status), count));
    }

    /// Answer the next requests with `replies`, one each, in order, then go
    /// back to the behaviour. Adds to replies queued earlier.
    pub fn queue_replies(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.shared.rules).queued.extend(replies);
    }

    /// Stops listening and closes every open connection, so clients get
    /// "connection refused" (or a dropped connection mid-request) until
    /// [`restart`](Self::restart). Returns once the port is closed. Does
    /// nothing when already stopped.
    pub async fn stop(&self) {
        let running = self.server.lock().await.take();
        if let Some(running) = running {
            running.shutdown.cancel();
            // The task only ends by returning; a panic in it would be a bug
            // in this crate, and stopping is still done then.
            let _ = running.task.await;
        }
    }

    /// Listens again on the same address after [`stop`](Self::stop), keeping
    /// the recorded requests, the behaviour and queued replies. Does nothing
    /// when already running.
    ///
    /// # Panics
    ///
    /// When the port cannot be bound again within 10 seconds (another process
    /// took it).
    pub async fn restart(&self) {
        let mut server = self.server.lock().await;
        if server.is_some() {
            return;
        }
        let listener = bind_again(self.addr).await;
        *server = Some(Running::spawn(listener, Arc::clone(&self.shared)));
    }

    /// Whether the receiver is listening (not [`stop`](Self::stop)ped).
    pub async fn is_running(&self) -> bool {
        self.server.lock().await.is_some()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(running) = self.server.get_mut() {
            running.shutdown.cancel();
        }
    }
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("addr", &self.addr)
            .field("requests", &self.request_count())
            .field("behaviour", &lock(&self.shared.rules).behaviour)
            .finish_non_exhaustive()
    }
}

impl Running {
    fn spawn(listener: TcpListener, shared: Arc<Shared>) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, shared, shutdown.clone()));
        Self { shutdown, task }
    }
}

impl Shared {
    fn decide(&self, request: &ReceivedRequest) -> Reply {
        let mut rules = lock(&self.rules);
        match rules.queued.pop_front() {
            Some(reply) => reply,
            None => rules.behaviour.reply_for(request),
        }
    }

    fn record(&self, request: ReceivedRequest) {
        lock(&self.requests).push(request);
        self.changes.send_modify(|n| *n += 1);
    }
}

/// Accepts connections until `shutdown`, then closes the listener and kills
/// every connection before returning.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&shared)));
                }
                // Out of file descriptors and the like: back off, keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Serves one connection until the client closes it or a [`Reply::reset`]
/// asks for it to be dropped.
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let reset = CancellationToken::new();
    let service = {
        let reset = reset.clone();
        service_fn(move |request| handle(Arc::clone(&shared), reset.clone(), request))
    };
    // hyper's default 30 s header timeout would also close idle keep-alive
    // connections, racing a client's next request on its pooled connection:
    // a spurious failure no test asked for. Clients decide when to hang up.
    let connection = http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = connection => {}
        () = reset.cancelled() => {}
    }
}

async fn handle(
    shared: Arc<Shared>,
    reset: CancellationToken,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let received_at = Instant::now();
    let (parts, body) = request.into_parts();
    let Ok(raw_body) = axum::body::to_bytes(Body::new(body), usize::MAX).await else {
        // The client went away mid-body; nobody reads this answer.
        return Ok(plain_response(StatusCode::BAD_REQUEST));
    };
    let mut received = ReceivedRequest::new(
        parts.method,
        parts.uri.path().to_owned(),
        parts.uri.query().map(str::to_owned),
        parts.headers,
        raw_body,
        received_at,
    );
    let reply = shared.decide(&received);
    received.status = reply.answered_status();
    shared.record(received);

    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    if reply.reset {
        reset.cancel();
        // `serve_connection` drops this future together with the connection.
        std::future::pending::<()>().await;
    }
    Ok(build_response(reply))
}

fn build_response(reply: Reply) -> Response<Body> {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut builder = Response::builder().status(status);
    for (name, value) in &reply.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder
        .body(Body::from(reply.body))
        .unwrap_or_else(|_| plain_response(StatusCode::INTERNAL_SERVER_ERROR))
}

fn plain_response(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}

/// Binds `addr` again, retrying while the old socket is still being torn
/// down.
async fn bind_again(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + REBIND_TIMEOUT;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(err) if Instant::now() >= deadline => {
                panic!("caudal-testkit: receiver cannot listen on {addr} again: {err}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Locks `mutex`, ignoring poisoning: a test that panicked while holding it
/// must not turn every later assertion into a poison error.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

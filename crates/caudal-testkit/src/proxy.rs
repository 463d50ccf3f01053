//! A TCP proxy on loopback in front of a real server (a broker, a
//! database), that a test can cut: [`Proxy::cut`] closes every connection
//! through it at once (a lost connection mid-batch, as the client sees
//! it), [`Proxy::pause`] refuses new ones until [`Proxy::resume`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy forwarding connections (on loopback, unless started with
/// [`Proxy::start_on`]) to `upstream`.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    refusing: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `upstream` (`host:port`) on a free loopback port.
    pub async fn start(upstream: &str) -> Self {
        Self::start_on("127.0.0.1", upstream).await
    }

    /// Starts a proxy to `upstream` on a free port of address `ip` (for
    /// example the host's end of a veth pair, for a process in a network
    /// namespace).
    pub async fn start_on(ip: &str, upstream: &str) -> Self {
        let listener = TcpListener::bind((ip, 0))
            .await
            .unwrap_or_else(|e| panic!("bind a port on {ip} for the proxy: {e}"));
        let addr = listener.local_addr().expect("proxy address");
        let (cut, cuts) = watch::channel(0u64);
        let refusing = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.to_string();
        let task = {
            let refusing = refusing.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    if refusing.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let upstream = upstream.clone();
                    let mut cuts = cuts.clone();
                    cuts.borrow_and_update();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let (mut client, mut server) = (client, server);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cuts.changed() => {}
                        }
                        // Dropping both ends closes them.
                    });
                }
            })
        };
        Self {
            addr,
            cut,
            refusing,
            accepted,
            task,
        }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes every connection open through the proxy now.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Refuses new connections (those open stay) until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.refusing.store(true, Ordering::SeqCst);
    }

    /// Accepts new connections again.
    pub fn resume(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

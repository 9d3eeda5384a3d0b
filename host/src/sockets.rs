//! Outbound SMTP connections for the component: TCP, upgraded in place to TLS
//! (rustls) when the component asks. This module also implements the
//! `smtp-socket` import. The component decides when to use TLS and whether
//! the certificate must verify; the host only carries it out.
//!
//! Sockets are non-blocking: `connect` only starts connecting, `send` queues
//! bytes, `try-receive` reads what is there, and `wait` sleeps in poll(2)
//! over every socket of the call, finishing connects and writing queued
//! bytes meanwhile. One component call (one thread) thus holds as many
//! sessions as it has destinations; only the TLS handshake blocks.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use wasmtime::component::Resource;

use crate::runtime::HostState;
use crate::runtime::bindings::mailroot::relay::smtp_socket::{self, SocketError, TlsVerification};

/// Most bytes one `try-receive` hands to the component.
const MAX_RECEIVE: usize = 64 * 1024;
/// Most connections one component call may hold open at once: its
/// destinations (the scheduler gives a call at most 64), and the sessions
/// each keeps for reuse.
pub const MAX_OPEN_CONNECTIONS: usize = 256;
/// Where Debian's `ca-certificates` puts the system trust store.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Milliseconds since the first call, on the monotonic clock.
pub fn monotonic_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let elapsed = ORIGIN.get_or_init(Instant::now).elapsed();
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

/// The component's handle on a connection: a token into [`Sockets`].
pub struct Connection {
    token: u64,
}

/// Where a connection stands.
enum Phase {
    Connecting {
        deadline: Instant,
    },
    Open,
    /// Every later call reports this error.
    Failed(SocketError),
}

/// One outbound socket.
struct Socket {
    tcp: TcpStream,
    tls: Option<Box<ClientConnection>>,
    phase: Phase,
    /// Plain-text bytes not yet written (with TLS, rustls buffers them).
    outgoing: Vec<u8>,
    written: usize,
    /// When the queued bytes must all be written.
    send_deadline: Option<Instant>,
    /// The last `try_receive` found nothing: `wait` watches this socket.
    watched: bool,
    peer: SocketAddr,
}

fn timeout(ms: u32) -> Option<Duration> {
    Some(Duration::from_millis(u64::from(ms.max(1))))
}

fn after(ms: u32) -> Instant {
    Instant::now() + Duration::from_millis(u64::from(ms))
}

fn socket_error(e: io::Error) -> SocketError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => SocketError::TimedOut,
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable => SocketError::Refused(e.to_string()),
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => SocketError::Closed,
        _ => SocketError::Io(e.to_string()),
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EINPROGRESS)
}

impl Socket {
    /// Start connecting to `peer`. Nagle's algorithm is off: SMTP sends
    /// small commands and waits for each reply.
    fn connect(peer: SocketAddr, timeout_ms: u32) -> Result<Self, SocketError> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(peer),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(socket_error)?;
        socket.set_nonblocking(true).map_err(socket_error)?;
        socket.set_tcp_nodelay(true).map_err(socket_error)?;
        let phase = match socket.connect(&peer.into()) {
            Ok(()) => Phase::Open,
            Err(e) if would_block(&e) => Phase::Connecting {
                deadline: after(timeout_ms),
            },
            Err(e) => return Err(socket_error(e)),
        };
        Ok(Socket {
            tcp: socket.into(),
            tls: None,
            phase,
            outgoing: Vec::new(),
            written: 0,
            send_deadline: None,
            watched: false,
            peer,
        })
    }

    fn fail(&mut self, error: SocketError) -> SocketError {
        self.phase = Phase::Failed(error.clone());
        error
    }

    fn failure(&self) -> Option<SocketError> {
        match &self.phase {
            Phase::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }

    fn has_output(&self) -> bool {
        match &self.tls {
            Some(tls) => tls.wants_write(),
            None => self.written < self.outgoing.len(),
        }
    }

    /// The connect finished (poll said writable, or failed): open or failed.
    fn finish_connect(&mut self) {
        if !matches!(self.phase, Phase::Connecting { .. }) {
            return;
        }
        self.phase = match self.tcp.take_error() {
            Ok(None) => match self.tcp.peer_addr() {
                Ok(_) => Phase::Open,
                Err(e) => Phase::Failed(SocketError::Refused(e.to_string())),
            },
            Ok(Some(e)) | Err(e) => Phase::Failed(SocketError::Refused(e.to_string())),
        };
    }

    /// Fail what is overdue: a connect, or queued bytes the peer did not take.
    fn check_deadlines(&mut self, now: Instant) {
        let overdue = match &self.phase {
            Phase::Connecting { deadline } => *deadline <= now,
            Phase::Open => self.has_output() && self.send_deadline.is_some_and(|d| d <= now),
            Phase::Failed(_) => false,
        };
        if overdue {
            self.fail(SocketError::TimedOut);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Connecting { deadline } => Some(*deadline),
            Phase::Open if self.has_output() => self.send_deadline,
            _ => None,
        }
    }

    /// Write what the socket takes now.
    fn flush(&mut self) -> Result<(), SocketError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        if !matches!(self.phase, Phase::Open) {
            return Ok(());
        }
        let result = match &mut self.tls {
            Some(tls) => loop {
                if !tls.wants_write() {
                    break Ok(());
                }
                match tls.write_tls(&mut self.tcp) {
                    Ok(_) => {}
                    Err(e) if would_block(&e) => break Ok(()),
                    Err(e) => break Err(socket_error(e)),
                }
            },
            None => loop {
                let rest = self.outgoing.get(self.written..).unwrap_or_default();
                if rest.is_empty() {
                    self.outgoing.clear();
                    self.written = 0;
                    break Ok(());
                }
                match self.tcp.write(rest) {
                    Ok(0) => break Err(SocketError::Closed),
                    Ok(n) => self.written += n,
                    Err(e) if would_block(&e) => break Ok(()),
                    Err(e) => break Err(socket_error(e)),
                }
            },
        };
        match result {
            Ok(()) => {
                if !self.has_output() {
                    self.send_deadline = None;
                }
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn send(&mut self, data: &[u8], timeout_ms: u32) -> Result<(), SocketError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        match &mut self.tls {
            Some(tls) => {
                if let Err(e) = tls.writer().write_all(data) {
                    return Err(self.fail(socket_error(e)));
                }
            }
            None => self.outgoing.extend_from_slice(data),
        }
        self.send_deadline = Some(after(timeout_ms));
        self.flush()
    }

    /// What has arrived, or `None` (and the socket is watched).
    fn try_receive(&mut self, buffer: &mut [u8]) -> Result<Option<Vec<u8>>, SocketError> {
        self.watched = false;
        if matches!(self.phase, Phase::Connecting { .. }) && poll_one(&self.tcp, libc::POLLOUT) {
            self.finish_connect();
        }
        self.check_deadlines(Instant::now());
        self.flush()?;
        if matches!(self.phase, Phase::Connecting { .. }) {
            self.watched = true;
            return Ok(None);
        }
        let read = match &mut self.tls {
            None => match self.tcp.read(buffer) {
                Ok(0) => Err(SocketError::Closed),
                Ok(n) => Ok(Some(n)),
                Err(e) if would_block(&e) => Ok(None),
                Err(e) => Err(socket_error(e)),
            },
            Some(tls) => read_tls(tls, &mut self.tcp, buffer),
        };
        match read {
            Ok(Some(n)) => {
                // Reading TLS records may have queued an answer (an alert, a
                // key update): send it along.
                self.flush()?;
                Ok(Some(buffer.get(..n).unwrap_or_default().to_vec()))
            }
            Ok(None) => {
                self.flush()?;
                self.watched = true;
                Ok(None)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Run the TLS handshake, blocking within `timeout_ms`.
    fn start_tls(
        &mut self,
        server_name: &str,
        config: Arc<ClientConfig>,
        timeout_ms: u32,
    ) -> Result<(), SocketError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        if self.tls.is_some() || !matches!(self.phase, Phase::Open) {
            return Err(SocketError::Tls(
                "the connection is not an open plain TCP connection".into(),
            ));
        }
        let name =
            ServerName::try_from(server_name.trim_end_matches('.').to_string()).map_err(|e| {
                SocketError::Tls(format!("{server_name:?} is not a valid server name: {e}"))
            })?;
        let result = self.handshake(name, config, timeout_ms);
        let restored = self.tcp.set_nonblocking(true).map_err(socket_error);
        match result.and_then(|tls| restored.map(|()| tls)) {
            Ok(tls) => {
                self.tls = Some(Box::new(tls));
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn handshake(
        &mut self,
        name: ServerName<'static>,
        config: Arc<ClientConfig>,
        timeout_ms: u32,
    ) -> Result<ClientConnection, SocketError> {
        self.tcp.set_nonblocking(false).map_err(socket_error)?;
        self.tcp
            .set_read_timeout(timeout(timeout_ms))
            .map_err(socket_error)?;
        self.tcp
            .set_write_timeout(timeout(timeout_ms))
            .map_err(socket_error)?;
        // STARTTLS was answered, so nothing is queued; write it out if it is.
        let rest = self.outgoing.get(self.written..).unwrap_or_default();
        self.tcp.write_all(rest).map_err(socket_error)?;
        self.outgoing.clear();
        self.written = 0;
        let mut tls =
            ClientConnection::new(config, name).map_err(|e| SocketError::Tls(e.to_string()))?;
        // The component queues whole messages at once; the host bounds them.
        tls.set_buffer_limit(None);
        while tls.is_handshaking() {
            tls.complete_io(&mut self.tcp)
                .map_err(|e| match socket_error(e) {
                    SocketError::Io(why) => SocketError::Tls(why),
                    other => other,
                })?;
        }
        Ok(tls)
    }
}

/// Read decrypted bytes: `Ok(None)` when a whole record has not arrived yet.
fn read_tls(
    tls: &mut ClientConnection,
    tcp: &mut TcpStream,
    buffer: &mut [u8],
) -> Result<Option<usize>, SocketError> {
    loop {
        match tls.reader().read(buffer) {
            // close_notify: the peer ended the session.
            Ok(0) => return Err(SocketError::Closed),
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(socket_error(e)),
        }
        match tls.read_tls(tcp) {
            Ok(0) => return Err(SocketError::Closed),
            Ok(_) => {
                tls.process_new_packets()
                    .map_err(|e| SocketError::Tls(e.to_string()))?;
            }
            Err(e) if would_block(&e) => return Ok(None),
            Err(e) => return Err(socket_error(e)),
        }
    }
}

/// Whether `tcp` has any of `events` now (a zero-timeout poll).
fn poll_one(tcp: &TcpStream, events: libc::c_short) -> bool {
    let mut fd = libc::pollfd {
        fd: tcp.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents != 0
}

/// The sockets of one component call, by token.
#[derive(Default)]
pub struct Sockets {
    open: HashMap<u64, Socket>,
    next_token: u64,
    buffer: Vec<u8>,
}

impl Sockets {
    fn socket(&mut self, token: u64) -> Result<&mut Socket, SocketError> {
        self.open
            .get_mut(&token)
            .ok_or_else(|| SocketError::Io("the connection is closed".into()))
    }

    /// Sleep until a watched socket can be read, finishing connects and
    /// writing queued bytes meanwhile; the tokens of the sockets ready.
    fn wait(&mut self, timeout_ms: u32) -> Vec<u64> {
        let end = after(timeout_ms);
        loop {
            let now = Instant::now();
            let mut ready = Vec::new();
            for (token, socket) in &mut self.open {
                socket.check_deadlines(now);
                if socket.watched && socket.failure().is_some() {
                    ready.push(*token);
                }
            }
            if !ready.is_empty() || now >= end {
                return ready;
            }
            let mut tokens = Vec::new();
            let mut fds = Vec::new();
            let mut wake = end;
            for (token, socket) in &self.open {
                let events = match socket.phase {
                    Phase::Connecting { .. } => libc::POLLOUT,
                    Phase::Open => {
                        let mut events = 0;
                        if socket.watched {
                            events |= libc::POLLIN;
                        }
                        if socket.has_output() {
                            events |= libc::POLLOUT;
                        }
                        events
                    }
                    Phase::Failed(_) => 0,
                };
                if events == 0 {
                    continue;
                }
                if let Some(deadline) = socket.next_deadline() {
                    wake = wake.min(deadline);
                }
                tokens.push(*token);
                fds.push(libc::pollfd {
                    fd: socket.tcp.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
            let wait_ms = wake.saturating_duration_since(now).as_millis();
            // Round up: waking a millisecond early would only loop.
            let wait_ms =
                libc::c_int::try_from(wait_ms.saturating_add(1)).unwrap_or(libc::c_int::MAX);
            if fds.is_empty() {
                std::thread::sleep(wake.saturating_duration_since(now));
                continue;
            }
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
            if n <= 0 {
                continue;
            }
            for (token, fd) in tokens.iter().zip(&fds) {
                if fd.revents == 0 {
                    continue;
                }
                let Some(socket) = self.open.get_mut(token) else {
                    continue;
                };
                if matches!(socket.phase, Phase::Connecting { .. }) {
                    socket.finish_connect();
                }
                if fd.revents & libc::POLLOUT != 0 || matches!(socket.phase, Phase::Open) {
                    let _ = socket.flush();
                }
                let readable = fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
                if socket.watched && (readable || socket.failure().is_some()) {
                    ready.push(*token);
                }
            }
            if !ready.is_empty() {
                return ready;
            }
        }
    }
}

/// The two TLS client configurations: verifying and opportunistic.
#[derive(Clone)]
pub struct TlsSettings {
    verified: Arc<ClientConfig>,
    unverified: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsSettings")
    }
}

impl TlsSettings {
    /// Trust the certificates of `ca_file`, or the system store when `None`.
    /// A missing system store leaves verification failing, never skipped.
    pub fn new(ca_file: Option<&Path>) -> io::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        let bundle = ca_file.unwrap_or(Path::new(SYSTEM_CA_BUNDLE));
        if ca_file.is_some() || bundle.exists() {
            let certs = CertificateDer::pem_file_iter(bundle)
                .map_err(|e| io::Error::other(format!("{}: {e}", bundle.display())))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| io::Error::other(format!("{}: {e}", bundle.display())))?;
                // Unusable roots in a system bundle are skipped, as every TLS client does.
                let _ = roots.add(cert);
            }
        }
        let builder = || {
            ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(io::Error::other)
        };
        let verified = builder()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let unverified = builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider.clone())))
            .with_no_client_auth();
        Ok(TlsSettings {
            verified: Arc::new(verified),
            unverified: Arc::new(unverified),
        })
    }

    fn config(&self, verification: TlsVerification) -> Arc<ClientConfig> {
        match verification {
            TlsVerification::Verify => self.verified.clone(),
            TlsVerification::Opportunistic => self.unverified.clone(),
        }
    }
}

/// Opportunistic TLS (RFC 7435): encrypt without authenticating the peer, but
/// still check the handshake signatures so the session keys are sound.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl smtp_socket::Host for HostState {
    fn wait(&mut self, timeout_ms: u32) -> Vec<u64> {
        self.blocking(|state| state.sockets.wait(timeout_ms))
    }
}

impl smtp_socket::HostConnection for HostState {
    fn connect(
        &mut self,
        address: String,
        port: u16,
        timeout_ms: u32,
    ) -> Result<Resource<Connection>, SocketError> {
        let ip: IpAddr = address
            .parse()
            .map_err(|_| SocketError::Refused(format!("{address:?} is not an IP address")))?;
        if self.sockets.open.len() >= MAX_OPEN_CONNECTIONS {
            return Err(SocketError::Refused(format!(
                "more than {MAX_OPEN_CONNECTIONS} connections open at once"
            )));
        }
        let socket = Socket::connect(SocketAddr::new(ip, port), timeout_ms)?;
        let token = self.sockets.next_token;
        let handle = self
            .table
            .push(Connection { token })
            .map_err(|e| SocketError::Io(e.to_string()))?;
        self.sockets.next_token += 1;
        self.sockets.open.insert(token, socket);
        Ok(handle)
    }

    fn send(
        &mut self,
        handle: Resource<Connection>,
        data: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<(), SocketError> {
        let token = self.connection_token(&handle)?;
        self.sockets.socket(token)?.send(&data, timeout_ms)
    }

    fn try_receive(
        &mut self,
        handle: Resource<Connection>,
    ) -> Result<Option<Vec<u8>>, SocketError> {
        let token = self.connection_token(&handle)?;
        let sockets = &mut self.sockets;
        if sockets.buffer.len() < MAX_RECEIVE {
            sockets.buffer.resize(MAX_RECEIVE, 0);
        }
        let socket = sockets
            .open
            .get_mut(&token)
            .ok_or_else(|| SocketError::Io("the connection is closed".into()))?;
        socket.try_receive(&mut sockets.buffer)
    }

    fn token(&mut self, handle: Resource<Connection>) -> u64 {
        self.table.get(&handle).map(|c| c.token).unwrap_or(u64::MAX)
    }

    fn start_tls(
        &mut self,
        handle: Resource<Connection>,
        server_name: String,
        verification: TlsVerification,
        timeout_ms: u32,
    ) -> Result<(), SocketError> {
        let config = self.tls.config(verification);
        let token = self.connection_token(&handle)?;
        self.blocking(|state| {
            state
                .sockets
                .socket(token)?
                .start_tls(&server_name, config, timeout_ms)
        })
    }

    fn peer(&mut self, handle: Resource<Connection>) -> String {
        self.connection_token(&handle)
            .and_then(|token| self.sockets.socket(token))
            .map(|s| s.peer.to_string())
            .unwrap_or_default()
    }

    fn drop(&mut self, handle: Resource<Connection>) -> wasmtime::Result<()> {
        let connection = self.table.delete(handle)?;
        if let Some(mut socket) = self.sockets.open.remove(&connection.token) {
            // A last command (QUIT) still buffered goes out if the socket
            // takes it now; nothing waits for it.
            let _ = socket.flush();
        }
        Ok(())
    }
}

impl HostState {
    /// Connections the component holds open.
    pub(crate) fn open_connections(&self) -> usize {
        self.sockets.open.len()
    }

    fn connection_token(&self, handle: &Resource<Connection>) -> Result<u64, SocketError> {
        self.table
            .get(handle)
            .map(|c| c.token)
            .map_err(|e| SocketError::Io(e.to_string()))
    }
}

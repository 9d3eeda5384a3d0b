//! Outbound SMTP connections for the component: TCP, upgraded in place to TLS
//! (rustls) when the component asks. This module also implements the
//! `smtp-socket` import. The component decides when to use TLS and whether
//! the certificate must verify; the host only carries it out.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
    StreamOwned,
};
use wasmtime::component::Resource;

use crate::runtime::HostState;
use crate::runtime::bindings::mailroot::relay::smtp_socket::{self, SocketError, TlsVerification};

/// Most bytes one `receive` hands to the component.
const MAX_RECEIVE: usize = 64 * 1024;
/// Most connections one component call may hold open at once.
pub const MAX_OPEN_CONNECTIONS: usize = 32;
/// Where Debian's `ca-certificates` puts the system trust store.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
    /// A failed handshake consumed the stream.
    Broken,
}

/// One outbound connection, owned by the host's resource table.
pub struct Connection {
    stream: Stream,
    peer: SocketAddr,
}

fn timeout(ms: u32) -> Option<Duration> {
    Some(Duration::from_millis(u64::from(ms.max(1))))
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

impl Connection {
    /// Connect to `address:port` within `timeout_ms`. Nagle's algorithm is off:
    /// SMTP sends small commands and waits for each reply.
    pub fn connect(address: IpAddr, port: u16, timeout_ms: u32) -> Result<Self, SocketError> {
        let peer = SocketAddr::new(address, port);
        let stream =
            TcpStream::connect_timeout(&peer, Duration::from_millis(u64::from(timeout_ms.max(1))))
                .map_err(socket_error)?;
        stream.set_nodelay(true).map_err(socket_error)?;
        Ok(Connection {
            stream: Stream::Plain(stream),
            peer,
        })
    }

    fn tcp(&self) -> Result<&TcpStream, SocketError> {
        match &self.stream {
            Stream::Plain(tcp) => Ok(tcp),
            Stream::Tls(tls) => Ok(tls.get_ref()),
            Stream::Broken => Err(SocketError::Closed),
        }
    }

    /// Write all of `data`.
    pub fn send(&mut self, data: &[u8], timeout_ms: u32) -> Result<(), SocketError> {
        self.tcp()?
            .set_write_timeout(timeout(timeout_ms))
            .map_err(socket_error)?;
        let result = match &mut self.stream {
            Stream::Plain(tcp) => tcp.write_all(data).and_then(|()| tcp.flush()),
            Stream::Tls(tls) => tls.write_all(data).and_then(|()| tls.flush()),
            Stream::Broken => return Err(SocketError::Closed),
        };
        result.map_err(socket_error)
    }

    /// Read what arrives next: at least one byte, at most 64 KiB.
    pub fn receive(&mut self, timeout_ms: u32) -> Result<Vec<u8>, SocketError> {
        self.tcp()?
            .set_read_timeout(timeout(timeout_ms))
            .map_err(socket_error)?;
        let mut buffer = vec![0u8; MAX_RECEIVE];
        let len = match &mut self.stream {
            Stream::Plain(tcp) => tcp.read(&mut buffer),
            Stream::Tls(tls) => tls.read(&mut buffer),
            Stream::Broken => return Err(SocketError::Closed),
        }
        .map_err(socket_error)?;
        if len == 0 {
            return Err(SocketError::Closed);
        }
        buffer.truncate(len);
        Ok(buffer)
    }

    /// Run the TLS handshake over the plain stream.
    pub fn start_tls(
        &mut self,
        server_name: &str,
        config: Arc<ClientConfig>,
        timeout_ms: u32,
    ) -> Result<(), SocketError> {
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Broken) else {
            return Err(SocketError::Tls(
                "the connection is not a plain TCP connection".into(),
            ));
        };
        let name =
            ServerName::try_from(server_name.trim_end_matches('.').to_string()).map_err(|e| {
                SocketError::Tls(format!("{server_name:?} is not a valid server name: {e}"))
            })?;
        tcp.set_read_timeout(timeout(timeout_ms))
            .map_err(socket_error)?;
        tcp.set_write_timeout(timeout(timeout_ms))
            .map_err(socket_error)?;
        let client =
            ClientConnection::new(config, name).map_err(|e| SocketError::Tls(e.to_string()))?;
        let mut tls = StreamOwned::new(client, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| match socket_error(e) {
                    SocketError::Io(why) => SocketError::Tls(why),
                    other => other,
                })?;
        }
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    /// The peer, `ip:port`.
    pub fn peer(&self) -> SocketAddr {
        self.peer
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

impl HostState {
    fn connection(
        &mut self,
        handle: &Resource<Connection>,
    ) -> Result<&mut Connection, SocketError> {
        self.table
            .get_mut(handle)
            .map_err(|e| SocketError::Io(e.to_string()))
    }
}

impl smtp_socket::Host for HostState {}

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
        if self.open_connections >= MAX_OPEN_CONNECTIONS {
            return Err(SocketError::Refused(format!(
                "more than {MAX_OPEN_CONNECTIONS} connections open at once"
            )));
        }
        let connection = self.blocking(|_| Connection::connect(ip, port, timeout_ms))?;
        let handle = self
            .table
            .push(connection)
            .map_err(|e| SocketError::Io(e.to_string()))?;
        self.open_connections += 1;
        Ok(handle)
    }

    fn send(
        &mut self,
        handle: Resource<Connection>,
        data: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<(), SocketError> {
        self.blocking(|state| state.connection(&handle)?.send(&data, timeout_ms))
    }

    fn receive(
        &mut self,
        handle: Resource<Connection>,
        timeout_ms: u32,
    ) -> Result<Vec<u8>, SocketError> {
        self.blocking(|state| state.connection(&handle)?.receive(timeout_ms))
    }

    fn start_tls(
        &mut self,
        handle: Resource<Connection>,
        server_name: String,
        verification: TlsVerification,
        timeout_ms: u32,
    ) -> Result<(), SocketError> {
        let config = self.tls.config(verification);
        self.blocking(|state| {
            state
                .connection(&handle)?
                .start_tls(&server_name, config, timeout_ms)
        })
    }

    fn peer(&mut self, handle: Resource<Connection>) -> String {
        self.connection(&handle)
            .map(|c| c.peer().to_string())
            .unwrap_or_default()
    }

    fn drop(&mut self, handle: Resource<Connection>) -> wasmtime::Result<()> {
        self.table.delete(handle)?;
        self.open_connections = self.open_connections.saturating_sub(1);
        Ok(())
    }
}

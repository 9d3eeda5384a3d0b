//! DNS over the wire with hickory-proto: UDP first, TCP when the answer is
//! truncated, against the servers of `/etc/resolv.conf` or one given with
//! `--dns-server`. This module also implements the `dns` import.
//!
//! Answers are classified the way a relay needs them: records, no records
//! (NOERROR/NODATA), NXDOMAIN, or a temporary failure (SERVFAIL, REFUSED,
//! timeout), which must defer mail and never bounce it.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::Name;
pub use hickory_proto::rr::{RData, RecordType};

use crate::runtime::HostState;
use crate::runtime::bindings::mailroot::relay::{dns, types};

/// Most bytes accepted for one TCP answer (the DNS maximum).
const MAX_TCP_ANSWER: usize = 65_535;

/// A stub resolver: asks recursive servers, caches nothing.
#[derive(Debug, Clone)]
pub struct Resolver {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    attempts: u32,
}

/// The outcome of one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// NOERROR, with the answer records of the asked type.
    Records(Vec<RData>),
    /// NOERROR without records of that type.
    NoRecords,
    NxDomain,
    Temporary(String),
}

impl Resolver {
    /// Ask `server` (any port; tests use a local one).
    pub fn with_server(server: SocketAddr) -> Self {
        Resolver {
            servers: vec![server],
            timeout: Duration::from_secs(5),
            attempts: 2,
        }
    }

    /// The `nameserver` lines of `/etc/resolv.conf`.
    pub fn from_system() -> io::Result<Self> {
        let conf = std::fs::read_to_string("/etc/resolv.conf")?;
        let servers = parse_resolv_conf(&conf);
        if servers.is_empty() {
            return Err(io::Error::other("/etc/resolv.conf names no nameserver"));
        }
        Ok(Resolver {
            servers,
            timeout: Duration::from_secs(5),
            attempts: 2,
        })
    }

    /// Change the per-try timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Ask every server in turn until one gives a definite answer.
    pub fn query(&self, name: &str, record_type: RecordType) -> Answer {
        let name = match Name::from_utf8(name) {
            Ok(mut name) => {
                name.set_fqdn(true);
                name
            }
            Err(e) => return Answer::Temporary(format!("{name:?} is not a valid DNS name: {e}")),
        };
        let mut last = Answer::Temporary("no DNS server configured".into());
        for _ in 0..self.attempts {
            for server in &self.servers {
                match self.query_server(*server, &name, record_type) {
                    Ok(answer @ (Answer::Records(_) | Answer::NoRecords | Answer::NxDomain)) => {
                        return answer;
                    }
                    Ok(temporary) => last = temporary,
                    Err(e) => last = Answer::Temporary(format!("DNS server {server}: {e}")),
                }
            }
        }
        last
    }

    fn query_server(
        &self,
        server: SocketAddr,
        name: &Name,
        record_type: RecordType,
    ) -> io::Result<Answer> {
        let mut request = Message::new(rand_id(), MessageType::Query, OpCode::Query);
        request.metadata.recursion_desired = true;
        request.add_query(Query::query(name.clone(), record_type));
        let bytes = request.to_vec().map_err(io::Error::other)?;
        let mut response = self.exchange_udp(server, &bytes, request.metadata.id)?;
        if response.metadata.truncation {
            response = self.exchange_tcp(server, &bytes, request.metadata.id)?;
        }
        Ok(classify(&response, record_type))
    }

    fn exchange_udp(&self, server: SocketAddr, request: &[u8], id: u16) -> io::Result<Message> {
        let local: SocketAddr = if server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = UdpSocket::bind(local)?;
        socket.connect(server)?;
        socket.send(request)?;
        let deadline = Instant::now() + self.timeout;
        let mut buffer = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer (timeout)",
                ));
            }
            socket.set_read_timeout(Some(left))?;
            let len = socket.recv(&mut buffer).map_err(timeout_words)?;
            // Anything that does not parse or answers another id is ignored, as spoofing defence.
            if let Ok(message) = Message::from_vec(buffer.get(..len).unwrap_or_default())
                && message.metadata.id == id
                && message.metadata.message_type == MessageType::Response
            {
                return Ok(message);
            }
        }
    }

    fn exchange_tcp(&self, server: SocketAddr, request: &[u8], id: u16) -> io::Result<Message> {
        let mut stream = TcpStream::connect_timeout(&server, self.timeout)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        let len = u16::try_from(request.len()).map_err(io::Error::other)?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(request);
        stream.write_all(&framed)?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).map_err(timeout_words)?;
        let len = usize::from(u16::from_be_bytes(len)).min(MAX_TCP_ANSWER);
        let mut answer = vec![0u8; len];
        stream.read_exact(&mut answer).map_err(timeout_words)?;
        let message = Message::from_vec(&answer).map_err(io::Error::other)?;
        if message.metadata.id != id {
            return Err(io::Error::other("answer for another query"));
        }
        Ok(message)
    }

    /// MX records of `domain`, as the WIT `mx-answer`.
    pub fn lookup_mx(&self, domain: &str) -> types::MxAnswer {
        match self.query(domain, RecordType::MX) {
            Answer::Records(records) => types::MxAnswer::Records(
                records
                    .into_iter()
                    .filter_map(|r| match r {
                        RData::MX(mx) => Some(types::MxRecord {
                            preference: mx.preference,
                            exchange: mx.exchange.to_utf8(),
                        }),
                        _ => None,
                    })
                    .collect(),
            ),
            Answer::NoRecords => types::MxAnswer::NoRecords,
            Answer::NxDomain => types::MxAnswer::NxDomain,
            Answer::Temporary(why) => types::MxAnswer::Temporary(why),
        }
    }

    /// A and AAAA records of `host`, IPv4 first.
    pub fn lookup_ip(&self, host: &str) -> dns::AddressAnswer {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return dns::AddressAnswer::Addresses(vec![ip.to_string()]);
        }
        let answers = [
            self.query(host, RecordType::A),
            self.query(host, RecordType::AAAA),
        ];
        let addresses: Vec<String> = answers
            .iter()
            .flat_map(|a| match a {
                Answer::Records(records) => records.clone(),
                _ => Vec::new(),
            })
            .filter_map(|r| match r {
                RData::A(a) => Some(a.0.to_string()),
                RData::AAAA(aaaa) => Some(aaaa.0.to_string()),
                _ => None,
            })
            .collect();
        if !addresses.is_empty() {
            return dns::AddressAnswer::Addresses(addresses);
        }
        match answers {
            [Answer::NxDomain, _] => dns::AddressAnswer::NxDomain,
            [Answer::Temporary(why), _] | [_, Answer::Temporary(why)] => {
                dns::AddressAnswer::Temporary(why.clone())
            }
            _ => dns::AddressAnswer::NoRecords,
        }
    }
}

fn timeout_words(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            io::Error::new(io::ErrorKind::TimedOut, "no answer (timeout)")
        }
        _ => e,
    }
}

fn classify(response: &Message, record_type: RecordType) -> Answer {
    match response.metadata.response_code {
        ResponseCode::NoError => {
            let records: Vec<RData> = response
                .answers
                .iter()
                .filter(|r| r.record_type() == record_type)
                .map(|r| r.data.clone())
                .collect();
            if records.is_empty() {
                Answer::NoRecords
            } else {
                Answer::Records(records)
            }
        }
        ResponseCode::NXDomain => Answer::NxDomain,
        other => Answer::Temporary(format!("the DNS server answered {other}")),
    }
}

/// Query ids need not be secret here (the transport is the operator's own
/// resolver), only different between queries.
fn rand_id() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) as u16
}

/// The `nameserver` addresses of a resolv.conf text (port 53).
pub fn parse_resolv_conf(conf: &str) -> Vec<SocketAddr> {
    conf.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            rest.trim()
                .split('%')
                .next()
                .and_then(|ip| ip.parse::<IpAddr>().ok())
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

impl types::Host for HostState {}

impl dns::Host for HostState {
    fn lookup_mx(&mut self, domain: String) -> types::MxAnswer {
        self.blocking(|state| state.resolver.lookup_mx(&domain))
    }

    fn lookup_ip(&mut self, host: String) -> dns::AddressAnswer {
        self.blocking(|state| state.resolver.lookup_ip(&host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let conf = "# comment\nsearch example\nnameserver 127.0.0.53\nnameserver ::1\nnameserver fe80::1%eth0\noptions ndots:1\n";
        let servers = parse_resolv_conf(conf);
        assert_eq!(servers.len(), 3);
        assert_eq!(servers[0], "127.0.0.53:53".parse().unwrap());
    }

    #[test]
    fn a_server_that_never_answers_is_temporary() {
        // A bound socket that never replies: the query must time out, not hang.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let resolver =
            Resolver::with_server(silent.local_addr().unwrap()).timeout(Duration::from_millis(100));
        match resolver.query("example.test", RecordType::MX) {
            Answer::Temporary(why) => assert!(why.contains("timeout"), "{why}"),
            other => panic!("expected a temporary failure, got {other:?}"),
        }
    }
}

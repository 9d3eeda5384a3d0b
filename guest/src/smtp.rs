//! The SMTP client dialogue (RFC 5321): replies, EHLO extensions, and one
//! mail transaction over a connection the host opened.
//!
//! Replies come from the network, so the reader bounds what it buffers and
//! treats anything that is not `NNN[ -]text` as a protocol error.

use std::fmt;

/// Why a socket operation failed (the WIT `socket-error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketError {
    Refused(String),
    TimedOut,
    Closed,
    Tls(String),
    Io(String),
}

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketError::Refused(why) => write!(f, "connection refused: {why}"),
            SocketError::TimedOut => f.write_str("timed out"),
            SocketError::Closed => f.write_str("connection closed by the server"),
            SocketError::Tls(why) => write!(f, "TLS failed: {why}"),
            SocketError::Io(why) => write!(f, "I/O error: {why}"),
        }
    }
}

/// The host's side of a connection.
///
/// Sending never waits: the host queues the bytes and writes them while the
/// component waits for replies (see [`crate::reactor`]).
pub trait Connection {
    /// Queue `data`; the host must have written it all within `timeout_ms`.
    fn send(&mut self, data: &[u8], timeout_ms: u32) -> Result<(), SocketError>;
    /// What has arrived, without waiting: `None` when nothing has yet.
    fn try_receive(&mut self) -> Result<Option<Vec<u8>>, SocketError>;
    /// The number the host's `wait` reports this connection by.
    fn token(&self) -> u64;
    fn start_tls(
        &mut self,
        server_name: &str,
        verify: bool,
        timeout_ms: u32,
    ) -> Result<(), SocketError>;
}

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of each line, without code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The enhanced status code the server gave (RFC 2034), or one derived
    /// from the reply class.
    pub fn status(&self) -> String {
        let first = self.lines.first().map(String::as_str).unwrap_or_default();
        let candidate = first.split_whitespace().next().unwrap_or_default();
        let parts: Vec<&str> = candidate.split('.').collect();
        let class = (self.code / 100).to_string();
        if parts.len() == 3
            && parts.first() == Some(&class.as_str())
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return candidate.to_string();
        }
        format!("{class}.0.0")
    }
}

impl fmt::Display for Reply {
    /// `550 5.1.1 no such user` with multi-line text joined by spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" "))
    }
}

/// What went wrong during a dialogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialogueError {
    Socket(SocketError),
    /// The server sent something that is not an SMTP reply.
    Protocol(String),
}

impl fmt::Display for DialogueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialogueError::Socket(e) => e.fmt(f),
            DialogueError::Protocol(why) => write!(f, "protocol error: {why}"),
        }
    }
}

impl From<SocketError> for DialogueError {
    fn from(e: SocketError) -> Self {
        DialogueError::Socket(e)
    }
}

/// Most bytes one reply may take; RFC 5321 4.5.3.1.5 allows 512 per line.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Buffers what the server sent and hands out whole replies.
#[derive(Default)]
pub struct ReplyReader {
    buffer: Vec<u8>,
}

impl ReplyReader {
    /// Read the next complete reply, receiving more bytes as needed.
    pub async fn read<C: Connection>(
        &mut self,
        conn: &mut C,
        timeout_ms: u32,
    ) -> Result<Reply, DialogueError> {
        loop {
            if let Some((reply, used)) = parse_reply(&self.buffer)? {
                self.buffer.drain(..used);
                return Ok(reply);
            }
            if self.buffer.len() > MAX_REPLY_BYTES {
                return Err(DialogueError::Protocol("reply longer than 64 KiB".into()));
            }
            let more = crate::reactor::receive(conn, timeout_ms).await?;
            if more.is_empty() {
                return Err(DialogueError::Socket(SocketError::Closed));
            }
            self.buffer.extend_from_slice(&more);
        }
    }
}

/// Parse one reply from the front of `buffer`: `Ok(None)` when incomplete.
pub fn parse_reply(buffer: &[u8]) -> Result<Option<(Reply, usize)>, DialogueError> {
    let mut lines = Vec::new();
    let mut offset = 0;
    let mut code = None;
    while let Some(end) = buffer
        .get(offset..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
    {
        let raw = buffer.get(offset..offset + end).unwrap_or_default();
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        offset += end + 1;
        let garbage = || {
            DialogueError::Protocol(format!(
                "not an SMTP reply: {:?}",
                String::from_utf8_lossy(raw)
            ))
        };
        let digits = raw.get(..3).ok_or_else(garbage)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(garbage());
        }
        let this_code = digits
            .iter()
            .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
        if !(200..600).contains(&this_code) {
            return Err(garbage());
        }
        if code.is_some_and(|c| c != this_code) {
            return Err(DialogueError::Protocol(
                "the lines of a multi-line reply have different codes".into(),
            ));
        }
        code = Some(this_code);
        let separator = raw.get(3).copied();
        lines.push(String::from_utf8_lossy(raw.get(4..).unwrap_or_default()).into_owned());
        match separator {
            None | Some(b' ') => {
                return Ok(Some((
                    Reply {
                        code: this_code,
                        lines,
                    },
                    offset,
                )));
            }
            Some(b'-') => continue,
            Some(_) => return Err(garbage()),
        }
    }
    Ok(None)
}

/// What the server announced in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    pub esmtp: bool,
    pub pipelining: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    pub enhanced_status_codes: bool,
    /// `SIZE n`; `Some(0)` means the server announced no fixed limit.
    pub size: Option<u64>,
    /// SASL mechanisms of `AUTH` (or the old `AUTH=`), upper case.
    pub auth: Vec<String>,
}

impl Extensions {
    /// Read the keywords of an EHLO reply (first line is the greeting).
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut ext = Extensions {
            esmtp: true,
            ..Self::default()
        };
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let keyword = words.next().unwrap_or_default().to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => ext.pipelining = true,
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "STARTTLS" => ext.starttls = true,
                "ENHANCEDSTATUSCODES" => ext.enhanced_status_codes = true,
                "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "AUTH" => ext.auth.extend(words.map(str::to_ascii_uppercase)),
                _ if keyword.starts_with("AUTH=") => {
                    let first = keyword.trim_start_matches("AUTH=").to_string();
                    ext.auth.push(first);
                    ext.auth.extend(words.map(str::to_ascii_uppercase));
                }
                _ => {}
            }
        }
        ext
    }
}

/// Dot-stuff a CRLF message and append the end-of-data line (RFC 5321 4.5.2).
/// The result is one buffer, so the final `.` leaves with the data and never
/// waits on Nagle's algorithm.
pub fn data_block(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 5);
    for (content, _) in crate::message::lines(message) {
        if content.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(content);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_multi_line_replies() {
        let (reply, used) =
            parse_reply(b"250-mx.example hello\r\n250-PIPELINING\r\n250 SIZE 1000\r\n354 go")
                .unwrap()
                .unwrap();
        assert_eq!(reply.code, 250);
        assert_eq!(
            reply.lines,
            vec!["mx.example hello", "PIPELINING", "SIZE 1000"]
        );
        assert_eq!(used, 53);
        let ext = Extensions::from_ehlo(&reply);
        assert!(ext.pipelining && ext.size == Some(1000) && !ext.eight_bit_mime);
        assert_eq!(parse_reply(b"250-partial\r\n").unwrap(), None);
        assert_eq!(parse_reply(b"220\r\n").unwrap().unwrap().0.lines, vec![""]);
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        assert!(parse_reply(b"HTTP/1.1 400 Bad\r\n").is_err());
        assert!(parse_reply(b"2\r\n").is_err());
        assert!(parse_reply(b"999 what\r\n").is_err());
        assert!(parse_reply(b"250-a\r\n251 b\r\n").is_err());
        assert!(parse_reply(b"250xa\r\n").is_err());
    }

    #[test]
    fn enhanced_status_is_read_or_derived() {
        let reply = Reply {
            code: 550,
            lines: vec!["5.1.1 no such user".into()],
        };
        assert_eq!(reply.status(), "5.1.1");
        let reply = Reply {
            code: 451,
            lines: vec!["try later".into()],
        };
        assert_eq!(reply.status(), "4.0.0");
        assert_eq!(reply.to_string(), "451 try later");
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(
            data_block(b"a\r\n.b\r\n..\r\n"),
            b"a\r\n..b\r\n...\r\n.\r\n"
        );
    }
}

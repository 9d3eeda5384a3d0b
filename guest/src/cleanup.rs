//! The cleanup stage (named after Postfix's): turn a parsed pickup file into
//! the message that is queued and transmitted.
//!
//! - the `x-sender`/`x-receiver` lines are gone (they were the envelope);
//! - `Bcc`, `Resent-Bcc`, `Return-Path` and `Content-Length` are removed, as
//!   Postfix's cleanup does: blind copies must never reach the wire;
//! - `From`, `Date` and `Message-ID` are added when missing, and `To:
//!   undisclosed-recipients:;` when no visible recipient remains;
//! - a `Received` header is prepended;
//! - every line ends in CRLF.

use crate::date;
use crate::message::{self, Parsed};

/// Headers that never leave the relay.
const REMOVED_HEADERS: [&str; 4] = ["Bcc", "Resent-Bcc", "Return-Path", "Content-Length"];

/// What cleanup needs besides the message.
pub struct Context<'a> {
    /// Names the message in `Received` and a generated `Message-ID`.
    pub queue_id: &'a str,
    /// This relay's host name.
    pub hostname: &'a str,
    /// Now, in milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// The envelope sender, for a missing `From`.
    pub sender: &'a str,
}

/// Produce the queued form of `parsed`.
pub fn cleanup(parsed: &Parsed<'_>, ctx: &Context<'_>) -> Vec<u8> {
    let now = date::rfc5322(ctx.now_ms);
    let mut out = Vec::with_capacity(parsed.message.len() + 512);
    out.extend_from_slice(
        format!(
            "Received: from pickup by {} (mailroot) id {};\r\n\t{now}\r\n",
            ctx.hostname, ctx.queue_id
        )
        .as_bytes(),
    );
    let fields = &parsed.headers.fields;
    for field in fields
        .iter()
        .filter(|f| !REMOVED_HEADERS.iter().any(|name| f.is(name)))
    {
        out.extend_from_slice(&message::to_crlf(field.raw));
    }
    let has = |name: &str| fields.iter().any(|f| f.is(name));
    if !has("From") && !ctx.sender.is_empty() {
        out.extend_from_slice(format!("From: <{}>\r\n", ctx.sender).as_bytes());
    }
    if !has("Date") {
        out.extend_from_slice(format!("Date: {now}\r\n").as_bytes());
    }
    if !has("Message-ID") {
        out.extend_from_slice(
            format!("Message-ID: <{}@{}>\r\n", ctx.queue_id, ctx.hostname).as_bytes(),
        );
    }
    if !["To", "Cc", "Resent-To", "Resent-Cc"]
        .iter()
        .any(|name| has(name))
    {
        out.extend_from_slice(b"To: undisclosed-recipients:;\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let body = parsed
        .message
        .get(parsed.headers.body_start..)
        .unwrap_or_default();
    out.extend_from_slice(&message::to_crlf(body));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean(raw: &[u8]) -> String {
        let parsed = message::parse(raw).unwrap();
        let ctx = Context {
            queue_id: "Q1",
            hostname: "relay.example",
            now_ms: 0,
            sender: "s@x.example",
        };
        String::from_utf8(cleanup(&parsed, &ctx)).unwrap()
    }

    #[test]
    fn removes_envelope_lines_and_blind_copies() {
        let out = clean(b"x-sender: s@x.example\nx-receiver: h@y.example\nFrom: s@x.example\nTo: t@y.example\nBcc: h@y.example,\n  i@y.example\nReturn-Path: <x@y>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <m@x>\n\n.line\nend");
        assert_eq!(
            out,
            "Received: from pickup by relay.example (mailroot) id Q1;\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n\
             From: s@x.example\r\nTo: t@y.example\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <m@x>\r\n\r\n.line\r\nend\r\n"
        );
    }

    #[test]
    fn adds_missing_headers() {
        let out = clean(b"x-sender: s@x.example\r\nx-receiver: h@y.example\r\nSubject: hi\r\nBcc: h@y.example\r\n\r\nbody\r\n");
        assert!(out.contains("\r\nFrom: <s@x.example>\r\n"));
        assert!(out.contains("\r\nDate: Thu, 01 Jan 1970 00:00:00 +0000\r\n"));
        assert!(out.contains("\r\nMessage-ID: <Q1@relay.example>\r\n"));
        assert!(out.contains("\r\nTo: undisclosed-recipients:;\r\n"));
        assert!(!out.contains("Bcc"));
    }

    #[test]
    fn separates_a_body_that_followed_without_blank_line() {
        let out = clean(b"From: s@x.example\r\nTo: t@y.example\r\nDate: x\r\nMessage-ID: <m@x>\r\nthis is body text\r\n");
        assert!(out.ends_with("Message-ID: <m@x>\r\n\r\nthis is body text\r\n"));
    }
}

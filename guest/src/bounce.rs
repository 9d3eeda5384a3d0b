//! Delivery status notifications (RFC 3464, RFC 3462 `multipart/report`).
//!
//! A DSN carries a readable part, a `message/delivery-status` part and the
//! original header section as `text/rfc822-headers` (never the body: it keeps
//! bounces small and does not re-send content that may have been rejected).

use crate::message;

/// Action reported for a recipient (RFC 3464 2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
            Action::Expanded => "expanded",
        }
    }
}

/// One recipient of a DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnRecipient {
    pub recipient: String,
    pub action: Action,
    pub status: String,
    pub remote_mta: Option<String>,
    pub diagnostic: Option<String>,
}

/// Everything a DSN needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BounceRequest {
    pub reporting_mta: String,
    pub original_sender: String,
    pub arrival_date: String,
    pub date: String,
    pub message_id: String,
    pub will_retry_until: Option<String>,
    pub recipients: Vec<DsnRecipient>,
    pub original: Vec<u8>,
}

/// Most bytes of original headers returned (Postfix's bounce_size_limit).
const MAX_RETURNED_HEADER_BYTES: usize = 50_000;

/// One line of a header field value: CR, LF and other controls become spaces,
/// so text from a remote server cannot inject fields.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

fn address_type(addr: &str) -> &'static str {
    if addr.is_ascii() { "rfc822" } else { "utf-8" }
}

/// Write the DSN as a complete CRLF message from the null sender's mailbox.
pub fn build_bounce(request: &BounceRequest) -> Vec<u8> {
    let boundary = format!(
        "mailroot-dsn-{}",
        one_line(&request.message_id).replace(['<', '>', '@', ' '], ".")
    );
    let delayed = request
        .recipients
        .iter()
        .all(|r| r.action == Action::Delayed);
    let subject = if delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Undelivered Mail Returned to Sender"
    };
    let mta = one_line(&request.reporting_mta);
    let mut text = String::new();
    let mut push = |line: &str| {
        text.push_str(line);
        text.push_str("\r\n");
    };
    push(&format!("From: Mail Delivery System <MAILER-DAEMON@{mta}>"));
    push(&format!("To: <{}>", one_line(&request.original_sender)));
    push(&format!("Subject: {subject}"));
    push(&format!("Date: {}", one_line(&request.date)));
    push(&format!("Message-ID: <{}>", one_line(&request.message_id)));
    push("Auto-Submitted: auto-replied");
    push("MIME-Version: 1.0");
    push(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""
    ));
    push("");
    push("This is a MIME-encapsulated message.");
    push("");
    push(&format!("--{boundary}"));
    push("Content-Description: Notification");
    push("Content-Type: text/plain; charset=utf-8");
    push("Content-Transfer-Encoding: 8bit");
    push("");
    push(&format!("This is the mail system at host {mta}."));
    push("");
    if delayed {
        push("Your message could not be delivered yet to the recipients below.");
        push("The mail system will keep trying; you do not need to send it again.");
        if let Some(until) = &request.will_retry_until {
            push(&format!("It gives up after {}.", one_line(until)));
        }
    } else {
        push("Your message could not be delivered to one or more recipients.");
        push("The mail system gave up on them; the reasons follow.");
    }
    push("");
    for r in &request.recipients {
        let why = r
            .diagnostic
            .as_deref()
            .map(one_line)
            .unwrap_or_else(|| r.status.clone());
        push(&format!("<{}>: {why}", one_line(&r.recipient)));
    }
    push("");
    push(&format!("--{boundary}"));
    push("Content-Description: Delivery report");
    push("Content-Type: message/delivery-status");
    push("");
    push(&format!("Reporting-MTA: dns; {mta}"));
    push(&format!(
        "Arrival-Date: {}",
        one_line(&request.arrival_date)
    ));
    for r in &request.recipients {
        push("");
        let recipient = one_line(&r.recipient);
        push(&format!(
            "Final-Recipient: {}; {recipient}",
            address_type(&recipient)
        ));
        push(&format!("Action: {}", r.action.as_str()));
        push(&format!("Status: {}", one_line(&r.status)));
        if let Some(remote) = &r.remote_mta {
            push(&format!("Remote-MTA: dns; {}", one_line(remote)));
        }
        if let Some(diagnostic) = &r.diagnostic {
            push(&format!("Diagnostic-Code: smtp; {}", one_line(diagnostic)));
        }
        push(&format!("Last-Attempt-Date: {}", one_line(&request.date)));
        if let (Action::Delayed, Some(until)) = (r.action, &request.will_retry_until) {
            push(&format!("Will-Retry-Until: {}", one_line(until)));
        }
    }
    push("");
    push(&format!("--{boundary}"));
    push("Content-Description: Undelivered Message Headers");
    push("Content-Type: text/rfc822-headers");
    push("");
    let mut out = text.into_bytes();
    out.extend_from_slice(&original_headers(&request.original));
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The header section of the original, CRLF, without pickup lines.
fn original_headers(original: &[u8]) -> Vec<u8> {
    let (_, message) = message::split_pickup_lines(original).unwrap_or((None, original));
    let end = message::header_section(message)
        .map(|h| h.body_start)
        .unwrap_or(0);
    let headers = message
        .get(..end.min(MAX_RETURNED_HEADER_BYTES))
        .unwrap_or_default();
    let mut out = message::to_crlf(headers);
    while out.ends_with(b"\r\n\r\n") {
        out.truncate(out.len() - 2);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(action: Action) -> BounceRequest {
        BounceRequest {
            reporting_mta: "relay.example".into(),
            original_sender: "s@x.example".into(),
            arrival_date: "Thu, 03 Dec 2026 17:00:00 +0000".into(),
            date: "Thu, 03 Dec 2026 18:00:00 +0000".into(),
            message_id: "Q1.dsn@relay.example".into(),
            will_retry_until: Some("Sat, 05 Dec 2026 17:00:00 +0000".into()),
            recipients: vec![DsnRecipient {
                recipient: "r@y.example".into(),
                action,
                status: "5.1.1".into(),
                remote_mta: Some("mx.y.example".into()),
                diagnostic: Some("550 5.1.1 no such\r\nInjected: header".into()),
            }],
            original: b"From: s@x.example\r\nSubject: hello\r\n\r\nsecret body\r\n".to_vec(),
        }
    }

    #[test]
    fn failed_dsn_has_the_three_parts() {
        let dsn = String::from_utf8(build_bounce(&request(Action::Failed))).unwrap();
        assert!(dsn.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(dsn.contains("\r\nReporting-MTA: dns; relay.example\r\n"));
        assert!(dsn.contains("\r\nFinal-Recipient: rfc822; r@y.example\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.y.example\r\n"));
        assert!(dsn.contains("\r\nDiagnostic-Code: smtp; 550 5.1.1 no such  Injected: header\r\n"));
        assert!(!dsn.contains("\r\nInjected:"));
        assert!(dsn.contains(
            "Content-Type: text/rfc822-headers\r\n\r\nFrom: s@x.example\r\nSubject: hello\r\n"
        ));
        assert!(!dsn.contains("secret body"));
        assert!(!dsn.contains("Will-Retry-Until"));
        assert!(dsn.ends_with("--\r\n"));
    }

    #[test]
    fn delayed_dsn_says_until_when() {
        let dsn = String::from_utf8(build_bounce(&request(Action::Delayed))).unwrap();
        assert!(dsn.contains("Subject: Delayed Mail"));
        assert!(dsn.contains("Will-Retry-Until: Sat, 05 Dec 2026 17:00:00 +0000\r\n"));
    }
}

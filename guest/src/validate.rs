//! Validation of a pickup file against the operator's limits: what sends a
//! file to Badmail (rejections) and what is only worth a log line (warnings).

use crate::envelope;
use crate::message::{self, MAX_LINE_LENGTH};

/// Limits the operator sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message accepted, in bytes.
    pub max_message_bytes: u64,
    /// Most recipients one message may have.
    pub max_recipients: u32,
}

impl Default for Limits {
    /// 10 MiB, as Exchange and close to Postfix's 10,240,000 bytes; 1,000
    /// recipients per message (they are sent 100 per transaction).
    fn default() -> Self {
        Limits {
            max_message_bytes: 10 * 1024 * 1024,
            max_recipients: 1000,
        }
    }
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Warning,
    Reject,
}

/// One validation finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Stable code: `too-large`, `unparseable`, `no-sender`, `invalid-sender`,
    /// `no-recipients`, `invalid-recipient`, `too-many-recipients`,
    /// `long-lines`, `bare-line-endings`, `missing-date`, `missing-message-id`.
    pub code: String,
    /// What is wrong, for a person.
    pub text: String,
}

impl Finding {
    fn reject(code: &str, text: String) -> Self {
        Finding {
            severity: Severity::Reject,
            code: code.to_string(),
            text,
        }
    }
    fn warning(code: &str, text: String) -> Self {
        Finding {
            severity: Severity::Warning,
            code: code.to_string(),
            text,
        }
    }
}

/// Check a raw pickup file. Size is checked before anything is parsed, so an
/// oversized file costs nothing more.
pub fn validate(raw: &[u8], limits: &Limits) -> Vec<Finding> {
    let size = raw.len() as u64;
    if size > limits.max_message_bytes {
        return vec![Finding::reject(
            "too-large",
            format!(
                "the message is {size} bytes; the limit is {} bytes",
                limits.max_message_bytes
            ),
        )];
    }
    let parsed = match message::parse(raw) {
        Ok(parsed) => parsed,
        Err(e) => return vec![Finding::reject("unparseable", e.to_string())],
    };
    let mut findings = Vec::new();
    match envelope::from_parsed(&parsed) {
        Err(e) => findings.push(Finding::reject(envelope_code(&e), e.to_string())),
        Ok(env) if env.recipients.len() > limits.max_recipients as usize => {
            findings.push(Finding::reject(
                "too-many-recipients",
                format!(
                    "the message has {} recipients; the limit is {}",
                    env.recipients.len(),
                    limits.max_recipients
                ),
            ))
        }
        Ok(_) => {}
    }
    let stats = &parsed.message_stats;
    if stats.long_lines > 0 {
        findings.push(Finding::warning(
            "long-lines",
            format!(
                "{} lines are longer than {MAX_LINE_LENGTH} characters (the longest has {}); they are broken before sending",
                stats.long_lines, stats.longest_line
            ),
        ));
    }
    if stats.bare_line_endings {
        findings.push(Finding::warning(
            "bare-line-endings",
            "some lines end in a bare LF or CR; they are sent as CRLF".into(),
        ));
    }
    let has = |name: &str| parsed.headers.fields.iter().any(|f| f.is(name));
    if !has("Date") {
        findings.push(Finding::warning(
            "missing-date",
            "the message has no Date header; one is added".into(),
        ));
    }
    if !has("Message-ID") {
        findings.push(Finding::warning(
            "missing-message-id",
            "the message has no Message-ID header; one is added".into(),
        ));
    }
    findings
}

fn envelope_code(e: &envelope::EnvelopeError) -> &'static str {
    use envelope::EnvelopeError::*;
    match e {
        Unparseable(_) => "unparseable",
        NoSender => "no-sender",
        InvalidSender(_) => "invalid-sender",
        NoRecipients => "no-recipients",
        InvalidRecipient(_) => "invalid-recipient",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(findings: &[Finding]) -> Vec<(&str, Severity)> {
        findings
            .iter()
            .map(|f| (f.code.as_str(), f.severity))
            .collect()
    }

    #[test]
    fn a_good_message_has_no_rejection() {
        let raw = b"From: a@x.example\r\nTo: b@y.example\r\nDate: Thu, 03 Dec 2026 17:48:57 +0000\r\nMessage-ID: <1@x.example>\r\n\r\nhi\r\n";
        assert!(validate(raw, &Limits::default()).is_empty());
    }

    #[test]
    fn size_limit_rejects_before_parsing() {
        let limits = Limits {
            max_message_bytes: 10,
            ..Limits::default()
        };
        assert_eq!(
            codes(&validate(b"\0\0 not even a message", &limits)),
            vec![("too-large", Severity::Reject)]
        );
    }

    #[test]
    fn rejections_and_warnings() {
        let got = validate(
            b"From: a@x.example\nSubject: x\n\nbody\n",
            &Limits::default(),
        );
        assert_eq!(
            codes(&got),
            vec![
                ("no-recipients", Severity::Reject),
                ("bare-line-endings", Severity::Warning),
                ("missing-date", Severity::Warning),
                ("missing-message-id", Severity::Warning),
            ]
        );
        assert_eq!(
            codes(&validate(b"hello\0", &Limits::default())),
            vec![("unparseable", Severity::Reject)]
        );
        let limits = Limits {
            max_recipients: 1,
            ..Limits::default()
        };
        let got = validate(b"From: a@x.example\r\nTo: b@y.example, c@y.example\r\nDate: x\r\nMessage-ID: <1@x>\r\n\r\n", &limits);
        assert_eq!(codes(&got), vec![("too-many-recipients", Severity::Reject)]);
    }
}

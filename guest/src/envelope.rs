//! The SMTP envelope of a pickup file.
//!
//! Precedence, as IIS, .NET and Postfix users expect:
//! 1. `x-sender:`/`x-receiver:` lines at the top of the file (IIS pickup format);
//! 2. the topmost `Resent-*` block (RFC 5322 3.6.6: a re-sending is addressed by
//!    its `Resent-` fields): `Resent-Sender` or the single `Resent-From`, and
//!    `Resent-To`, `Resent-Cc`, `Resent-Bcc`;
//! 3. `Sender:` or the single `From:` address, and `To`, `Cc`, `Bcc`.
//!
//! Recipients keep their first-seen order; duplicates (compared with the
//! domain case-folded) are dropped.

use std::fmt;

use mail_parser::HeaderName;

use crate::address::{self, AddressError};
use crate::message::{self, ParseError, Parsed};

/// Where the envelope came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    PickupLines,
    ResentHeaders,
    Headers,
}

/// The SMTP envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Reverse path; empty for the null sender.
    pub sender: String,
    /// Forward paths.
    pub recipients: Vec<String>,
    pub source: Source,
}

/// Why no envelope could be derived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    Unparseable(ParseError),
    NoSender,
    InvalidSender(String),
    NoRecipients,
    InvalidRecipient(String),
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::Unparseable(e) => write!(f, "the message cannot be parsed: {e}"),
            EnvelopeError::NoSender => f.write_str(
                "no sender: the file has no x-sender line, no Sender header and not exactly one From address",
            ),
            EnvelopeError::InvalidSender(why) => write!(f, "the sender address is not valid: {why}"),
            EnvelopeError::NoRecipients => f.write_str(
                "no recipients: the file has no x-receiver lines and no To, Cc or Bcc addresses",
            ),
            EnvelopeError::InvalidRecipient(why) => write!(f, "a recipient address is not valid: {why}"),
        }
    }
}

impl From<ParseError> for EnvelopeError {
    fn from(e: ParseError) -> Self {
        EnvelopeError::Unparseable(e)
    }
}

/// Parse `raw` and derive its envelope.
pub fn derive(raw: &[u8]) -> Result<Envelope, EnvelopeError> {
    from_parsed(&message::parse(raw)?)
}

/// Derive the envelope of an already parsed file.
pub fn from_parsed(parsed: &Parsed<'_>) -> Result<Envelope, EnvelopeError> {
    let msg = &parsed.parsed;
    let headers = |names: &[HeaderName<'static>]| -> Vec<String> {
        names
            .iter()
            .flat_map(|name| message::addresses(msg, name.clone()))
            .collect()
    };
    let pickup = parsed.pickup.clone().unwrap_or_default();
    let resent_sender = first_address(msg, HeaderName::ResentSender);
    let resent_from = first_header_addresses(msg, HeaderName::ResentFrom);

    let (sender, source) = match (&pickup.sender, resent_sender, resent_from.is_empty()) {
        (Some(sender), _, _) => (Some(sender.clone()), Source::PickupLines),
        (None, Some(sender), _) => (Some(sender), Source::ResentHeaders),
        (None, None, false) => (single(resent_from), Source::ResentHeaders),
        (None, None, true) => {
            let sender = first_address(msg, HeaderName::Sender)
                .or_else(|| single(headers(&[HeaderName::From])));
            (sender, Source::Headers)
        }
    };
    let recipients = match source {
        _ if !pickup.recipients.is_empty() => pickup.recipients,
        Source::ResentHeaders => [
            HeaderName::ResentTo,
            HeaderName::ResentCc,
            HeaderName::ResentBcc,
        ]
        .into_iter()
        .flat_map(|name| first_header_addresses(msg, name))
        .collect(),
        _ => headers(&[HeaderName::To, HeaderName::Cc, HeaderName::Bcc]),
    };

    let sender = sender.ok_or(EnvelopeError::NoSender)?;
    let sender = if sender.is_empty() {
        sender
    } else {
        address::normalize(&sender)
            .map_err(|e| EnvelopeError::InvalidSender(describe(&sender, &e)))?
    };
    let mut unique: Vec<String> = Vec::with_capacity(recipients.len());
    for recipient in recipients {
        let recipient = address::normalize(&recipient)
            .map_err(|e| EnvelopeError::InvalidRecipient(describe(&recipient, &e)))?;
        if !unique.iter().any(|seen| same_mailbox(seen, &recipient)) {
            unique.push(recipient);
        }
    }
    if unique.is_empty() {
        return Err(EnvelopeError::NoRecipients);
    }
    Ok(Envelope {
        sender,
        recipients: unique,
        source,
    })
}

fn describe(addr: &str, e: &AddressError) -> String {
    format!("\"{addr}\": {e}")
}

/// Local parts are case-sensitive in principle (RFC 5321 2.4); domains never are.
fn same_mailbox(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => la == lb && da.eq_ignore_ascii_case(db),
        _ => a == b,
    }
}

fn single(mut list: Vec<String>) -> Option<String> {
    (list.len() == 1).then(|| list.pop()).flatten()
}

fn first_address(msg: &mail_parser::Message<'_>, name: HeaderName<'static>) -> Option<String> {
    first_header_addresses(msg, name).into_iter().next()
}

/// The addresses of the topmost occurrence only: with several `Resent-` blocks,
/// the topmost is the latest re-sending.
fn first_header_addresses(
    msg: &mail_parser::Message<'_>,
    name: HeaderName<'static>,
) -> Vec<String> {
    msg.header_values(name)
        .next()
        .and_then(|value| value.as_address())
        .map(|list| {
            list.iter()
                .filter_map(|a| a.address())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickup_lines_win() {
        let env = derive(b"x-sender: s@a.example\r\nx-receiver: r@b.example\r\nFrom: other@c.example\r\nTo: t@d.example\r\n\r\nhi\r\n").unwrap();
        assert_eq!(env.sender, "s@a.example");
        assert_eq!(env.recipients, vec!["r@b.example"]);
        assert_eq!(env.source, Source::PickupLines);
    }

    #[test]
    fn headers_give_sender_and_deduplicated_recipients() {
        let env = derive(b"From: A <a@x.example>\r\nTo: b@y.example, B@Y.EXAMPLE\r\nCc: c@z.example\r\nBcc: b@y.example, d@w.example\r\n\r\n").unwrap();
        assert_eq!(env.sender, "a@x.example");
        assert_eq!(
            env.recipients,
            vec!["b@y.example", "B@Y.EXAMPLE", "c@z.example", "d@w.example"]
        );
        let env = derive(b"From: a@x.example\r\nTo: b@y.example, b@Y.example\r\n\r\n").unwrap();
        assert_eq!(env.recipients, vec!["b@y.example"]);
    }

    #[test]
    fn sender_header_beats_several_from_addresses() {
        let env = derive(
            b"From: a@x.example, b@x.example\r\nSender: s@x.example\r\nTo: t@y.example\r\n\r\n",
        )
        .unwrap();
        assert_eq!(env.sender, "s@x.example");
        assert_eq!(
            derive(b"From: a@x.example, b@x.example\r\nTo: t@y.example\r\n\r\n"),
            Err(EnvelopeError::NoSender)
        );
    }

    #[test]
    fn resent_headers_take_precedence() {
        let env = derive(
            b"Resent-From: r@new.example\r\nResent-To: n@dest.example\r\nFrom: a@x.example\r\nTo: old@y.example\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            (env.sender.as_str(), env.source),
            ("r@new.example", Source::ResentHeaders)
        );
        assert_eq!(env.recipients, vec!["n@dest.example"]);
    }

    #[test]
    fn null_sender_and_errors() {
        let env = derive(
            b"x-sender: <>\r\nx-receiver: r@b.example\r\nFrom: MAILER-DAEMON@a.example\r\n\r\n",
        )
        .unwrap();
        assert_eq!(env.sender, "");
        assert_eq!(
            derive(b"From: a@x.example\r\nSubject: none\r\n\r\n"),
            Err(EnvelopeError::NoRecipients)
        );
        assert!(matches!(
            derive(b"From: not an address\r\nTo: t@y.example\r\n\r\n"),
            Err(EnvelopeError::NoSender | EnvelopeError::InvalidSender(_))
        ));
    }
}

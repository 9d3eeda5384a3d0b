//! Mailbox addresses as SMTP paths: validation and the parts a relay needs.
//!
//! The checks follow RFC 5321 4.1.2 and 4.5.3.1 (local part at most 64 octets,
//! domain at most 255, path at most 256) and RFC 6531 for UTF-8 addresses. They
//! are deliberately stricter than what parsers accept in headers: an address
//! that reaches `MAIL FROM` or `RCPT TO` must be sendable as is.

use std::fmt;

/// Why an address cannot be used in an SMTP envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    /// Nothing but white space or angle brackets.
    Empty,
    /// No `@`, or nothing on one side of it.
    MissingAt,
    /// The local part is longer than 64 octets or holds forbidden characters.
    BadLocalPart,
    /// The domain is not a host name or an address literal.
    BadDomain,
    /// The whole path is longer than 256 octets.
    TooLong,
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressError::Empty => "the address is empty",
            AddressError::MissingAt => "the address has no local part and domain separated by @",
            AddressError::BadLocalPart => {
                "the part before @ is too long or holds characters SMTP forbids"
            }
            AddressError::BadDomain => "the part after @ is not a valid domain name",
            AddressError::TooLong => "the address is longer than the 256 octets SMTP allows",
        })
    }
}

/// Strip white space and one pair of angle brackets, then validate.
pub fn normalize(raw: &str) -> Result<String, AddressError> {
    let trimmed = raw.trim();
    let inner = trimmed
        .strip_prefix('<')
        .and_then(|rest| rest.strip_suffix('>'))
        .unwrap_or(trimmed)
        .trim();
    if inner.is_empty() {
        return Err(AddressError::Empty);
    }
    validate(inner)?;
    Ok(inner.to_string())
}

/// Check that `addr` (no angle brackets) can be sent as an SMTP path.
pub fn validate(addr: &str) -> Result<(), AddressError> {
    if addr.len() > 254 {
        return Err(AddressError::TooLong);
    }
    let (local, domain) = addr.rsplit_once('@').ok_or(AddressError::MissingAt)?;
    if local.is_empty() || domain.is_empty() {
        return Err(AddressError::MissingAt);
    }
    if !valid_local_part(local) {
        return Err(AddressError::BadLocalPart);
    }
    if !valid_domain(domain) {
        return Err(AddressError::BadDomain);
    }
    Ok(())
}

fn valid_local_part(local: &str) -> bool {
    if local.len() > 64 {
        return false;
    }
    if let Some(quoted) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        return quoted.chars().all(|c| c != '\r' && c != '\n' && c != '\0');
    }
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| c == '.' || atext(c))
}

/// A host name (ASCII or UTF-8 labels) or an address literal such as `[192.0.2.1]`.
pub fn valid_domain(domain: &str) -> bool {
    if domain.len() > 255 {
        return false;
    }
    if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        let ip = literal.strip_prefix("IPv6:").unwrap_or(literal);
        return ip.parse::<std::net::IpAddr>().is_ok();
    }
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    !domain.is_empty()
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        })
}

/// The domain of a valid address, lowercased so that routing groups match.
pub fn domain_of(addr: &str) -> Option<String> {
    addr.rsplit_once('@')
        .map(|(_, domain)| domain.trim_end_matches('.').to_lowercase())
}

/// UTF-8 in an address needs the SMTPUTF8 extension (RFC 6531).
pub fn needs_smtputf8(addr: &str) -> bool {
    !addr.is_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_and_bracketed_addresses() {
        assert_eq!(
            normalize(" <a.b+c@example.com> ").unwrap(),
            "a.b+c@example.com"
        );
        assert_eq!(normalize("user@[127.0.0.1]").unwrap(), "user@[127.0.0.1]");
        assert_eq!(
            normalize("\"odd user\"@example.com").unwrap(),
            "\"odd user\"@example.com"
        );
        assert_eq!(
            normalize("jörg@bücher.example").unwrap(),
            "jörg@bücher.example"
        );
    }

    #[test]
    fn rejects_what_smtp_cannot_carry() {
        assert_eq!(normalize("<>"), Err(AddressError::Empty));
        assert_eq!(normalize("no-at-sign"), Err(AddressError::MissingAt));
        assert_eq!(normalize("@example.com"), Err(AddressError::MissingAt));
        assert_eq!(
            normalize("a b@example.com"),
            Err(AddressError::BadLocalPart)
        );
        assert_eq!(
            normalize("a..b@example.com"),
            Err(AddressError::BadLocalPart)
        );
        assert_eq!(
            normalize(&format!("{}@example.com", "x".repeat(65))),
            Err(AddressError::BadLocalPart)
        );
        assert_eq!(normalize("a@-bad-.com"), Err(AddressError::BadDomain));
        assert_eq!(normalize("a@exa mple.com"), Err(AddressError::BadDomain));
        assert_eq!(normalize("a@[not-an-ip]"), Err(AddressError::BadDomain));
    }

    #[test]
    fn domain_is_lowercased_for_grouping() {
        assert_eq!(
            domain_of("Bob@Example.COM.").as_deref(),
            Some("example.com")
        );
        assert!(needs_smtputf8("jörg@example.com"));
        assert!(!needs_smtputf8("joerg@example.com"));
    }
}

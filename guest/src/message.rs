//! The raw message: pickup envelope lines, line statistics, the header
//! section, and the summary the plug-in world returns.
//!
//! Everything here works on bytes that came from a file an application
//! dropped, so nothing indexes or unwraps: malformed input becomes a
//! [`ParseError`] or is tolerated the way Postfix's cleanup tolerates it.

use std::fmt;

use mail_parser::{HeaderName, MessageParser};

use crate::address;

/// RFC 5322 2.1.1: at most 998 characters on a line, CRLF excluded.
pub const MAX_LINE_LENGTH: usize = 998;

/// Why a message could not be parsed at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The file is empty or holds only white space.
    Empty,
    /// A NUL byte at this offset.
    NulByte(u64),
    /// The file does not start with a header field.
    NoHeaders,
    /// A pickup `x-sender:`/`x-receiver:` line whose value is not an address.
    BadPickupLine(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Empty => f.write_str("the file is empty"),
            ParseError::NulByte(offset) => write!(f, "the file contains a NUL byte at offset {offset}; mail may not contain NUL bytes"),
            ParseError::NoHeaders => f.write_str("the file does not start with a header field such as \"From: ...\", so it is not an RFC 5322 message"),
            ParseError::BadPickupLine(line) => write!(f, "the pickup envelope line \"{line}\" does not hold a valid address"),
        }
    }
}

/// The envelope written by IIS, CDOSYS and .NET `SmtpClient` at the top of a pickup file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PickupEnvelope {
    /// `x-sender:`; `Some("")` is the null sender.
    pub sender: Option<String>,
    /// One `x-receiver:` line per recipient.
    pub recipients: Vec<String>,
}

/// Iterates lines, yielding (content without line ending, whole line).
/// A line ends at CRLF, a bare LF or a bare CR.
pub struct Lines<'a> {
    rest: &'a [u8],
}

/// The lines of `bytes`.
pub fn lines(bytes: &[u8]) -> Lines<'_> {
    Lines { rest: bytes }
}

impl<'a> Iterator for Lines<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = self.rest;
        // Whole words of ordinary text first, then the bytes of the word
        // that holds the line ending.
        let skipped = ordinary_prefix(rest, false, false);
        let ending = rest
            .get(skipped..)
            .unwrap_or_default()
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .map(|p| skipped + p);
        let (content_len, ending_len) = match ending {
            None => (rest.len(), 0),
            Some(i) => match (rest.get(i), rest.get(i + 1)) {
                (Some(b'\r'), Some(b'\n')) => (i, 2),
                _ => (i, 1),
            },
        };
        let (line, tail) = rest.split_at(content_len + ending_len);
        self.rest = tail;
        Some((line.get(..content_len).unwrap_or(line), line))
    }
}

/// Split the pickup envelope lines off the top of a file.
pub fn split_pickup_lines(raw: &[u8]) -> Result<(Option<PickupEnvelope>, &[u8]), ParseError> {
    let mut envelope = PickupEnvelope::default();
    let mut seen = false;
    let mut consumed = 0;
    for (content, whole) in lines(raw) {
        // Look at the name as bytes first: every file has at least one line
        // that is not a pickup line, and it needs no copy to say so.
        let Some(colon) = content.iter().position(|&b| b == b':') else {
            break;
        };
        let name = content.get(..colon).unwrap_or_default().trim_ascii();
        let is_sender = name.eq_ignore_ascii_case(b"x-sender");
        if !is_sender && !name.eq_ignore_ascii_case(b"x-receiver") {
            break;
        }
        let text = String::from_utf8_lossy(content);
        let value = text.split_once(':').map_or("", |(_, value)| value.trim());
        let bad = || ParseError::BadPickupLine(text.trim().to_string());
        if is_sender {
            envelope.sender = Some(if value == "<>" {
                String::new()
            } else {
                address::normalize(value).map_err(|_| bad())?
            });
        } else {
            envelope
                .recipients
                .push(address::normalize(value).map_err(|_| bad())?);
        }
        seen = true;
        consumed += whole.len();
    }
    let rest = raw.get(consumed..).unwrap_or_default();
    Ok((seen.then_some(envelope), rest))
}

/// Properties of the lines of a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineStats {
    /// Lines longer than [`MAX_LINE_LENGTH`].
    pub long_lines: u32,
    /// The longest line, without its ending.
    pub longest_line: u32,
    /// Some line ends in a bare LF or CR.
    pub bare_line_endings: bool,
    /// Some byte has the high bit set.
    pub has_eight_bit: bool,
    /// Offset of the first NUL byte.
    pub first_nul: Option<u64>,
}

impl LineStats {
    /// The stats of these lines followed by `next`'s, which start at
    /// `offset`, on a line boundary.
    pub fn followed_by(&self, next: &LineStats, offset: usize) -> LineStats {
        LineStats {
            long_lines: self.long_lines.saturating_add(next.long_lines),
            longest_line: self.longest_line.max(next.longest_line),
            bare_line_endings: self.bare_line_endings || next.bare_line_endings,
            has_eight_bit: self.has_eight_bit || next.has_eight_bit,
            first_nul: self
                .first_nul
                .or_else(|| next.first_nul.map(|n| n.saturating_add(offset as u64))),
        }
    }
}

/// Scan every line once, eight bytes at a time.
///
/// Every message passes through here at pickup and again before sending,
/// so this is the hottest loop of the component. A byte-at-a-time loop is
/// vectorised natively but not for WebAssembly, where it took half of the
/// parse time; words of eight bytes skip the ordinary text between line
/// endings in both.
pub fn line_stats(bytes: &[u8]) -> LineStats {
    let mut stats = LineStats::default();
    let mut line_start = 0;
    let mut i = 0;
    let end_line = |stats: &mut LineStats, len: usize| {
        stats.longest_line = stats
            .longest_line
            .max(u32::try_from(len).unwrap_or(u32::MAX));
        if len > MAX_LINE_LENGTH {
            stats.long_lines = stats.long_lines.saturating_add(1);
        }
    };
    while i < bytes.len() {
        let rest = bytes.get(i..).unwrap_or_default();
        i += ordinary_prefix(rest, !stats.has_eight_bit, stats.first_nul.is_none());
        let Some(&byte) = bytes.get(i) else {
            break;
        };
        match byte {
            b'\r' | b'\n' => {
                end_line(&mut stats, i - line_start);
                let crlf = byte == b'\r' && bytes.get(i + 1) == Some(&b'\n');
                stats.bare_line_endings |= !crlf;
                i += if crlf { 2 } else { 1 };
                line_start = i;
            }
            0 => {
                stats.first_nul.get_or_insert(i as u64);
                i += 1;
            }
            b if b >= 0x80 => {
                stats.has_eight_bit = true;
                i += 1;
            }
            _ => i += 1,
        }
    }
    if line_start < bytes.len() {
        end_line(&mut stats, bytes.len() - line_start);
    }
    stats
}

/// How many bytes at the start of `bytes` hold no line ending, no NUL when
/// `nul`, and no 8-bit byte when `high`: the ordinary text [`line_stats`]
/// may skip, a word of eight bytes at a time. The lowest bit [`has_byte`]
/// sets is exact, so the word with a special byte says where it is; the
/// last bytes, short of a word, are left to the caller.
fn ordinary_prefix(bytes: &[u8], high: bool, nul: bool) -> usize {
    let mut skipped = 0;
    let high = if high { HIGH_BITS } else { 0 };
    for word in bytes.chunks_exact(8) {
        let word = u64::from_le_bytes(<[u8; 8]>::try_from(word).unwrap_or([b'\n'; 8]));
        let special = (word & high)
            | has_byte(word, b'\n')
            | has_byte(word, b'\r')
            | if nul { has_byte(word, 0) } else { 0 };
        if special != 0 {
            return skipped + (special.trailing_zeros() / 8) as usize;
        }
        skipped += 8;
    }
    skipped
}

/// Offset of the first NUL byte, eight bytes at a time (see [`line_stats`]).
pub fn find_nul(bytes: &[u8]) -> Option<usize> {
    let mut words = bytes.chunks_exact(8);
    let mut offset = 0;
    for word in words.by_ref() {
        let value = u64::from_le_bytes(<[u8; 8]>::try_from(word).unwrap_or([1; 8]));
        if has_byte(value, 0) != 0 {
            break;
        }
        offset += 8;
    }
    let rest = bytes.get(offset..).unwrap_or_default();
    rest.iter().position(|&b| b == 0).map(|p| offset + p)
}

/// The high bit of every byte of a word.
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Non-zero when some byte of `word` is `byte`: the high bit of the first
/// such byte (the lowest) is set, exactly; bits above it may be set too.
fn has_byte(word: u64, byte: u8) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let x = word ^ (ONES * u64::from(byte));
    x.wrapping_sub(ONES) & !x & HIGH_BITS
}

/// One header field, folded lines included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    /// The field name as written.
    pub name: &'a str,
    /// The field as written: its first line and the folded lines after it,
    /// with their original line endings.
    pub raw: &'a [u8],
}

impl Field<'_> {
    /// Case-insensitive name comparison.
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// The header section of a message and where the body starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderSection<'a> {
    /// The fields in order.
    pub fields: Vec<Field<'a>>,
    /// Offset of the first body byte.
    pub body_start: usize,
    /// The header ended with an empty line (otherwise the body started at a
    /// line that is not a field, and a separator must be written).
    pub has_separator: bool,
}

fn field_name(line: &[u8]) -> Option<&str> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = line.get(..colon)?;
    let name = std::str::from_utf8(name)
        .ok()?
        .trim_end_matches([' ', '\t']);
    let valid = !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b));
    valid.then_some(name)
}

/// Split the header section into fields, the way Postfix's cleanup reads it:
/// it ends at the first empty line, or at the first line that is neither a
/// field nor a continuation (that line starts the body).
pub fn header_section(message: &[u8]) -> Result<HeaderSection<'_>, ParseError> {
    // Most messages have a few dozen fields: start with room for them.
    let mut fields: Vec<Field<'_>> = Vec::with_capacity(32);
    let mut offset = 0;
    for (content, whole) in lines(message) {
        let end = offset + whole.len();
        if content.is_empty() {
            return finish(fields, end, true);
        }
        let continuation = matches!(content.first(), Some(b' ' | b'\t'));
        match (continuation, fields.last_mut(), field_name(content)) {
            // A folded line follows its field directly, so the field grows
            // to the end of it.
            (true, Some(field), _) => {
                let start = offset - field.raw.len();
                field.raw = message.get(start..end).unwrap_or(field.raw);
            }
            (false, _, Some(name)) => fields.push(Field { name, raw: whole }),
            _ => return finish(fields, offset, false),
        }
        offset = end;
    }
    finish(fields, offset, false)
}

fn finish(
    fields: Vec<Field<'_>>,
    body_start: usize,
    has_separator: bool,
) -> Result<HeaderSection<'_>, ParseError> {
    if fields.is_empty() {
        return Err(ParseError::NoHeaders);
    }
    Ok(HeaderSection {
        fields,
        body_start,
        has_separator,
    })
}

/// What a message says about itself (the WIT `message-summary`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub from: Vec<String>,
    pub sender: Option<String>,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    pub subject: Option<String>,
    pub message_id: Option<String>,
    pub date: Option<String>,
    pub size: u64,
    pub header_bytes: u64,
    pub has_eight_bit: bool,
    pub has_utf8_headers: bool,
    pub long_lines: u32,
    pub longest_line: u32,
    pub bare_line_endings: bool,
    pub has_pickup_envelope: bool,
}

/// A parsed file: the pickup envelope, the message proper and its headers.
pub struct Parsed<'a> {
    /// The `x-sender`/`x-receiver` lines, when present.
    pub pickup: Option<PickupEnvelope>,
    /// The message after the pickup lines.
    pub message: &'a [u8],
    /// Its header section.
    pub headers: HeaderSection<'a>,
    /// Its header section as mail-parser reads it.
    pub parsed: mail_parser::Message<'a>,
    /// The lines of the whole file.
    pub file_stats: LineStats,
    /// The lines of the message proper (after the pickup lines).
    pub message_stats: LineStats,
}

/// Parse a raw pickup file: reject empty files and NUL bytes, split the
/// pickup lines, find the header section and parse it.
pub fn parse(raw: &[u8]) -> Result<Parsed<'_>, ParseError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(ParseError::Empty);
    }
    // One pass over the message finds NUL bytes and describes the lines for
    // both the summary and validation: the file is the pickup lines (short,
    // ending where the message starts) followed by the message.
    let (pickup, message) = match split_pickup_lines(raw) {
        Ok(split) => split,
        Err(e) => {
            return Err(match find_nul(raw) {
                Some(offset) => ParseError::NulByte(offset as u64),
                None => e,
            });
        }
    };
    let pickup_bytes = raw.get(..raw.len() - message.len()).unwrap_or_default();
    let message_stats = line_stats(message);
    let file_stats = line_stats(pickup_bytes).followed_by(&message_stats, pickup_bytes.len());
    if let Some(offset) = file_stats.first_nul {
        return Err(ParseError::NulByte(offset));
    }
    let headers = header_section(message)?;
    let header_bytes = message.get(..headers.body_start).unwrap_or(message);
    let parsed = MessageParser::new()
        .parse_headers(header_bytes)
        .ok_or(ParseError::NoHeaders)?;
    Ok(Parsed {
        pickup,
        message,
        headers,
        parsed,
        file_stats,
        message_stats,
    })
}

/// Every address in every occurrence of a header.
pub fn addresses(message: &mail_parser::Message<'_>, name: HeaderName<'static>) -> Vec<String> {
    message
        .header_values(name)
        .filter_map(|value| value.as_address())
        .flat_map(|list| list.iter())
        .filter_map(|addr| addr.address())
        .map(str::to_string)
        .collect()
}

/// Build the summary of a raw file.
pub fn summarize(raw: &[u8]) -> Result<Summary, ParseError> {
    let parsed = parse(raw)?;
    let stats = &parsed.file_stats;
    let header_bytes = parsed
        .message
        .get(..parsed.headers.body_start)
        .unwrap_or_default();
    let message = &parsed.parsed;
    Ok(Summary {
        from: addresses(message, HeaderName::From),
        sender: addresses(message, HeaderName::Sender).into_iter().next(),
        to: addresses(message, HeaderName::To),
        cc: addresses(message, HeaderName::Cc),
        bcc: addresses(message, HeaderName::Bcc),
        subject: message.subject().map(str::to_string),
        message_id: message.message_id().map(str::to_string),
        date: message
            .header_raw(HeaderName::Date)
            .map(|d| d.trim().to_string()),
        size: raw.len() as u64,
        header_bytes: header_bytes.len() as u64,
        has_eight_bit: stats.has_eight_bit,
        has_utf8_headers: !header_bytes.is_ascii(),
        long_lines: stats.long_lines,
        longest_line: stats.longest_line,
        bare_line_endings: stats.bare_line_endings,
        has_pickup_envelope: parsed.pickup.is_some(),
    })
}

/// Rewrite every line ending as CRLF, and break lines longer than 998
/// characters (RFC 5322 2.1.1) by inserting CRLF and a space, as Postfix's
/// `smtp_line_length_limit` does: in a header that is folding, and in a body
/// it is the least damage a line can take. UTF-8 sequences are never split.
pub fn to_crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 50 + 2);
    for (content, _) in lines(bytes) {
        let mut rest = content;
        let mut limit = MAX_LINE_LENGTH;
        while rest.len() > limit {
            let mut cut = limit;
            // Back off to the start of a UTF-8 sequence.
            while cut > 1 && rest.get(cut).is_some_and(|b| b & 0xC0 == 0x80) {
                cut -= 1;
            }
            let (head, tail) = rest.split_at(cut);
            out.extend_from_slice(head);
            out.extend_from_slice(b"\r\n ");
            rest = tail;
            // The continuation line starts with the inserted space.
            limit = MAX_LINE_LENGTH - 1;
        }
        out.extend_from_slice(rest);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_on_every_kind_of_ending() {
        let got: Vec<_> = lines(b"a\r\nb\nc\rd").map(|(c, _)| c.to_vec()).collect();
        assert_eq!(
            got,
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]
        );
    }

    #[test]
    fn pickup_lines_are_split_off() {
        let raw = b"x-sender: <a@example.com>\r\nX-Receiver: b@example.org\r\nx-receiver: c@example.net\r\nFrom: a@example.com\r\n\r\nbody\r\n";
        let (env, rest) = split_pickup_lines(raw).unwrap();
        let env = env.unwrap();
        assert_eq!(env.sender.as_deref(), Some("a@example.com"));
        assert_eq!(env.recipients, vec!["b@example.org", "c@example.net"]);
        assert!(rest.starts_with(b"From:"));
    }

    #[test]
    fn bad_pickup_line_is_an_error() {
        assert!(matches!(
            split_pickup_lines(b"x-receiver: nobody\r\n\r\n"),
            Err(ParseError::BadPickupLine(_))
        ));
    }

    #[test]
    fn header_section_handles_folding_and_missing_separator() {
        let section =
            header_section(b"Subject: a\r\n  b\r\nTo: x@y.z\r\nnot a header\r\nmore").unwrap();
        assert_eq!(section.fields.len(), 2);
        assert_eq!(section.fields[0].raw, b"Subject: a\r\n  b\r\n");
        assert_eq!(section.fields[1].raw, b"To: x@y.z\r\n");
        assert!(!section.has_separator);
        assert_eq!(section.body_start, 28);
        assert_eq!(header_section(b"just text\n"), Err(ParseError::NoHeaders));
    }

    #[test]
    fn summary_takes_every_address_field_in_order() {
        let raw = b"To: a@x.example, Group: b@x.example, c@x.example;\r\nSender: s1@x.example\r\nFrom: f@x.example\r\nCc: d@x.example\r\nTo: e@x.example\r\nSender: s2@x.example\r\nBcc: g@x.example\r\nSubject: one\r\nSubject: two\r\n\r\n";
        let summary = summarize(raw).unwrap();
        assert_eq!(
            summary.to,
            ["a@x.example", "b@x.example", "c@x.example", "e@x.example"]
        );
        assert_eq!(summary.from, ["f@x.example"]);
        assert_eq!(summary.cc, ["d@x.example"]);
        assert_eq!(summary.bcc, ["g@x.example"]);
        assert_eq!(summary.sender.as_deref(), Some("s1@x.example"));
        // As mail-parser reads a repeated unstructured field: the last one.
        assert_eq!(summary.subject.as_deref(), Some("two"));
    }

    #[test]
    fn summary_reports_what_a_relay_needs() {
        let raw = "From: A <a@example.com>\nTo: b@example.org, c@example.org\nBcc: d@example.net\nSubject: h\u{e9}llo\n\nbody\r\n";
        let s = summarize(raw.as_bytes()).unwrap();
        assert_eq!(s.from, vec!["a@example.com"]);
        assert_eq!(s.to, vec!["b@example.org", "c@example.org"]);
        assert_eq!(s.bcc, vec!["d@example.net"]);
        assert!(s.has_eight_bit && s.has_utf8_headers && s.bare_line_endings);
        assert_eq!(s.subject.as_deref(), Some("h\u{e9}llo"));
    }

    #[test]
    fn stats_of_two_parts_add_up_to_the_whole() {
        let head: &[u8] = b"x-sender: a@b.c\nx-receiver: \xe9@b.c\r\n";
        for tail in [
            &b"From: a@b.c\r\n\r\nbody\r\n"[..],
            b"From: a@b.c\n\nx\0y\n",
            &[b'z'; 1200],
        ] {
            let whole = [head, tail].concat();
            assert_eq!(
                line_stats(head).followed_by(&line_stats(tail), head.len()),
                line_stats(&whole)
            );
        }
    }

    #[test]
    fn nul_and_empty_are_refused() {
        assert_eq!(summarize(b"").unwrap_err(), ParseError::Empty);
        assert_eq!(
            summarize(b"From: a@b.c\r\n\r\nx\0y").unwrap_err(),
            ParseError::NulByte(16)
        );
        assert_eq!(
            summarize(b"x-sender: a@b.c\r\nFrom: a@b.c\r\n\r\nx\0y").unwrap_err(),
            ParseError::NulByte(33)
        );
        assert_eq!(
            summarize(b"x-sender: a\0@b.c\r\nFrom: a@b.c\r\n\r\nx").unwrap_err(),
            ParseError::NulByte(11)
        );
    }

    /// The definition `line_stats` must agree with: the lines of [`lines`].
    fn line_stats_by_lines(bytes: &[u8]) -> LineStats {
        let mut stats = LineStats {
            has_eight_bit: !bytes.is_ascii(),
            first_nul: bytes.iter().position(|&b| b == 0).map(|p| p as u64),
            ..LineStats::default()
        };
        for (content, whole) in lines(bytes) {
            let len = u32::try_from(content.len()).unwrap();
            stats.longest_line = stats.longest_line.max(len);
            if content.len() > MAX_LINE_LENGTH {
                stats.long_lines += 1;
            }
            let ending = &whole[content.len()..];
            stats.bare_line_endings |= ending == b"\n" || ending == b"\r";
        }
        stats
    }

    #[test]
    fn line_stats_agree_with_the_lines() {
        // Inputs built from the bytes that matter, at every alignment.
        let pieces: [&[u8]; 8] = [
            b"\r\n",
            b"\n",
            b"\r",
            b"\0",
            "\u{e9}".as_bytes(),
            b"abcdefg",
            b"x",
            &[b'y'; 1001],
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..5_000 {
            let mut input = Vec::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut state = seed;
            for _ in 0..(state % 24) {
                input.extend_from_slice(pieces[(state % 8) as usize]);
                state = state.rotate_right(3).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            }
            let stats = line_stats(&input);
            assert_eq!(stats, line_stats_by_lines(&input), "{input:?}");
            assert_eq!(find_nul(&input).map(|p| p as u64), stats.first_nul);
        }
    }

    #[test]
    fn long_lines_are_counted() {
        let mut raw = b"From: a@b.c\r\n\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'x', 1200));
        raw.extend_from_slice(b"\r\n");
        let stats = line_stats(&raw);
        assert_eq!((stats.long_lines, stats.longest_line), (1, 1200));
    }

    #[test]
    fn long_lines_are_broken_never_longer_than_998() {
        let mut raw = "é".repeat(1000).into_bytes(); // 2,000 bytes of two-byte characters
        raw.extend_from_slice(b"\n");
        let out = to_crlf(&raw);
        let text = String::from_utf8(out.clone()).expect("UTF-8 stays whole");
        assert!(lines(&out).all(|(content, _)| content.len() <= MAX_LINE_LENGTH));
        assert_eq!(text.replace("\r\n ", "").trim_end(), "é".repeat(1000));
        assert_eq!(line_stats(&out).long_lines, 0);
    }

    #[test]
    fn crlf_normalisation() {
        assert_eq!(to_crlf(b"a\nb\r\nc\rd"), b"a\r\nb\r\nc\r\nd\r\n");
    }
}

//! The SMTP client stage (Postfix's `smtp`): deliver one message to the
//! recipients of one destination, trying its hosts in order.
//!
//! A session is opened per address (connect, greeting, EHLO or HELO,
//! STARTTLS as the route's TLS mode asks, AUTH when the route has
//! credentials) and then carries as many transactions as the recipient list
//! needs, at most `max_recipients_per_transaction` recipients each.

use std::cell::RefCell;

use crate::message;
use crate::relay::{Capabilities, Level, Options, RecipientOutcome, RecipientResult, Timeouts};
use crate::route::{AddressAnswer, Credentials, Failure, TlsMode};
use crate::smtp::{self, Connection, DialogueError, Extensions, Reply, ReplyReader};

/// Where one domain's mail goes: the hosts and how to talk to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub domain: String,
    pub hosts: Vec<String>,
    pub port: u16,
    pub tls: TlsMode,
    pub credentials: Option<Credentials>,
    /// The domain had no MX: a missing address means the domain is unusable.
    pub implicit_mx: bool,
}

/// Most sessions kept open between messages; the host allows 32 connections
/// per call.
const MAX_IDLE_SESSIONS: usize = 8;

/// What makes an open session reusable for another message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SessionKey {
    address: String,
    port: u16,
    tls: TlsMode,
    username: Option<String>,
}

/// Sessions left open after a transaction, for the next message to the same
/// host (Postfix's connection cache). Close them with [`Sessions::close_all`].
pub struct Sessions<C: Connection> {
    idle: Vec<(SessionKey, Session<C>)>,
}

impl<C: Connection> Default for Sessions<C> {
    fn default() -> Self {
        Sessions { idle: Vec::new() }
    }
}

impl<C: Connection> Sessions<C> {
    /// An open session for `key`, checked alive with RSET.
    async fn take(&mut self, key: &SessionKey) -> Option<Session<C>> {
        let position = self.idle.iter().position(|(k, _)| k == key)?;
        let (_, mut session) = self.idle.swap_remove(position);
        let timeout = session.timeouts.mail;
        match session.exchange("RSET", b"RSET\r\n", timeout).await {
            Ok(reply) if reply.is_positive() => Some(session),
            _ => None,
        }
    }

    async fn keep(&mut self, key: SessionKey, session: Session<C>) {
        if self.idle.len() >= MAX_IDLE_SESSIONS {
            let (_, oldest) = self.idle.remove(0);
            oldest.quit();
        }
        self.idle.push((key, session));
    }

    /// QUIT every idle session.
    pub fn close_all(self) {
        for (_, session) in self.idle {
            session.quit();
        }
    }
}

/// An outcome for `recipient` that is a failure.
pub fn not_delivered(
    recipient: &str,
    failure: &Failure,
    remote_mta: Option<&str>,
) -> RecipientOutcome {
    RecipientOutcome {
        recipient: recipient.to_string(),
        result: RecipientResult::NotDelivered(failure.clone()),
        remote_mta: remote_mta.map(str::to_string),
    }
}

/// Try the hosts of `target` in order until every recipient has a final
/// answer; recipients that only got temporary failures move on to the next host.
///
/// `caps` is shared with the other destinations of the call, which run
/// while this one waits on its server: it is never borrowed across an `.await`.
pub async fn deliver_to_target<C: Capabilities>(
    caps: &RefCell<&mut C>,
    sessions: &mut Sessions<C::Conn>,
    target: &Target,
    sender: &str,
    recipients: &[String],
    message: &[u8],
    options: &Options,
) -> Vec<RecipientOutcome> {
    let unreachable = Failure::temporary(
        "4.4.1",
        format!("no host for {} could be reached", target.domain),
    );
    let mut done: Vec<RecipientOutcome> = Vec::new();
    let mut pending: Vec<RecipientOutcome> = recipients
        .iter()
        .map(|r| not_delivered(r, &unreachable, None))
        .collect();
    'hosts: for host in &target.hosts {
        let answer = caps.borrow_mut().lookup_ip(host);
        let addresses = match answer {
            AddressAnswer::Addresses(list) if !list.is_empty() => list,
            AddressAnswer::Addresses(_) | AddressAnswer::NoRecords => {
                set_failure(
                    &mut pending,
                    &Failure::temporary("4.4.3", format!("{host} has no A or AAAA record")),
                    None,
                );
                continue;
            }
            AddressAnswer::NxDomain if target.implicit_mx => {
                let failure = Failure::permanent(
                    "5.1.2",
                    format!(
                        "the domain {} has neither MX nor address records",
                        target.domain
                    ),
                );
                set_failure(&mut pending, &failure, None);
                done.append(&mut pending);
                break;
            }
            AddressAnswer::NxDomain => {
                set_failure(
                    &mut pending,
                    &Failure::temporary("4.4.3", format!("the host {host} does not exist")),
                    None,
                );
                continue;
            }
            AddressAnswer::Temporary(why) => {
                let failure =
                    Failure::temporary("4.4.3", format!("address lookup for {host} failed: {why}"));
                set_failure(&mut pending, &failure, None);
                continue;
            }
        };
        for address in addresses {
            let remote = format!("{host} [{address}]");
            let key = SessionKey {
                address: address.clone(),
                port: target.port,
                tls: target.tls,
                username: target.credentials.as_ref().map(|c| c.username.clone()),
            };
            let session = match sessions.take(&key).await {
                Some(session) => Ok(session),
                None => open_session(caps, &address, host, target, options, true).await,
            };
            let session = match session {
                Err(Opening::TlsHandshake(failure)) if target.tls == TlsMode::Opportunistic => {
                    // Opportunistic TLS may fall back to plain text: nothing was sent yet.
                    caps.borrow_mut().log(
                        Level::Info,
                        &format!("{remote}: {}; retrying without TLS", failure.text),
                    );
                    open_session(caps, &address, host, target, options, false).await
                }
                other => other,
            };
            let mut session = match session {
                Ok(session) => session,
                Err(Opening::Failed(failure) | Opening::TlsHandshake(failure)) => {
                    caps.borrow_mut()
                        .log(Level::Info, &format!("{remote}: {}", failure.text));
                    set_failure(&mut pending, &failure, Some(host));
                    continue;
                }
            };
            let offered: Vec<String> = pending.iter().map(|o| o.recipient.clone()).collect();
            let chunk_size = options.max_recipients_per_transaction.max(1) as usize;
            let mut results: Vec<RecipientResult> = Vec::with_capacity(offered.len());
            let mut healthy = true;
            for (index, chunk) in offered.chunks(chunk_size).enumerate() {
                if index > 0 {
                    // A refused transaction may still be open: start clean.
                    let _ = session
                        .exchange("RSET", b"RSET\r\n", options.timeouts.mail)
                        .await;
                }
                match send_transaction(&mut session, sender, chunk, message, options).await {
                    Ok(chunk_results) => results.extend(chunk_results),
                    Err(failure) => {
                        caps.borrow_mut()
                            .log(Level::Info, &format!("{remote}: {}", failure.text));
                        let left = offered.len() - results.len();
                        results.extend(std::iter::repeat_n(
                            RecipientResult::NotDelivered(failure),
                            left,
                        ));
                        healthy = false;
                        break;
                    }
                }
            }
            if healthy {
                sessions.keep(key, session).await;
            } else {
                session.quit();
            }
            for (outcome, result) in pending.iter_mut().zip(results) {
                outcome.result = result;
                outcome.remote_mta = Some(host.clone());
            }
            let (finished, retry): (Vec<_>, Vec<_>) =
                pending.into_iter().partition(|o| match &o.result {
                    RecipientResult::Delivered(_) => true,
                    RecipientResult::NotDelivered(f) => f.permanent,
                });
            for outcome in &finished {
                log_outcome(caps, outcome, &remote);
            }
            done.extend(finished);
            pending = retry;
            if pending.is_empty() {
                break 'hosts;
            }
            // Temporary failures go on to the next host, not the next
            // address of the one that just answered.
            continue 'hosts;
        }
    }
    done.extend(pending);
    done.sort_by_key(|o| {
        recipients
            .iter()
            .position(|r| *r == o.recipient)
            .unwrap_or(usize::MAX)
    });
    done
}

fn set_failure(pending: &mut [RecipientOutcome], failure: &Failure, remote: Option<&str>) {
    for outcome in pending {
        outcome.result = RecipientResult::NotDelivered(failure.clone());
        outcome.remote_mta = remote.map(str::to_string).or(outcome.remote_mta.take());
    }
}

fn log_outcome<C: Capabilities>(caps: &RefCell<&mut C>, outcome: &RecipientOutcome, remote: &str) {
    let line = match &outcome.result {
        RecipientResult::Delivered(reply) => format!(
            "to=<{}> relay={remote} status=sent ({reply})",
            outcome.recipient
        ),
        RecipientResult::NotDelivered(f) => format!(
            "to=<{}> relay={remote} status=bounced ({})",
            outcome.recipient, f.text
        ),
    };
    caps.borrow_mut().log(Level::Info, &line);
}

/// A failed exchange: 4xx and broken connections are temporary, 5xx permanent.
fn reply_failure(stage: &str, reply: &Reply) -> Failure {
    let text = format!("{stage}: {reply}");
    if reply.is_permanent() {
        Failure::permanent(&reply.status(), text)
    } else {
        Failure::temporary(&transient_status(reply), text)
    }
}

/// A status for a reply treated as temporary: its own 4.x.x, a 5.x.x made
/// 4.x.x, or 4.5.0 (protocol error) for a reply that was not an error at all.
fn transient_status(reply: &Reply) -> String {
    let status = reply.status();
    match status.split_once('.') {
        Some(("4", _)) => status,
        Some(("5", rest)) => format!("4.{rest}"),
        _ => "4.5.0".to_string(),
    }
}

fn dialogue_failure(stage: &str, e: &DialogueError) -> Failure {
    Failure::temporary("4.4.2", format!("{stage}: {e}"))
}

/// Why a session could not be opened.
enum Opening {
    Failed(Failure),
    /// The TLS handshake failed: the connection is gone, but nothing was sent.
    TlsHandshake(Failure),
}

/// One connection with its reply buffer and what the server offered.
struct Session<C: Connection> {
    conn: C,
    reader: ReplyReader,
    extensions: Extensions,
    host: String,
    tls_active: bool,
    timeouts: Timeouts,
}

impl<C: Connection> Session<C> {
    /// Send `command` (nothing when empty) and read the reply.
    async fn exchange(
        &mut self,
        stage: &str,
        command: &[u8],
        timeout: u32,
    ) -> Result<Reply, Failure> {
        if !command.is_empty() {
            self.conn
                .send(command, timeout)
                .map_err(|e| dialogue_failure(stage, &DialogueError::Socket(e)))?;
        }
        self.reader
            .read(&mut self.conn, timeout)
            .await
            .map_err(|e| dialogue_failure(stage, &e))
    }

    /// EHLO, or HELO when EHLO is refused.
    async fn hello(&mut self, hostname: &str) -> Result<(), Failure> {
        let timeout = self.timeouts.mail;
        let ehlo = self
            .exchange("EHLO", format!("EHLO {hostname}\r\n").as_bytes(), timeout)
            .await?;
        if ehlo.is_positive() {
            self.extensions = Extensions::from_ehlo(&ehlo);
            return Ok(());
        }
        let helo = self
            .exchange("HELO", format!("HELO {hostname}\r\n").as_bytes(), timeout)
            .await?;
        if !helo.is_positive() {
            return Err(Failure::temporary(
                &transient_status(&helo),
                format!("HELO: {helo}"),
            ));
        }
        self.extensions = Extensions::default();
        Ok(())
    }

    /// QUIT is a courtesy; the mail is already accepted or refused. As
    /// Postfix does by default (`smtp_skip_quit_response`), the reply is not
    /// awaited: the connection closes at once, so a slow server does not
    /// hold it (and its share of the connection limit) any longer.
    fn quit(mut self) {
        let _ = self.conn.send(b"QUIT\r\n", self.timeouts.mail);
    }
}

async fn open_session<K: Capabilities>(
    caps: &RefCell<&mut K>,
    address: &str,
    host: &str,
    target: &Target,
    options: &Options,
    try_tls: bool,
) -> Result<Session<K::Conn>, Opening> {
    let t = options.timeouts;
    let connected = caps.borrow_mut().connect(address, target.port, t.connect);
    let conn = connected.map_err(|e| {
        Opening::Failed(Failure::temporary(
            "4.4.1",
            format!("connect to {host} [{address}]:{}: {e}", target.port),
        ))
    })?;
    let mut session = Session {
        conn,
        reader: ReplyReader::default(),
        extensions: Extensions::default(),
        host: host.to_string(),
        tls_active: false,
        timeouts: t,
    };
    let greeting = session
        .exchange("greeting", b"", t.greeting)
        .await
        .map_err(Opening::Failed)?;
    if greeting.code != 220 {
        // Even a 5xx greeting only says this host will not talk to us: try the next one.
        return Err(Opening::Failed(Failure::temporary(
            &transient_status(&greeting),
            format!("greeting: {greeting}"),
        )));
    }
    session
        .hello(&options.hostname)
        .await
        .map_err(Opening::Failed)?;
    let wants_tls = match target.tls {
        TlsMode::None => false,
        TlsMode::Opportunistic => try_tls && session.extensions.starttls,
        TlsMode::Required | TlsMode::Verify => {
            if !session.extensions.starttls {
                session.quit();
                return Err(Opening::Failed(Failure::temporary(
                    "4.7.0",
                    format!(
                        "TLS is required ({}) but {host} does not offer STARTTLS",
                        target.tls.name()
                    ),
                )));
            }
            true
        }
    };
    if wants_tls {
        let reply = session
            .exchange("STARTTLS", b"STARTTLS\r\n", t.mail)
            .await
            .map_err(Opening::Failed)?;
        if reply.code != 220 {
            if target.tls == TlsMode::Opportunistic {
                // The server declined; RFC 3207 lets the client go on in plain text.
                caps.borrow_mut().log(
                    Level::Info,
                    &format!("{host}: STARTTLS declined ({reply}); continuing without TLS"),
                );
            } else {
                return Err(Opening::Failed(Failure::temporary(
                    "4.7.0",
                    format!("STARTTLS: {reply}"),
                )));
            }
        } else {
            let verify = target.tls == TlsMode::Verify;
            session
                .conn
                .start_tls(host, verify, t.greeting)
                .map_err(|e| {
                    Opening::TlsHandshake(Failure::temporary(
                        if verify { "4.7.5" } else { "4.7.0" },
                        format!("TLS with {host}: {e}"),
                    ))
                })?;
            session.tls_active = true;
            // RFC 3207: forget what was learned before TLS, and ask again.
            session.reader = ReplyReader::default();
            session
                .hello(&options.hostname)
                .await
                .map_err(Opening::Failed)?;
        }
    }
    if let Some(credentials) = &target.credentials {
        authenticate(&mut session, credentials)
            .await
            .map_err(Opening::Failed)?;
    }
    Ok(session)
}

/// AUTH PLAIN or LOGIN (RFC 4954), never over plain text. Neither the
/// commands nor the credentials reach any log: failures quote the reply only.
async fn authenticate<C: Connection>(
    session: &mut Session<C>,
    credentials: &Credentials,
) -> Result<(), Failure> {
    if !session.tls_active {
        return Err(Failure::temporary(
            "4.7.0",
            format!(
                "credentials are never sent without TLS, and {} has no TLS",
                session.host
            ),
        ));
    }
    let t = session.timeouts.mail;
    let offered = |mechanism: &str| {
        session
            .extensions
            .auth
            .iter()
            .any(|m| m.eq_ignore_ascii_case(mechanism))
    };
    let reply = if offered("PLAIN") {
        let token =
            base64(format!("\0{}\0{}", credentials.username, credentials.password).as_bytes());
        session
            .exchange(
                "AUTH PLAIN",
                format!("AUTH PLAIN {token}\r\n").as_bytes(),
                t,
            )
            .await?
    } else if offered("LOGIN") {
        let mut reply = session.exchange("AUTH LOGIN", b"AUTH LOGIN\r\n", t).await?;
        for secret in [&credentials.username, &credentials.password] {
            if reply.code != 334 {
                break;
            }
            reply = session
                .exchange(
                    "AUTH LOGIN",
                    format!("{}\r\n", base64(secret.as_bytes())).as_bytes(),
                    t,
                )
                .await?;
        }
        reply
    } else {
        return Err(Failure::temporary(
            "4.7.0",
            format!("{} offers neither AUTH PLAIN nor AUTH LOGIN", session.host),
        ));
    };
    if reply.code == 235 {
        Ok(())
    } else {
        // An authentication failure defers, as Postfix's smtp_sasl_auth_soft_bounce does.
        Err(Failure::temporary(
            &transient_status(&reply),
            format!("AUTH: {reply}"),
        ))
    }
}

/// Standard base64 with padding (RFC 4648), for AUTH.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let symbol =
        |index: u32| char::from(ALPHABET.get((index & 63) as usize).copied().unwrap_or(b'='));
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        out.push(symbol(n >> 18));
        out.push(symbol(n >> 12));
        out.push(if chunk.len() > 1 { symbol(n >> 6) } else { '=' });
        out.push(if chunk.len() > 2 { symbol(n) } else { '=' });
    }
    out
}

/// One transaction on an open session: the result of each recipient, in
/// order, or a failure that applies to all of them.
async fn send_transaction<C: Connection>(
    session: &mut Session<C>,
    sender: &str,
    recipients: &[String],
    message: &[u8],
    options: &Options,
) -> Result<Vec<RecipientResult>, Failure> {
    let t = options.timeouts;
    let extensions = session.extensions.clone();
    let host = session.host.clone();
    let stats = message::line_stats(message);
    let needs_utf8 =
        !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii()) || header_has_utf8(message);
    if let Some(failure) = unsendable(
        &extensions,
        stats.has_eight_bit,
        needs_utf8,
        message.len() as u64,
        &host,
    ) {
        return Ok(recipients
            .iter()
            .map(|_| RecipientResult::NotDelivered(failure.clone()))
            .collect());
    }
    let mut mail = format!("MAIL FROM:<{sender}>");
    if extensions.size.is_some() {
        mail.push_str(&format!(" SIZE={}", message.len()));
    }
    if stats.has_eight_bit && extensions.eight_bit_mime {
        mail.push_str(" BODY=8BITMIME");
    }
    if needs_utf8 {
        mail.push_str(" SMTPUTF8");
    }
    mail.push_str("\r\n");
    let rcpt_commands: Vec<String> = recipients
        .iter()
        .map(|r| format!("RCPT TO:<{r}>\r\n"))
        .collect();

    // With PIPELINING, MAIL and every RCPT leave in one write (RFC 2920).
    let (mail_reply, rcpt_replies) = if extensions.pipelining {
        let mut batch = mail.clone().into_bytes();
        for command in &rcpt_commands {
            batch.extend_from_slice(command.as_bytes());
        }
        let mail_reply = session.exchange("MAIL FROM", &batch, t.mail).await?;
        let mut replies = Vec::with_capacity(rcpt_commands.len());
        for _ in &rcpt_commands {
            replies.push(session.exchange("RCPT TO", b"", t.rcpt).await?);
        }
        (mail_reply, replies)
    } else {
        let mail_reply = session
            .exchange("MAIL FROM", mail.as_bytes(), t.mail)
            .await?;
        let mut replies = Vec::with_capacity(rcpt_commands.len());
        if mail_reply.is_positive() {
            for command in &rcpt_commands {
                replies.push(
                    session
                        .exchange("RCPT TO", command.as_bytes(), t.rcpt)
                        .await?,
                );
            }
        }
        (mail_reply, replies)
    };
    if !mail_reply.is_positive() {
        let failure = reply_failure("MAIL FROM", &mail_reply);
        if failure.permanent {
            return Ok(recipients
                .iter()
                .map(|_| RecipientResult::NotDelivered(failure.clone()))
                .collect());
        }
        return Err(failure);
    }
    let mut results: Vec<Option<RecipientResult>> = rcpt_replies
        .iter()
        .map(|reply| {
            (!reply.is_positive())
                .then(|| RecipientResult::NotDelivered(reply_failure("RCPT TO", reply)))
        })
        .collect();
    if results.iter().all(Option::is_some) {
        return Ok(results.into_iter().flatten().collect());
    }
    let data = session.exchange("DATA", b"DATA\r\n", t.data_init).await?;
    let final_reply = if data.is_intermediate() {
        let block = smtp::data_block(message);
        session
            .exchange("end of data", &block, t.data_block.max(t.data_end))
            .await?
    } else {
        data
    };
    let accepted = if final_reply.is_positive() {
        RecipientResult::Delivered(final_reply.to_string())
    } else {
        RecipientResult::NotDelivered(reply_failure("DATA", &final_reply))
    };
    for slot in results.iter_mut().filter(|slot| slot.is_none()) {
        *slot = Some(accepted.clone());
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| accepted.clone()))
        .collect())
}

fn header_has_utf8(message: &[u8]) -> bool {
    let end = message::header_section(message)
        .map(|h| h.body_start)
        .unwrap_or(0);
    !message.get(..end).unwrap_or_default().is_ascii()
}

/// Refuse to send what the server said it cannot take, rather than alter it.
fn unsendable(
    ext: &Extensions,
    eight_bit: bool,
    needs_utf8: bool,
    size: u64,
    host: &str,
) -> Option<Failure> {
    if let Some(limit) = ext.size.filter(|&limit| limit > 0 && size > limit) {
        return Some(Failure::permanent(
            "5.3.4",
            format!("the message is {size} bytes; {host} accepts at most {limit}"),
        ));
    }
    if needs_utf8 && !ext.smtputf8 {
        return Some(Failure::permanent(
            "5.6.7",
            format!(
                "the message needs SMTPUTF8 (UTF-8 addresses or headers) and {host} does not offer it"
            ),
        ));
    }
    if eight_bit && !ext.eight_bit_mime && !ext.smtputf8 {
        return Some(Failure::permanent(
            "5.6.3",
            format!("the message has 8-bit content and {host} does not offer 8BITMIME"),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(b"\0user\0pass"), "AHVzZXIAcGFzcw==");
    }
}

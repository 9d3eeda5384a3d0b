//! The relay stages against a scripted host: DNS answers from a table and SMTP
//! servers simulated in memory, so every branch of the dialogue is reachable
//! without a network. The end-to-end tests in `tests/` cover the real peers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::*;
use crate::retry::Schedule;
use crate::route::MxRecord;
use crate::route::{Credentials, DomainRoute, NextHop, Routing, TlsMode};
use crate::smtp::SocketError;

/// A simulated SMTP server: replies chosen by a rule per command verb.
#[derive(Default)]
struct Server {
    greeting: String,
    /// Reply overrides: (command prefix, reply).
    rules: Vec<(String, String)>,
    extensions: Vec<String>,
    input: Vec<u8>,
    output: Vec<u8>,
    in_data: bool,
    commands: Vec<String>,
    messages: Vec<Vec<u8>>,
    /// STARTTLS is offered; `Some(ok)` says whether the handshake succeeds.
    tls_handshake: Option<bool>,
    /// The `verify` flag of each handshake.
    handshakes: Vec<bool>,
    tls_active: bool,
    /// Replies are held until the client waits (a slow server).
    slow: bool,
    held: Vec<u8>,
}

impl Server {
    fn new() -> Self {
        Server {
            greeting: "220 mx ready".into(),
            extensions: vec!["PIPELINING".into(), "8BITMIME".into()],
            ..Self::default()
        }
    }

    fn reply_for(&self, command: &str) -> String {
        if let Some((_, reply)) = self
            .rules
            .iter()
            .find(|(prefix, _)| command.to_ascii_uppercase().starts_with(prefix.as_str()))
        {
            return reply.clone();
        }
        let verb = command
            .split([' ', ':'])
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => {
                let mut lines = vec!["250-mx hello".to_string()];
                lines.extend(self.extensions.iter().map(|e| format!("250-{e}")));
                if self.tls_handshake.is_some()
                    && !self.handshakes.last().is_some_and(|_| self.tls_active)
                {
                    lines.push("250-STARTTLS".into());
                }
                let last = lines.pop().unwrap().replacen("250-", "250 ", 1);
                lines.push(last);
                lines.join("\r\n")
            }
            "DATA" => "354 go ahead".into(),
            "STARTTLS" if self.tls_handshake.is_some() => "220 ready for TLS".into(),
            "AUTH" if command.starts_with("AUTH PLAIN AHVzZXIAc2VjcmV0") => "235 2.7.0 ok".into(),
            "AUTH" => "535 5.7.8 bad credentials".into(),
            "QUIT" => "221 bye".into(),
            _ => "250 2.0.0 ok".into(),
        }
    }

    /// Queue `reply`; an empty reply is silence.
    fn answer(&mut self, reply: &str) {
        if reply.is_empty() {
            return;
        }
        let out = if self.slow {
            &mut self.held
        } else {
            &mut self.output
        };
        out.extend_from_slice(format!("{reply}\r\n").as_bytes());
    }

    fn feed(&mut self, data: &[u8]) {
        self.input.extend_from_slice(data);
        loop {
            if self.in_data {
                let Some(end) = self.input.windows(5).position(|w| w == b"\r\n.\r\n") else {
                    return;
                };
                let message: Vec<u8> = self.input.drain(..end + 5).collect();
                self.messages.push(message[..message.len() - 3].to_vec());
                self.in_data = false;
                let reply = self.reply_for("END-OF-DATA");
                self.answer(&reply);
                continue;
            }
            let Some(end) = self.input.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let line: Vec<u8> = self.input.drain(..end + 2).collect();
            let command = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let reply = self.reply_for(&command);
            if command == "DATA" && reply.starts_with("354") {
                self.in_data = true;
            }
            self.commands.push(command);
            self.answer(&reply);
        }
    }
}

struct FakeConn(Rc<RefCell<Server>>);

impl Connection for FakeConn {
    fn send(&mut self, data: &[u8], _: u32) -> Result<(), SocketError> {
        self.0.borrow_mut().feed(data);
        Ok(())
    }
    /// The simulated server answers at once; silence stays silent.
    fn try_receive(&mut self) -> Result<Option<Vec<u8>>, SocketError> {
        let out = std::mem::take(&mut self.0.borrow_mut().output);
        Ok((!out.is_empty()).then_some(out))
    }
    fn token(&self) -> u64 {
        Rc::as_ptr(&self.0) as u64
    }
    fn start_tls(&mut self, _: &str, verify: bool, _: u32) -> Result<(), SocketError> {
        let mut server = self.0.borrow_mut();
        server.handshakes.push(verify);
        match server.tls_handshake {
            Some(true) => {
                server.tls_active = true;
                Ok(())
            }
            _ => Err(SocketError::Tls("handshake failure (simulated)".into())),
        }
    }
}

#[derive(Default)]
struct FakeHost {
    files: HashMap<String, Vec<u8>>,
    mx: HashMap<String, MxAnswer>,
    ips: HashMap<String, AddressAnswer>,
    servers: HashMap<String, Rc<RefCell<Server>>>,
    connects: Vec<String>,
    logs: Vec<String>,
    now_ms: u64,
    drops: Vec<Vec<u8>>,
    /// Recorded reports, with how many messages the servers had then.
    recorded: Vec<(usize, DeliveryReport, usize)>,
    /// Time spent waiting on silent servers (the monotonic clock).
    waited_ms: u64,
    /// Calls to `wait`, and how many had been made at each connect.
    waits: usize,
    waits_at_connect: Vec<usize>,
    /// What `more_messages` hands over, one list per ask.
    more: std::collections::VecDeque<Vec<QueuedMessage>>,
    /// Calls to `more_messages`.
    asks: usize,
}

impl FakeHost {
    fn server(&mut self, address: &str) -> Rc<RefCell<Server>> {
        self.servers
            .entry(address.to_string())
            .or_insert_with(|| Rc::new(RefCell::new(Server::new())))
            .clone()
    }
    fn mx(&mut self, domain: &str, records: &[(u16, &str)]) {
        let records = records
            .iter()
            .map(|(p, e)| MxRecord {
                preference: *p,
                exchange: e.to_string(),
            })
            .collect();
        self.mx
            .insert(domain.to_string(), MxAnswer::Records(records));
    }
    fn ip(&mut self, host: &str, address: &str) {
        self.ips.insert(
            host.to_string(),
            AddressAnswer::Addresses(vec![address.to_string()]),
        );
    }
}

impl Waiter for FakeHost {
    fn monotonic_ms(&mut self) -> u64 {
        self.waited_ms
    }
    /// Slow servers answer now; when none has anything to say, the time passes.
    fn wait(&mut self, timeout_ms: u32) -> Vec<u64> {
        self.waits += 1;
        let mut ready = Vec::new();
        for server in self.servers.values() {
            let mut state = server.borrow_mut();
            if !state.held.is_empty() {
                let held = std::mem::take(&mut state.held);
                state.output.extend_from_slice(&held);
                ready.push(Rc::as_ptr(server) as u64);
            }
        }
        if ready.is_empty() {
            self.waited_ms += u64::from(timeout_ms);
        }
        ready
    }
}

impl Capabilities for FakeHost {
    type Conn = FakeConn;
    fn read_queue_file(&mut self, name: &str) -> Result<Vec<u8>, ReadError> {
        self.files
            .get(name)
            .cloned()
            .ok_or_else(|| ReadError::Unavailable("no such file".into()))
    }
    fn read_queue_head(&mut self, name: &str, max_bytes: u64) -> Result<Vec<u8>, ReadError> {
        let mut bytes = self.read_queue_file(name)?;
        bytes.truncate(max_bytes as usize);
        Ok(bytes)
    }
    fn lookup_mx(&mut self, domain: &str) -> MxAnswer {
        self.mx.get(domain).cloned().unwrap_or(MxAnswer::NxDomain)
    }
    fn lookup_ip(&mut self, host: &str) -> AddressAnswer {
        if host.parse::<std::net::IpAddr>().is_ok() {
            return AddressAnswer::Addresses(vec![host.to_string()]);
        }
        self.ips
            .get(host)
            .cloned()
            .unwrap_or(AddressAnswer::NxDomain)
    }
    fn connect(&mut self, address: &str, _: u16, _: u32) -> Result<FakeConn, SocketError> {
        self.connects.push(address.to_string());
        self.waits_at_connect.push(self.waits);
        match self.servers.get(address) {
            Some(server) => {
                // A new connection starts with empty buffers, as TCP does.
                let mut state = server.borrow_mut();
                state.input.clear();
                state.output.clear();
                state.in_data = false;
                state.tls_active = false;
                state.held.clear();
                let greeting = state.greeting.clone();
                state.answer(&greeting);
                drop(state);
                Ok(FakeConn(server.clone()))
            }
            None => Err(SocketError::Refused("nothing listens".into())),
        }
    }
    fn write_drop(&mut self, content: &[u8]) -> Result<String, String> {
        self.drops.push(content.to_vec());
        Ok(format!("drop-{}.eml", self.drops.len()))
    }
    fn now_ms(&mut self) -> u64 {
        self.now_ms
    }
    fn record_attempt(&mut self, index: usize, report: DeliveryReport) {
        let sent = self
            .servers
            .values()
            .map(|s| s.borrow().messages.len())
            .sum();
        self.recorded.push((index, report, sent));
    }
    fn log(&mut self, _: Level, message: &str) {
        self.logs.push(message.to_string());
    }
    fn more_messages(&mut self) -> Vec<QueuedMessage> {
        self.asks += 1;
        self.more.pop_front().unwrap_or_default()
    }
}

fn options() -> Options {
    Options {
        hostname: "relay.test".into(),
        smtp_port: 25,
        limits: Limits::default(),
        timeouts: Timeouts::default(),
        retry: Schedule::iis(),
        routing: Routing::default(),
        max_recipients_per_transaction: 100,
    }
}

fn rcpts(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const MESSAGE: &[u8] = b"From: s@src.test\r\nTo: a@one.test\r\n\r\n.leading dot\r\nbody\r\n";

fn host_with_message() -> FakeHost {
    let mut host = FakeHost::default();
    host.files.insert("Q1.eml".into(), MESSAGE.to_vec());
    host
}

const ARRIVAL: u64 = 1_800_000_000_000;

fn state(attempts: u32, delay_notice_sent: bool) -> QueueState {
    QueueState {
        queue_id: "Q1".into(),
        attempts,
        arrival_ms: ARRIVAL,
        delay_notice_sent,
    }
}

/// One attempt on one message: its report.
fn deliver(
    host: &mut FakeHost,
    file: &str,
    sender: &str,
    recipients: &[String],
    state: &QueueState,
    options: &Options,
) -> DeliveryReport {
    let message = QueuedMessage {
        file: file.to_string(),
        sender: sender.to_string(),
        recipients: recipients.to_vec(),
        state: state.clone(),
    };
    deliver_batch(host, vec![message], options);
    let (index, report, _) = host.recorded.pop().expect("a report was recorded");
    assert_eq!(index, 0);
    report
}

/// A message of a batch from s@src.test, at its first attempt.
fn first_attempt(file: &str, recipients: &[&str]) -> QueuedMessage {
    QueuedMessage {
        file: file.into(),
        sender: "s@src.test".into(),
        recipients: rcpts(recipients),
        state: state(0, false),
    }
}

/// A first attempt, right at arrival: only the outcomes.
fn deliver_once(
    host: &mut FakeHost,
    file: &str,
    sender: &str,
    recipients: &[String],
    options: &Options,
) -> Vec<RecipientOutcome> {
    host.now_ms = ARRIVAL;
    deliver(host, file, sender, recipients, &state(0, false), options).outcomes
}

/// The message of [`host_with_message`], and one.test with one exchanger,
/// mx.one.test at 127.0.0.1, served by a simulated server.
fn one_test_domain() -> (FakeHost, Rc<RefCell<Server>>) {
    let mut host = host_with_message();
    host.mx("one.test", &[(10, "mx.one.test")]);
    host.ip("mx.one.test", "127.0.0.1");
    let server = host.server("127.0.0.1");
    (host, server)
}

fn delivered(outcome: &RecipientOutcome) -> bool {
    matches!(outcome.result, RecipientResult::Delivered(_))
}

fn failure(outcome: &RecipientOutcome) -> &Failure {
    match &outcome.result {
        RecipientResult::NotDelivered(f) => f,
        RecipientResult::Delivered(reply) => panic!("unexpectedly delivered: {reply}"),
    }
}

#[test]
fn accept_derives_envelope_and_cleans_up() {
    let mut host = FakeHost::default();
    host.files.insert(
        "f".into(),
        b"x-sender: s@src.test\nx-receiver: a@one.test\nFrom: s@src.test\nBcc: a@one.test\n\nhi\n"
            .to_vec(),
    );
    let accepted = accept(&mut host, "f", "Q1", &options()).unwrap();
    assert_eq!(accepted.envelope.recipients, vec!["a@one.test"]);
    let text = String::from_utf8(accepted.message).unwrap();
    assert!(text.starts_with("Received: from pickup by relay.test (mailroot) id Q1;"));
    assert!(!text.contains("x-sender") && !text.contains("Bcc"));
    assert!(accepted.warnings.iter().any(|w| w.contains("Date")));
}

#[test]
fn accept_rejects_and_defers() {
    let mut host = FakeHost::default();
    host.files
        .insert("bad".into(), b"no headers at all\n".to_vec());
    let rejection = accept(&mut host, "bad", "Q1", &options()).unwrap_err();
    assert_eq!(
        (rejection.code.as_str(), rejection.temporary),
        ("unparseable", false)
    );
    let missing = accept(&mut host, "missing", "Q1", &options()).unwrap_err();
    assert!(missing.temporary);
}

#[test]
fn two_domains_two_transactions_with_dot_stuffing() {
    let mut host = host_with_message();
    host.mx("one.test", &[(10, "mx.one.test")]);
    host.mx("two.test", &[(10, "mx.two.test")]);
    host.ip("mx.one.test", "127.0.0.1");
    host.ip("mx.two.test", "127.0.0.2");
    let one = host.server("127.0.0.1");
    let two = host.server("127.0.0.2");
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@one.test", "b@two.test"]),
        &options(),
    );
    assert!(outcomes.iter().all(delivered), "{outcomes:?}");
    assert_eq!(one.borrow().messages.len(), 1);
    assert_eq!(two.borrow().messages.len(), 1);
    assert!(
        one.borrow()
            .commands
            .contains(&"RCPT TO:<a@one.test>".to_string())
    );
    assert!(
        !one.borrow()
            .commands
            .iter()
            .any(|c| c.contains("b@two.test"))
    );
    assert_eq!(one.borrow().commands[1], "MAIL FROM:<s@src.test>");
    assert!(one.borrow().messages[0].ends_with(b"\r\n..leading dot\r\nbody\r\n"));
}

#[test]
fn mx_order_and_fallback_on_refusal_and_4xx() {
    let mut host = host_with_message();
    host.mx(
        "one.test",
        &[
            (20, "backup.one.test"),
            (10, "down.one.test"),
            (15, "busy.one.test"),
        ],
    );
    host.ip("down.one.test", "127.0.0.1");
    host.ip("busy.one.test", "127.0.0.2");
    host.ip("backup.one.test", "127.0.0.3");
    host.server("127.0.0.2").borrow_mut().greeting = "421 too busy".into();
    let backup = host.server("127.0.0.3");
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@one.test"]),
        &options(),
    );
    assert!(delivered(&outcomes[0]), "{outcomes:?}");
    assert_eq!(host.connects, vec!["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
    assert_eq!(backup.borrow().messages.len(), 1);
}

#[test]
fn per_recipient_results() {
    let (mut host, server) = one_test_domain();
    server.borrow_mut().rules = vec![
        ("RCPT TO:<GONE@".into(), "550 5.1.1 no such user".into()),
        ("RCPT TO:<LATER@".into(), "451 4.3.0 try later".into()),
    ];
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "",
        &rcpts(&["ok@one.test", "gone@one.test", "later@one.test"]),
        &options(),
    );
    assert!(delivered(&outcomes[0]));
    assert_eq!(
        (
            failure(&outcomes[1]).permanent,
            failure(&outcomes[1]).status.as_str()
        ),
        (true, "5.1.1")
    );
    assert!(
        failure(&outcomes[1])
            .text
            .contains("550 5.1.1 no such user")
    );
    assert_eq!(
        (
            failure(&outcomes[2]).permanent,
            failure(&outcomes[2]).status.as_str()
        ),
        (false, "4.3.0")
    );
    assert_eq!(server.borrow().commands[1], "MAIL FROM:<>");
}

#[test]
fn helo_fallback_without_pipelining() {
    let (mut host, server) = one_test_domain();
    server.borrow_mut().rules = vec![("EHLO".into(), "502 5.5.1 what".into())];
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@one.test"]),
        &options(),
    );
    assert!(delivered(&outcomes[0]), "{outcomes:?}");
    let commands = server.borrow().commands.clone();
    assert_eq!(
        &commands[..4],
        &[
            "EHLO relay.test",
            "HELO relay.test",
            "MAIL FROM:<s@src.test>",
            "RCPT TO:<a@one.test>"
        ]
    );
}

#[test]
fn dns_outcomes() {
    let mut host = host_with_message();
    host.mx("null.test", &[(0, ".")]);
    host.mx
        .insert("fail.test".into(), MxAnswer::Temporary("SERVFAIL".into()));
    host.mx.insert("aonly.test".into(), MxAnswer::NoRecords);
    host.ip("aonly.test", "127.0.0.9");
    let aonly = host.server("127.0.0.9");
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@null.test", "b@nx.test", "c@fail.test", "d@aonly.test"]),
        &options(),
    );
    assert_eq!(failure(&outcomes[0]).status, "5.1.10");
    assert_eq!(failure(&outcomes[1]).status, "5.1.2");
    assert!(!failure(&outcomes[2]).permanent);
    assert!(delivered(&outcomes[3]));
    assert_eq!(host.connects, vec!["127.0.0.9"]);
    assert_eq!(aonly.borrow().messages.len(), 1);
}

#[test]
fn eight_bit_to_a_seven_bit_server_is_refused_not_altered() {
    let mut host = FakeHost::default();
    host.files.insert(
        "Q1.eml".into(),
        "From: s@src.test\r\n\r\ncaf\u{e9}\r\n".as_bytes().to_vec(),
    );
    host.mx("one.test", &[(10, "mx.one.test")]);
    host.ip("mx.one.test", "127.0.0.1");
    host.server("127.0.0.1").borrow_mut().extensions = vec!["PIPELINING".into()];
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@one.test"]),
        &options(),
    );
    assert_eq!(failure(&outcomes[0]).status, "5.6.3");
}

#[test]
fn garbage_and_silence_are_temporary() {
    let (mut host, _) = one_test_domain();
    host.server("127.0.0.1").borrow_mut().greeting = "HELLO I AM NOT SMTP".into();
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@one.test"]),
        &options(),
    );
    assert!(!failure(&outcomes[0]).permanent);
    assert!(
        failure(&outcomes[0]).text.contains("protocol error"),
        "{outcomes:?}"
    );
}

fn one_domain_host(rules: Vec<(String, String)>) -> FakeHost {
    let (host, server) = one_test_domain();
    server.borrow_mut().rules = rules;
    host
}

fn text(notice: &[u8]) -> String {
    String::from_utf8(notice.to_vec()).unwrap()
}

#[test]
fn failures_of_one_attempt_share_one_dsn() {
    let mut host = one_domain_host(vec![
        ("RCPT TO:<GONE@".into(), "550 5.1.1 no such user".into()),
        ("RCPT TO:<LOST@".into(), "553 5.1.3 bad mailbox".into()),
    ]);
    host.now_ms = ARRIVAL;
    let report = deliver(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["ok@one.test", "gone@one.test", "lost@one.test"]),
        &state(0, false),
        &options(),
    );
    assert_eq!(report.notices.len(), 1);
    assert_eq!(report.next_attempt_ms, None, "nothing pending");
    let dsn = text(&report.notices[0].message);
    assert!(dsn.contains("To: <s@src.test>"));
    assert!(
        dsn.contains(
            "Final-Recipient: rfc822; gone@one.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        )
    );
    assert!(
        dsn.contains(
            "Final-Recipient: rfc822; lost@one.test\r\nAction: failed\r\nStatus: 5.1.3\r\n"
        )
    );
    assert!(dsn.contains("Diagnostic-Code: smtp; RCPT TO: 550 5.1.1 no such user"));
    assert!(!dsn.contains("ok@one.test\r\nAction"));
    let reason = report.badmail.unwrap();
    assert!(
        reason.contains("2 recipient(s)") && reason.contains("a DSN was sent to <s@src.test>"),
        "{reason}"
    );
}

#[test]
fn deferred_recipients_get_the_next_attempt_time_and_one_delay_notice() {
    let mut host = one_domain_host(vec![("RCPT TO:<LATER@".into(), "451 4.2.0 busy".into())]);
    // First attempt at arrival: retry in 15 minutes (IIS), no notice yet.
    host.now_ms = ARRIVAL;
    let first = deliver(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["later@one.test"]),
        &state(0, false),
        &options(),
    );
    assert_eq!(first.next_attempt_ms, Some(ARRIVAL + 15 * 60_000));
    assert!(first.notices.is_empty() && !first.delay_notice_sent);
    // 13 hours later: the delay notice, with Will-Retry-Until two days after arrival.
    host.now_ms = ARRIVAL + 13 * 3_600_000;
    let late = deliver(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["later@one.test"]),
        &state(6, false),
        &options(),
    );
    assert!(late.delay_notice_sent);
    assert_eq!(late.notices.len(), 1);
    let dsn = text(&late.notices[0].message);
    assert!(
        dsn.contains("Action: delayed\r\nStatus: 4.2.0\r\n"),
        "{dsn}"
    );
    assert!(dsn.contains(&format!(
        "Will-Retry-Until: {}",
        crate::date::rfc5322(ARRIVAL + 2 * 86_400_000)
    )));
    // Once sent, never again.
    let again = deliver(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["later@one.test"]),
        &state(7, true),
        &options(),
    );
    assert!(again.notices.is_empty() && !again.delay_notice_sent);
}

#[test]
fn expiry_fails_pending_recipients_with_4_4_7() {
    let mut host = one_domain_host(vec![("RCPT TO:<LATER@".into(), "451 4.2.0 busy".into())]);
    host.now_ms = ARRIVAL + 2 * 86_400_000;
    let report = deliver(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["later@one.test"]),
        &state(12, true),
        &options(),
    );
    assert_eq!(report.next_attempt_ms, None);
    let f = failure(&report.outcomes[0]);
    assert!(f.permanent && f.status == "4.4.7", "{f:?}");
    assert!(f.text.contains("451 4.2.0 busy"), "{f:?}");
    let dsn = text(&report.notices[0].message);
    assert!(dsn.contains("Action: failed\r\nStatus: 4.4.7\r\n"), "{dsn}");
}

#[test]
fn the_null_sender_never_gets_a_dsn() {
    let mut host = one_domain_host(vec![(
        "RCPT TO:<GONE@".into(),
        "550 5.1.1 no such user".into(),
    )]);
    host.now_ms = ARRIVAL;
    let report = deliver(
        &mut host,
        "Q1.eml",
        "",
        &rcpts(&["gone@one.test"]),
        &state(0, false),
        &options(),
    );
    assert!(report.notices.is_empty());
    let reason = report.badmail.unwrap();
    assert!(
        reason.contains("null sender") && reason.contains("550 5.1.1"),
        "{reason}"
    );
}

#[test]
fn an_oversized_message_gets_a_dsn_with_its_headers_only() {
    let mut host = FakeHost::default();
    let mut raw = b"x-sender: s@src.test\r\nx-receiver: r@one.test\r\nFrom: s@src.test\r\nSubject: huge\r\n\r\n".to_vec();
    raw.extend(std::iter::repeat_n(b'B', 4000));
    host.files.insert("big".into(), raw);
    let mut opts = options();
    opts.limits.max_message_bytes = 1000;
    let rejection = accept(&mut host, "big", "Q9", &opts).unwrap_err();
    assert_eq!(rejection.code, "too-large");
    let dsn = text(&rejection.notice.unwrap().message);
    assert!(dsn.contains("To: <s@src.test>"));
    assert!(
        dsn.contains("Final-Recipient: rfc822; r@one.test\r\nAction: failed\r\nStatus: 5.3.4\r\n")
    );
    assert!(dsn.contains("text/rfc822-headers\r\n\r\nFrom: s@src.test\r\nSubject: huge\r\n"));
    assert!(!dsn.contains("BBBB") && !dsn.contains("x-sender"));
    // No DSN for the null sender.
    host.files.insert(
        "big0".into(),
        [
            b"x-sender: <>\r\nx-receiver: r@one.test\r\n".to_vec(),
            vec![b'x'; 2000],
        ]
        .concat(),
    );
    assert!(
        accept(&mut host, "big0", "Q10", &opts)
            .unwrap_err()
            .notice
            .is_none()
    );
}

fn tls_host(handshake: Option<bool>) -> (FakeHost, Rc<RefCell<Server>>) {
    let (host, server) = one_test_domain();
    server.borrow_mut().tls_handshake = handshake;
    (host, server)
}

fn with_tls(mode: TlsMode) -> Options {
    let mut o = options();
    o.routing.mx_tls = mode;
    o
}

#[test]
fn opportunistic_tls_is_used_when_offered_and_ehlo_is_repeated() {
    let (mut host, server) = tls_host(Some(true));
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@one.test"]),
        &with_tls(TlsMode::Opportunistic),
    );
    assert!(delivered(&outcomes[0]), "{outcomes:?}");
    let commands = server.borrow().commands.clone();
    assert_eq!(
        &commands[..4],
        &[
            "EHLO relay.test",
            "STARTTLS",
            "EHLO relay.test",
            "MAIL FROM:<s@src.test>"
        ]
    );
    assert_eq!(
        server.borrow().handshakes,
        vec![false],
        "opportunistic does not verify"
    );
}

#[test]
fn opportunistic_tls_falls_back_to_plain_text_when_the_handshake_fails() {
    let (mut host, server) = tls_host(Some(false));
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@one.test"]),
        &with_tls(TlsMode::Opportunistic),
    );
    assert!(delivered(&outcomes[0]), "{outcomes:?}");
    assert_eq!(host.connects.len(), 2, "a second connection, without TLS");
    assert_eq!(server.borrow().messages.len(), 1);
}

#[test]
fn required_and_verify_defer_without_tls() {
    for mode in [TlsMode::Required, TlsMode::Verify] {
        let (mut host, server) = tls_host(None);
        let outcomes = deliver_once(
            &mut host,
            "Q1.eml",
            "s@src.test",
            &rcpts(&["a@one.test"]),
            &with_tls(mode),
        );
        let f = failure(&outcomes[0]);
        assert!(
            !f.permanent && f.status == "4.7.0" && f.text.contains("does not offer STARTTLS"),
            "{f:?}"
        );
        assert!(server.borrow().messages.is_empty());
        // A failed handshake defers too, and never falls back.
        let (mut host, server) = tls_host(Some(false));
        let outcomes = deliver_once(
            &mut host,
            "Q1.eml",
            "s@src.test",
            &rcpts(&["a@one.test"]),
            &with_tls(mode),
        );
        assert!(!failure(&outcomes[0]).permanent);
        assert_eq!(host.connects.len(), 1);
        assert_eq!(server.borrow().handshakes, vec![mode == TlsMode::Verify]);
    }
    let (mut host, server) = tls_host(None);
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@one.test"]),
        &with_tls(TlsMode::None),
    );
    assert!(delivered(&outcomes[0]));
    assert!(!server.borrow().commands.contains(&"STARTTLS".to_string()));
}

fn smarthost_options(credentials: bool, tls: TlsMode) -> Options {
    let mut o = options();
    o.routing.smarthost = Some(NextHop {
        hosts: vec!["127.0.0.5".into()],
        port: 587,
        tls,
        credentials: credentials.then(|| Credentials {
            username: "user".into(),
            password: "secret".into(),
        }),
    });
    o
}

#[test]
fn auth_plain_only_after_tls_and_never_logged() {
    let mut host = host_with_message();
    let server = host.server("127.0.0.5");
    server.borrow_mut().tls_handshake = Some(true);
    server
        .borrow_mut()
        .extensions
        .push("AUTH PLAIN LOGIN".into());
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@anywhere.test"]),
        &smarthost_options(true, TlsMode::Required),
    );
    assert!(delivered(&outcomes[0]), "{outcomes:?}");
    assert!(
        server
            .borrow()
            .commands
            .iter()
            .any(|c| c.starts_with("AUTH PLAIN "))
    );
    assert!(
        !host
            .logs
            .iter()
            .any(|l| l.contains("secret") || l.contains("AHVzZXIAc2VjcmV0"))
    );

    // Without TLS the credentials are never sent.
    let mut host = host_with_message();
    let server = host.server("127.0.0.5");
    server
        .borrow_mut()
        .extensions
        .push("AUTH PLAIN LOGIN".into());
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@anywhere.test"]),
        &smarthost_options(true, TlsMode::Opportunistic),
    );
    let f = failure(&outcomes[0]);
    assert!(
        !f.permanent && f.text.contains("never sent without TLS"),
        "{f:?}"
    );
    assert!(
        !server
            .borrow()
            .commands
            .iter()
            .any(|c| c.starts_with("AUTH"))
    );
}

#[test]
fn more_recipients_than_the_limit_go_in_several_transactions() {
    let (mut host, server) = one_test_domain();
    let list: Vec<String> = (0..150).map(|n| format!("user{n}@one.test")).collect();
    let outcomes = deliver_once(&mut host, "Q1.eml", "s@src.test", &list, &options());
    assert!(outcomes.iter().all(delivered));
    assert_eq!(server.borrow().messages.len(), 2);
    assert_eq!(
        host.connects.len(),
        1,
        "one connection carries both transactions"
    );
    let rcpt_count = server
        .borrow()
        .commands
        .iter()
        .filter(|c| c.starts_with("RCPT TO"))
        .count();
    assert_eq!(rcpt_count, 150);
}

#[test]
fn local_domains_routes_and_smarthost() {
    let mut host = host_with_message();
    host.ip("gw.partner.test", "127.0.0.7");
    let gateway = host.server("127.0.0.7");
    let smarthost = host.server("127.0.0.5");
    let mut o = smarthost_options(false, TlsMode::None);
    o.routing.local_domains = vec!["intranet.test".into()];
    o.routing.routes = vec![DomainRoute {
        domain: "*.partner.test".into(),
        hop: NextHop {
            hosts: vec!["gw.partner.test".into()],
            port: 2525,
            tls: TlsMode::None,
            credentials: None,
        },
    }];
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@intranet.test", "b@eu.partner.test", "c@else.test"]),
        &o,
    );
    assert!(outcomes.iter().all(delivered), "{outcomes:?}");
    assert_eq!(host.drops.len(), 1);
    let dropped = String::from_utf8(host.drops[0].clone()).unwrap();
    assert!(dropped.starts_with("x-sender: <s@src.test>\r\nx-receiver: <a@intranet.test>\r\n"));
    assert_eq!(gateway.borrow().messages.len(), 1);
    assert_eq!(smarthost.borrow().messages.len(), 1);
    assert!(
        smarthost
            .borrow()
            .commands
            .contains(&"RCPT TO:<c@else.test>".to_string())
    );
    assert!(
        host.mx.is_empty() && host.connects.len() == 2,
        "no MX lookups with routes and a smart host"
    );
}

#[test]
fn the_sender_is_masqueraded_but_never_the_null_sender() {
    let mut host = FakeHost::default();
    host.files.insert(
        "f".into(),
        b"x-sender: root@web01.internal\r\nx-receiver: r@one.test\r\nSubject: x\r\n\r\nx".to_vec(),
    );
    host.files.insert(
        "g".into(),
        b"x-sender: <>\r\nx-receiver: r@one.test\r\nFrom: a@b.test\r\n\r\nx".to_vec(),
    );
    let mut o = options();
    o.routing.masquerade_domain = Some("example.com".into());
    assert_eq!(
        accept(&mut host, "f", "Q1", &o).unwrap().envelope.sender,
        "root@example.com"
    );
    assert_eq!(
        accept(&mut host, "g", "Q2", &o).unwrap().envelope.sender,
        ""
    );
}

#[test]
fn explain_reports_routes_without_connecting() {
    let mut host = FakeHost::default();
    host.mx("one.test", &[(20, "b.one.test"), (10, "a.one.test")]);
    host.mx("null.test", &[(0, ".")]);
    let raw = b"x-sender: s@src.test\r\nx-receiver: r@one.test\r\nx-receiver: n@null.test\r\nFrom: s@src.test\r\n\r\nx";
    let explanation = explain(&mut host, raw, &options());
    assert_eq!(explanation.envelope.as_ref().unwrap().recipients.len(), 2);
    let (rcpt, route) = &explanation.routes[0];
    assert_eq!(
        (rcpt.as_str(), route.via.as_str(), route.hosts.clone()),
        (
            "r@one.test",
            "MX",
            vec!["a.one.test".to_string(), "b.one.test".to_string()]
        )
    );
    assert_eq!(route.tls, TlsMode::Opportunistic);
    assert_eq!(
        explanation.routes[1].1.failure.as_ref().unwrap().status,
        "5.1.10"
    );
    assert!(host.connects.is_empty());
}

#[test]
fn a_batch_reuses_the_connection_between_messages() {
    let mut host = host_with_message();
    host.files.insert("Q2.eml".into(), MESSAGE.to_vec());
    host.mx("one.test", &[(10, "mx.one.test")]);
    host.ip("mx.one.test", "127.0.0.1");
    let server = host.server("127.0.0.1");
    host.now_ms = ARRIVAL;
    deliver_batch(
        &mut host,
        vec![
            first_attempt("Q1.eml", &["a@one.test"]),
            first_attempt("Q2.eml", &["b@one.test"]),
        ],
        &options(),
    );
    let recorded = &host.recorded;
    assert_eq!(
        recorded.iter().map(|(i, _, _)| *i).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert!(recorded.iter().all(|(_, r, _)| delivered(&r.outcomes[0])));
    assert_eq!(
        recorded[0].2, 1,
        "the first report is recorded before the second message is sent"
    );
    assert_eq!(host.connects.len(), 1, "one connection for both messages");
    assert_eq!(server.borrow().messages.len(), 2);
    let commands = server.borrow().commands.clone();
    let rset = commands
        .iter()
        .position(|c| c == "RSET")
        .expect("RSET before reuse");
    assert_eq!(commands[rset + 1], "MAIL FROM:<s@src.test>");
    assert_eq!(commands.last().map(String::as_str), Some("QUIT"));
}

#[test]
fn auth_login_when_plain_is_not_offered() {
    let mut host = host_with_message();
    let server = host.server("127.0.0.5");
    server.borrow_mut().tls_handshake = Some(true);
    server.borrow_mut().extensions.push("AUTH LOGIN".into());
    server.borrow_mut().rules = vec![
        ("AUTH LOGIN".into(), "334 VXNlcm5hbWU6".into()),
        ("DXNLCG==".into(), "334 UGFzc3dvcmQ6".into()),
        ("C2VJCMV0".into(), "235 2.7.0 authenticated".into()),
    ];
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@anywhere.test"]),
        &smarthost_options(true, TlsMode::Verify),
    );
    assert!(delivered(&outcomes[0]), "{outcomes:?}");
    let commands = server.borrow().commands.clone();
    let auth = commands.iter().position(|c| c == "AUTH LOGIN").unwrap();
    assert_eq!(&commands[auth + 1..auth + 3], &["dXNlcg==", "c2VjcmV0"]);
    assert_eq!(
        server.borrow().handshakes,
        vec![true],
        "verify checks the certificate"
    );
}

#[test]
fn size_and_smtputf8_extensions() {
    // SIZE: announced, sent, and a message over the limit is refused with 5.3.4.
    let (mut host, server) = one_test_domain();
    server.borrow_mut().extensions = vec!["SIZE 100000".into(), "8BITMIME".into()];
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@one.test"]),
        &options(),
    );
    assert!(delivered(&outcomes[0]));
    assert!(
        server
            .borrow()
            .commands
            .contains(&format!("MAIL FROM:<s@src.test> SIZE={}", MESSAGE.len()))
    );
    server.borrow_mut().extensions = vec!["SIZE 10".into()];
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["a@one.test"]),
        &options(),
    );
    assert_eq!(
        (
            failure(&outcomes[0]).permanent,
            failure(&outcomes[0]).status.as_str()
        ),
        (true, "5.3.4")
    );

    // SMTPUTF8: a UTF-8 address needs it; without it the recipient fails, unaltered.
    host.mx("xn--bcher-kva.test", &[(10, "mx.one.test")]);
    host.mx("bücher.test", &[(10, "mx.one.test")]);
    server.borrow_mut().extensions = vec!["8BITMIME".into()];
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["jörg@bücher.test"]),
        &options(),
    );
    assert_eq!(failure(&outcomes[0]).status, "5.6.7");
    server.borrow_mut().extensions = vec!["8BITMIME".into(), "SMTPUTF8".into()];
    let outcomes = deliver_once(
        &mut host,
        "Q1.eml",
        "s@src.test",
        &rcpts(&["jörg@bücher.test"]),
        &options(),
    );
    assert!(delivered(&outcomes[0]), "{outcomes:?}");
    assert!(
        server
            .borrow()
            .commands
            .contains(&"MAIL FROM:<s@src.test> SMTPUTF8".to_string())
    );
    assert!(
        server
            .borrow()
            .commands
            .contains(&"RCPT TO:<jörg@bücher.test>".to_string())
    );
}

#[test]
fn the_domains_of_a_batch_are_delivered_concurrently() {
    let mut host = host_with_message();
    let domains = ["one.test", "two.test", "three.test"];
    for (n, domain) in domains.iter().enumerate() {
        let exchanger = format!("mx.{domain}");
        let address = format!("127.0.0.{}", n + 1);
        host.mx(domain, &[(10, &exchanger)]);
        host.ip(&exchanger, &address);
        host.server(&address).borrow_mut().slow = true;
    }
    // A fourth domain whose server never answers: it times out alone.
    host.mx("silent.test", &[(10, "mx.silent.test")]);
    host.ip("mx.silent.test", "127.0.0.9");
    let silent = host.server("127.0.0.9");
    silent.borrow_mut().greeting = String::new();
    silent.borrow_mut().slow = true;
    let recipients = rcpts(&["a@one.test", "b@two.test", "c@three.test", "d@silent.test"]);
    let outcomes = deliver_once(&mut host, "Q1.eml", "s@src.test", &recipients, &options());
    assert!(outcomes[..3].iter().all(delivered), "{outcomes:?}");
    let timed_out = failure(&outcomes[3]);
    assert!(!timed_out.permanent);
    assert!(timed_out.text.contains("greeting"), "{}", timed_out.text);
    assert_eq!(
        host.waits_at_connect,
        vec![0, 0, 0, 0],
        "every server was connected before any waiting: one session does not wait for another"
    );
    assert_eq!(
        host.waited_ms,
        u64::from(Timeouts::default().greeting),
        "the silent server costs its greeting timeout once, not once per domain"
    );
}

#[test]
fn a_batch_takes_on_the_messages_handed_over_while_it_runs() {
    let mut host = host_with_message();
    host.files.insert("Q2.eml".into(), MESSAGE.to_vec());
    host.mx("one.test", &[(10, "mx.one.test")]);
    host.ip("mx.one.test", "127.0.0.1");
    host.mx("two.test", &[(10, "mx.two.test")]);
    host.ip("mx.two.test", "127.0.0.2");
    let one = host.server("127.0.0.1");
    let two = host.server("127.0.0.2");
    host.now_ms = ARRIVAL;
    // The first ask finds a message for another domain and one without
    // recipients; the next finds nothing, and the call ends.
    host.more = [vec![
        first_attempt("Q2.eml", &["b@two.test"]),
        first_attempt("Q3.eml", &[]),
    ]]
    .into();
    deliver_batch(
        &mut host,
        vec![first_attempt("Q1.eml", &["a@one.test"])],
        &options(),
    );
    let mut indexes: Vec<usize> = host.recorded.iter().map(|(i, _, _)| *i).collect();
    indexes.sort();
    assert_eq!(indexes, vec![0, 1, 2], "indexes continue the batch's");
    let report = |index: usize| {
        &host
            .recorded
            .iter()
            .find(|(i, _, _)| *i == index)
            .unwrap()
            .1
    };
    assert!(delivered(&report(0).outcomes[0]));
    assert!(delivered(&report(1).outcomes[0]), "{:?}", report(1));
    assert!(report(2).outcomes.is_empty());
    assert_eq!(one.borrow().messages.len(), 1);
    assert_eq!(two.borrow().messages.len(), 1);
    assert!(
        host.asks >= 2,
        "asked until the host had no more: {}",
        host.asks
    );
    assert!(host.more.is_empty());
}

//! The WIT glue: maps the plain-Rust stages onto the `plugin` and `relay`
//! worlds. Nothing here decides anything about mail; it only converts types
//! and forwards calls, so the logic stays testable natively.

#[cfg(feature = "relay")]
pub mod bindings {
    wit_bindgen::generate!({
        world: "relay",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_relay",
        default_bindings_module: "mailroot_guest::component::bindings",
    });
}

#[cfg(not(feature = "relay"))]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_plugin",
        default_bindings_module: "mailroot_guest::component::bindings",
    });
}

use bindings::exports::mailroot::relay::mail_logic as plugin;
use bindings::mailroot::relay::types as wit;

use crate::{bounce, envelope, message, retry, route, validate};

/// The component: implements every export of the world it is built for.
pub struct Component;

impl From<message::ParseError> for wit::ParseError {
    fn from(e: message::ParseError) -> Self {
        match e {
            message::ParseError::Empty => wit::ParseError::Empty,
            message::ParseError::NulByte(offset) => wit::ParseError::NulByte(offset),
            message::ParseError::NoHeaders => wit::ParseError::NoHeaders,
            message::ParseError::BadPickupLine(line) => wit::ParseError::BadPickupLine(line),
        }
    }
}

impl From<envelope::Envelope> for wit::Envelope {
    fn from(e: envelope::Envelope) -> Self {
        wit::Envelope {
            sender: e.sender,
            recipients: e.recipients,
            source: match e.source {
                envelope::Source::PickupLines => wit::EnvelopeSource::PickupLines,
                envelope::Source::ResentHeaders => wit::EnvelopeSource::ResentHeaders,
                envelope::Source::Headers => wit::EnvelopeSource::Headers,
            },
        }
    }
}

impl From<wit::Limits> for validate::Limits {
    fn from(l: wit::Limits) -> Self {
        validate::Limits {
            max_message_bytes: l.max_message_bytes,
            max_recipients: l.max_recipients,
        }
    }
}

impl From<route::Failure> for wit::Failure {
    fn from(f: route::Failure) -> Self {
        wit::Failure {
            permanent: f.permanent,
            status: f.status,
            text: f.text,
        }
    }
}

impl From<wit::MxAnswer> for route::MxAnswer {
    fn from(a: wit::MxAnswer) -> Self {
        match a {
            wit::MxAnswer::Records(records) => route::MxAnswer::Records(
                records
                    .into_iter()
                    .map(|r| route::MxRecord {
                        preference: r.preference,
                        exchange: r.exchange,
                    })
                    .collect(),
            ),
            wit::MxAnswer::NoRecords => route::MxAnswer::NoRecords,
            wit::MxAnswer::NxDomain => route::MxAnswer::NxDomain,
            wit::MxAnswer::Temporary(why) => route::MxAnswer::Temporary(why),
        }
    }
}

impl From<wit::RetrySchedule> for retry::Schedule {
    fn from(s: wit::RetrySchedule) -> Self {
        retry::Schedule {
            intervals: match s.intervals {
                wit::RetryIntervals::Steps(steps) => retry::Intervals::Steps(steps),
                wit::RetryIntervals::Doubling((min, max)) => {
                    retry::Intervals::Doubling { min, max }
                }
            },
            delay_notice_after: s.delay_notice_after,
            give_up_after: s.give_up_after,
        }
    }
}

fn finding(f: validate::Finding) -> wit::Finding {
    wit::Finding {
        severity: match f.severity {
            validate::Severity::Warning => wit::Severity::Warning,
            validate::Severity::Reject => wit::Severity::Reject,
        },
        code: f.code,
        text: f.text,
    }
}

impl From<wit::TlsMode> for route::TlsMode {
    fn from(t: wit::TlsMode) -> Self {
        match t {
            wit::TlsMode::None => route::TlsMode::None,
            wit::TlsMode::Opportunistic => route::TlsMode::Opportunistic,
            wit::TlsMode::Required => route::TlsMode::Required,
            wit::TlsMode::Verify => route::TlsMode::Verify,
        }
    }
}

impl From<route::TlsMode> for wit::TlsMode {
    fn from(t: route::TlsMode) -> Self {
        match t {
            route::TlsMode::None => wit::TlsMode::None,
            route::TlsMode::Opportunistic => wit::TlsMode::Opportunistic,
            route::TlsMode::Required => wit::TlsMode::Required,
            route::TlsMode::Verify => wit::TlsMode::Verify,
        }
    }
}

impl From<wit::NextHop> for route::NextHop {
    fn from(h: wit::NextHop) -> Self {
        route::NextHop {
            hosts: h.hosts,
            port: h.port,
            tls: h.tls.into(),
            credentials: h.credentials.map(|c| route::Credentials {
                username: c.username,
                password: c.password,
            }),
        }
    }
}

impl From<route::NextHop> for wit::NextHop {
    fn from(h: route::NextHop) -> Self {
        wit::NextHop {
            hosts: h.hosts,
            port: h.port,
            tls: h.tls.into(),
            credentials: h.credentials.map(|c| wit::Credentials {
                username: c.username,
                password: c.password,
            }),
        }
    }
}

impl From<wit::Routing> for route::Routing {
    fn from(r: wit::Routing) -> Self {
        route::Routing {
            local_domains: r.local_domains,
            routes: r
                .routes
                .into_iter()
                .map(|d| route::DomainRoute {
                    domain: d.domain,
                    hop: d.hop.into(),
                })
                .collect(),
            smarthost: r.smarthost.map(Into::into),
            mx_tls: r.mx_tls.into(),
            masquerade_domain: r.masquerade_domain,
        }
    }
}

fn dsn_action(a: wit::DsnAction) -> bounce::Action {
    match a {
        wit::DsnAction::Failed => bounce::Action::Failed,
        wit::DsnAction::Delayed => bounce::Action::Delayed,
        wit::DsnAction::Delivered => bounce::Action::Delivered,
        wit::DsnAction::Relayed => bounce::Action::Relayed,
        wit::DsnAction::Expanded => bounce::Action::Expanded,
    }
}

impl plugin::Guest for Component {
    fn parse(raw: Vec<u8>) -> Result<wit::MessageSummary, wit::ParseError> {
        let s = message::summarize(&raw)?;
        Ok(wit::MessageSummary {
            from: s.from,
            sender: s.sender,
            to: s.to,
            cc: s.cc,
            bcc: s.bcc,
            subject: s.subject,
            message_id: s.message_id,
            date: s.date,
            size: s.size,
            header_bytes: s.header_bytes,
            has_eight_bit: s.has_eight_bit,
            has_utf8_headers: s.has_utf8_headers,
            long_lines: s.long_lines,
            longest_line: s.longest_line,
            bare_line_endings: s.bare_line_endings,
            has_pickup_envelope: s.has_pickup_envelope,
        })
    }

    fn derive_envelope(raw: Vec<u8>) -> Result<wit::Envelope, wit::EnvelopeError> {
        envelope::derive(&raw).map(Into::into).map_err(|e| match e {
            envelope::EnvelopeError::Unparseable(p) => wit::EnvelopeError::Unparseable(p.into()),
            envelope::EnvelopeError::NoSender => wit::EnvelopeError::NoSender,
            envelope::EnvelopeError::InvalidSender(why) => wit::EnvelopeError::InvalidSender(why),
            envelope::EnvelopeError::NoRecipients => wit::EnvelopeError::NoRecipients,
            envelope::EnvelopeError::InvalidRecipient(why) => {
                wit::EnvelopeError::InvalidRecipient(why)
            }
        })
    }

    fn choose_route(domain: String, routing: wit::Routing) -> wit::RouteChoice {
        match route::choose_route(&domain, &routing.into()) {
            route::RouteChoice::LocalDrop => wit::RouteChoice::LocalDrop,
            route::RouteChoice::Fixed(rule, hop) => wit::RouteChoice::Fixed((rule, hop.into())),
            route::RouteChoice::Mx(tls) => wit::RouteChoice::Mx(tls.into()),
        }
    }

    fn validate(raw: Vec<u8>, limits: wit::Limits) -> Vec<wit::Finding> {
        validate::validate(&raw, &limits.into())
            .into_iter()
            .map(finding)
            .collect()
    }

    fn plan_delivery(
        domain: String,
        answer: wit::MxAnswer,
        shuffle_seed: u64,
    ) -> Result<wit::DeliveryPlan, wit::Failure> {
        let plan = route::plan_delivery(&domain, &answer.into(), shuffle_seed)?;
        Ok(wit::DeliveryPlan {
            domain: plan.domain,
            hosts: plan.hosts,
            implicit_mx: plan.implicit_mx,
        })
    }

    fn build_bounce(request: wit::BounceRequest) -> Vec<u8> {
        bounce::build_bounce(&bounce::BounceRequest {
            reporting_mta: request.reporting_mta,
            original_sender: request.original_sender,
            arrival_date: request.arrival_date,
            date: request.date,
            message_id: request.message_id,
            will_retry_until: request.will_retry_until,
            recipients: request
                .recipients
                .into_iter()
                .map(|r| bounce::DsnRecipient {
                    recipient: r.recipient,
                    action: dsn_action(r.action),
                    status: r.status,
                    remote_mta: r.remote_mta,
                    diagnostic: r.diagnostic,
                })
                .collect(),
            original: request.original,
        })
    }

    fn retry_profile(name: String) -> Option<wit::RetrySchedule> {
        retry::Schedule::named(&name).map(|s| wit::RetrySchedule {
            intervals: match s.intervals {
                retry::Intervals::Steps(steps) => wit::RetryIntervals::Steps(steps),
                retry::Intervals::Doubling { min, max } => {
                    wit::RetryIntervals::Doubling((min, max))
                }
            },
            delay_notice_after: s.delay_notice_after,
            give_up_after: s.give_up_after,
        })
    }

    fn plan_retry(
        schedule: wit::RetrySchedule,
        attempts: u32,
        arrival_ms: u64,
        now_ms: u64,
        delay_notice_sent: bool,
    ) -> wit::RetryDecision {
        let d =
            retry::Schedule::from(schedule).decide(attempts, arrival_ms, now_ms, delay_notice_sent);
        wit::RetryDecision {
            next_attempt_ms: d.next_attempt_ms,
            expired: d.expired,
            delay_notice_due: d.delay_notice_due,
            give_up_ms: d.give_up_ms,
        }
    }
}

#[cfg(feature = "relay")]
mod relay_world {
    use super::bindings::exports::mailroot::relay::stages as exports;
    use super::bindings::mailroot::relay::{clock, dns, folders, log, queue, smtp_socket};
    use super::{Component, wit};
    use crate::reactor::Waiter;
    use crate::relay::{self, Capabilities, Level, ReadError};
    use crate::route;
    use crate::smtp::{self, SocketError};

    /// The imports of the relay world as [`Capabilities`].
    struct Imports;

    fn read_error(name: &str, e: folders::FolderError) -> ReadError {
        match e {
            folders::FolderError::TooLarge(size) => ReadError::TooLarge(size),
            folders::FolderError::NotFound => {
                ReadError::Unavailable(format!("{name} is not in the queue"))
            }
            folders::FolderError::InvalidName => {
                ReadError::Unavailable(format!("{name:?} is not a valid file name"))
            }
            folders::FolderError::Io(why) => ReadError::Unavailable(why),
        }
    }

    impl From<smtp_socket::SocketError> for SocketError {
        fn from(e: smtp_socket::SocketError) -> Self {
            match e {
                smtp_socket::SocketError::Refused(why) => SocketError::Refused(why),
                smtp_socket::SocketError::TimedOut => SocketError::TimedOut,
                smtp_socket::SocketError::Closed => SocketError::Closed,
                smtp_socket::SocketError::Tls(why) => SocketError::Tls(why),
                smtp_socket::SocketError::Io(why) => SocketError::Io(why),
            }
        }
    }

    impl smtp::Connection for smtp_socket::Connection {
        fn send(&mut self, data: &[u8], timeout_ms: u32) -> Result<(), SocketError> {
            smtp_socket::Connection::send(self, data, timeout_ms).map_err(Into::into)
        }
        fn try_receive(&mut self) -> Result<Option<Vec<u8>>, SocketError> {
            smtp_socket::Connection::try_receive(self).map_err(Into::into)
        }
        fn token(&self) -> u64 {
            smtp_socket::Connection::token(self)
        }
        fn start_tls(
            &mut self,
            server_name: &str,
            verify: bool,
            timeout_ms: u32,
        ) -> Result<(), SocketError> {
            let verification = if verify {
                smtp_socket::TlsVerification::Verify
            } else {
                smtp_socket::TlsVerification::Opportunistic
            };
            smtp_socket::Connection::start_tls(self, server_name, verification, timeout_ms)
                .map_err(Into::into)
        }
    }

    impl Waiter for Imports {
        fn monotonic_ms(&mut self) -> u64 {
            clock::monotonic_ms()
        }
        fn wait(&mut self, timeout_ms: u32) -> Vec<u64> {
            smtp_socket::wait(timeout_ms)
        }
    }

    impl Capabilities for Imports {
        type Conn = smtp_socket::Connection;

        fn read_queue_file(&mut self, name: &str) -> Result<Vec<u8>, ReadError> {
            folders::read(folders::Folder::Queue, name).map_err(|e| read_error(name, e))
        }

        fn read_queue_head(&mut self, name: &str, max_bytes: u64) -> Result<Vec<u8>, ReadError> {
            folders::read_head(folders::Folder::Queue, name, max_bytes)
                .map_err(|e| read_error(name, e))
        }

        fn lookup_mx(&mut self, domain: &str) -> route::MxAnswer {
            dns::lookup_mx(domain).into()
        }

        fn lookup_ip(&mut self, host: &str) -> route::AddressAnswer {
            match dns::lookup_ip(host) {
                dns::AddressAnswer::Addresses(list) => route::AddressAnswer::Addresses(list),
                dns::AddressAnswer::NoRecords => route::AddressAnswer::NoRecords,
                dns::AddressAnswer::NxDomain => route::AddressAnswer::NxDomain,
                dns::AddressAnswer::Temporary(why) => route::AddressAnswer::Temporary(why),
            }
        }

        fn connect(
            &mut self,
            address: &str,
            port: u16,
            timeout_ms: u32,
        ) -> Result<Self::Conn, SocketError> {
            smtp_socket::Connection::connect(address, port, timeout_ms).map_err(Into::into)
        }

        fn write_drop(&mut self, content: &[u8]) -> Result<String, String> {
            folders::write_drop(content).map_err(|e| match read_error("Drop", e) {
                ReadError::TooLarge(size) => format!("{size} bytes is too large"),
                ReadError::Unavailable(why) => why,
            })
        }

        fn now_ms(&mut self) -> u64 {
            clock::now_ms()
        }

        fn record_attempt(&mut self, index: usize, report: relay::DeliveryReport) {
            let report = wit::DeliveryReport {
                outcomes: report
                    .outcomes
                    .into_iter()
                    .map(|o| wit::RecipientOutcome {
                        recipient: o.recipient,
                        result: match o.result {
                            relay::RecipientResult::Delivered(reply) => {
                                wit::RecipientResult::Delivered(reply)
                            }
                            relay::RecipientResult::NotDelivered(f) => {
                                wit::RecipientResult::NotDelivered(f.into())
                            }
                        },
                        remote_mta: o.remote_mta,
                    })
                    .collect(),
                next_attempt_ms: report.next_attempt_ms,
                notices: report
                    .notices
                    .into_iter()
                    .map(|n| wit::Notice {
                        recipient: n.recipient,
                        message: n.message,
                    })
                    .collect(),
                delay_notice_sent: report.delay_notice_sent,
                badmail: report.badmail,
            };
            queue::record_attempt(u32::try_from(index).unwrap_or(u32::MAX), &report);
        }

        fn more_messages(&mut self) -> Vec<relay::QueuedMessage> {
            queue::more_messages()
                .into_iter()
                .map(queued_message)
                .collect()
        }

        fn log(&mut self, level: Level, message: &str) {
            let level = match level {
                Level::Debug => log::Level::Debug,
                Level::Info => log::Level::Info,
                Level::Warn => log::Level::Warn,
                Level::Error => log::Level::Error,
            };
            log::write(level, message);
        }
    }

    fn queued_message(m: wit::QueuedMessage) -> relay::QueuedMessage {
        relay::QueuedMessage {
            file: m.file,
            sender: m.sender,
            recipients: m.recipients,
            state: relay::QueueState {
                queue_id: m.state.queue_id,
                attempts: m.state.attempts,
                arrival_ms: m.state.arrival_ms,
                delay_notice_sent: m.state.delay_notice_sent,
            },
        }
    }

    fn options(o: exports::RelayOptions) -> relay::Options {
        let t = o.timeouts;
        relay::Options {
            hostname: o.hostname,
            smtp_port: o.smtp_port,
            limits: o.limits.into(),
            timeouts: relay::Timeouts {
                connect: t.connect,
                greeting: t.greeting,
                mail: t.mail,
                rcpt: t.rcpt,
                data_init: t.data_init,
                data_block: t.data_block,
                data_end: t.data_end,
            },
            retry: o.retry.into(),
            routing: o.routing.into(),
            max_recipients_per_transaction: o.max_recipients_per_transaction,
        }
    }

    impl exports::Guest for Component {
        fn explain(raw: Vec<u8>, o: exports::RelayOptions) -> exports::Explanation {
            let e = relay::explain(&mut Imports, &raw, &options(o));
            exports::Explanation {
                envelope: e.envelope.map(Into::into),
                findings: e.findings.into_iter().map(super::finding).collect(),
                routes: e
                    .routes
                    .into_iter()
                    .map(|(recipient, r)| exports::RecipientRoute {
                        recipient,
                        via: r.via,
                        hosts: r.hosts,
                        port: r.port,
                        tls: r.tls.into(),
                        failure: r.failure.map(Into::into),
                    })
                    .collect(),
            }
        }

        fn accept(
            files: Vec<exports::ClaimedFile>,
            o: exports::RelayOptions,
        ) -> Vec<Result<exports::Accepted, exports::Rejection>> {
            let options = options(o);
            files
                .into_iter()
                .map(
                    |f| match relay::accept(&mut Imports, &f.file, &f.queue_id, &options) {
                        Ok(a) => Ok(exports::Accepted {
                            envelope: a.envelope.into(),
                            message: a.message,
                            warnings: a.warnings,
                        }),
                        Err(r) => Err(exports::Rejection {
                            code: r.code,
                            text: r.text,
                            temporary: r.temporary,
                            notice: r.notice.map(|n| wit::Notice {
                                recipient: n.recipient,
                                message: n.message,
                            }),
                        }),
                    },
                )
                .collect()
        }

        fn deliver(messages: Vec<wit::QueuedMessage>, o: exports::RelayOptions) {
            let messages = messages.into_iter().map(queued_message).collect();
            relay::deliver_batch(&mut Imports, messages, &options(o));
        }
    }
}

#[cfg(all(feature = "export", feature = "relay"))]
bindings::export_relay!(Component with_types_in bindings);

#[cfg(all(feature = "export", not(feature = "relay")))]
bindings::export_plugin!(Component with_types_in bindings);

//! Everything the operator can set, with the defaults a Postfix or IIS user
//! expects. The CLI fills it; tests and other embedders build it directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::runtime::ComponentLimits;
use crate::runtime::bindings::mailroot::relay::types::{Routing, TlsMode};

/// SMTP client timeouts (RFC 5321 4.5.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmtpTimeouts {
    pub connect: Duration,
    pub greeting: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    pub data_init: Duration,
    pub data_block: Duration,
    pub data_end: Duration,
}

impl SmtpTimeouts {
    /// Every stage with the same timeout (`--smtp-timeout`).
    pub fn uniform(timeout: Duration) -> Self {
        SmtpTimeouts {
            connect: timeout,
            greeting: timeout,
            mail: timeout,
            rcpt: timeout,
            data_init: timeout,
            data_block: timeout,
            data_end: timeout,
        }
    }
}

impl Default for SmtpTimeouts {
    /// RFC 5321: greeting 5 min, MAIL 5, RCPT 5, DATA 2, data block 3, end of
    /// data 10; connect 30 s as Postfix.
    fn default() -> Self {
        let minutes = |m: u64| Duration::from_secs(60 * m);
        SmtpTimeouts {
            connect: Duration::from_secs(30),
            greeting: minutes(5),
            mail: minutes(5),
            rcpt: minutes(5),
            data_init: minutes(2),
            data_block: minutes(3),
            data_end: minutes(10),
        }
    }
}

/// The relay's settings. Not `Debug`: they may hold smart-host credentials,
/// which are never logged.
#[derive(Clone)]
pub struct Settings {
    /// The mailroot directory.
    pub root: PathBuf,
    /// EHLO name, `Received` and `Message-ID` host.
    pub hostname: String,
    /// Port of the exchangers (25; tests use others).
    pub smtp_port: u16,
    /// DNS server; `None` reads `/etc/resolv.conf`.
    pub dns_server: Option<SocketAddr>,
    /// A relay-world component to load instead of the built-in one.
    pub component: Option<PathBuf>,
    /// CA bundle for verified TLS; `None` uses the system store.
    pub ca_file: Option<PathBuf>,
    /// Largest message accepted (10 MiB).
    pub max_message_bytes: u64,
    /// Most recipients per message (1,000).
    pub max_recipients: u32,
    /// Limits on each component call.
    pub component_limits: ComponentLimits,
    pub smtp_timeouts: SmtpTimeouts,
    /// Delivery threads, each running one component call at a time; a call
    /// drives many connections at once, so this is not a connection limit.
    pub workers: usize,
    /// SMTP connections at once, in all (Postfix's `default_process_limit`).
    pub max_connections: usize,
    /// SMTP connections at once to one destination domain (Postfix's
    /// `default_destination_concurrency_limit`).
    pub max_per_destination: usize,
    /// Most recipients in one SMTP transaction; more go in further ones.
    pub max_recipients_per_transaction: u32,
    /// Local domains, routes, smart host, TLS policy, masquerading.
    pub routing: Routing,
    /// How often `serve` looks at Pickup and the queue.
    pub poll_interval: Duration,
    /// The retry profile, by name: `postfix` (default) or `iis`; the
    /// schedules themselves are defined by the component.
    pub retry_profile: String,
    /// Override the profile's delay notice: `Some(None)` never sends one.
    pub delay_notice_after: Option<Option<Duration>>,
    /// Override the profile's give-up time.
    pub give_up_after: Option<Duration>,
    /// A file modified more recently than this is still being written.
    pub settle_time: Duration,
    /// Component failures (trap or CPU stop) on one message before it goes to Badmail.
    pub max_component_failures: u32,
}

impl Settings {
    /// Defaults for a mailroot at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Settings {
            root: root.into(),
            hostname: system_hostname(),
            smtp_port: 25,
            dns_server: None,
            component: None,
            ca_file: None,
            max_message_bytes: 10 * 1024 * 1024,
            max_recipients: 1000,
            component_limits: ComponentLimits::default(),
            smtp_timeouts: SmtpTimeouts::default(),
            workers: 16,
            max_connections: 100,
            max_per_destination: 20,
            max_recipients_per_transaction: 100,
            routing: Routing {
                local_domains: Vec::new(),
                routes: Vec::new(),
                smarthost: None,
                mx_tls: TlsMode::Opportunistic,
                masquerade_domain: None,
            },
            poll_interval: Duration::from_secs(1),
            retry_profile: "postfix".to_string(),
            delay_notice_after: None,
            give_up_after: None,
            settle_time: Duration::from_secs(1),
            max_component_failures: 3,
        }
    }
}

/// The machine's host name, or `localhost`.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

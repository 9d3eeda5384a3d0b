//! The configuration file (`--config FILE`), TOML. Every key is optional;
//! command-line flags given after `--config` override it.
//!
//! ```toml
//! hostname = "relay.example.com"
//! masquerade_domain = "example.com"      # envelope sender domain
//! local_domains = ["intranet.example"]  # written to Drop/ as .eml files
//! max_message_size = 10485760
//! max_recipients = 1000
//! max_recipients_per_transaction = 100
//! retry_profile = "postfix"             # or "iis"
//! mx_tls = "opportunistic"              # none | opportunistic | required | verify
//! ca_file = "/etc/ssl/certs/ca-certificates.crt"
//! max_connections = 100                 # SMTP connections in all
//! max_per_destination = 20              # SMTP connections per destination domain
//! workers = 16                          # delivery threads (each drives many connections)
//!
//! [smarthost]                           # takes all mail not routed otherwise
//! host = "smtp.provider.example"        # or hosts = ["a", "b"]
//! port = 587
//! tls = "verify"
//! credentials = "/etc/mailroot/smarthost.secret"   # "user:password" or two lines
//!
//! [[route]]                             # first match wins
//! domain = "*.partner.example"          # a domain, or *.domain for its subdomains
//! hosts = ["mx1.partner.example", "192.0.2.7"]
//! port = 25
//! tls = "required"
//!
//! [timeouts]                            # seconds (RFC 5321 4.5.3.2 defaults)
//! connect = 30
//! greeting = 300
//! mail = 300
//! rcpt = 300
//! data_init = 120
//! data_block = 180
//! data_end = 600
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::runtime::bindings::mailroot::relay::types::{
    Credentials, DomainRoute, NextHop, TlsMode,
};
use crate::settings::Settings;

/// Why the configuration could not be used.
#[derive(Debug)]
pub enum ConfigError {
    Read(PathBuf, std::io::Error),
    Parse(PathBuf, String),
    Invalid(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Read(path, e) => write!(f, "cannot read {}: {e}", path.display()),
            ConfigError::Parse(path, e) => write!(f, "{}: {e}", path.display()),
            ConfigError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    hostname: Option<String>,
    masquerade_domain: Option<String>,
    #[serde(default)]
    local_domains: Vec<String>,
    max_message_size: Option<u64>,
    max_recipients: Option<u32>,
    max_recipients_per_transaction: Option<u32>,
    retry_profile: Option<String>,
    delay_notice_after: Option<u64>,
    give_up_after: Option<u64>,
    mx_tls: Option<String>,
    ca_file: Option<PathBuf>,
    workers: Option<usize>,
    max_connections: Option<usize>,
    max_per_destination: Option<usize>,
    smtp_port: Option<u16>,
    smarthost: Option<Hop>,
    #[serde(default, rename = "route")]
    routes: Vec<Route>,
    timeouts: Option<Timeouts>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Hop {
    host: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
    port: Option<u16>,
    tls: Option<String>,
    credentials: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Route {
    domain: String,
    #[serde(flatten)]
    hop: Hop,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Timeouts {
    connect: Option<u64>,
    greeting: Option<u64>,
    mail: Option<u64>,
    rcpt: Option<u64>,
    data_init: Option<u64>,
    data_block: Option<u64>,
    data_end: Option<u64>,
}

/// A TLS mode by name.
pub fn tls_mode(name: &str) -> Result<TlsMode, ConfigError> {
    match name {
        "none" => Ok(TlsMode::None),
        "opportunistic" => Ok(TlsMode::Opportunistic),
        "required" => Ok(TlsMode::Required),
        "verify" => Ok(TlsMode::Verify),
        other => Err(ConfigError::Invalid(format!(
            "TLS mode {other:?} is not one of none, opportunistic, required, verify"
        ))),
    }
}

/// Read a credentials file: `user:password` on one line, or the user on the
/// first line and the password on the second. Nothing of it is ever logged.
pub fn read_credentials(path: &Path) -> Result<Credentials, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
    let mut lines = text.lines().map(str::trim_end).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    let (username, password) = match lines.next() {
        Some(password) => (first.to_string(), password.to_string()),
        None => match first.split_once(':') {
            Some((user, password)) => (user.to_string(), password.to_string()),
            None => (String::new(), String::new()),
        },
    };
    if username.is_empty() || password.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{}: expected \"user:password\" or the user and the password on two lines",
            path.display()
        )));
    }
    Ok(Credentials { username, password })
}

fn next_hop(
    hop: Hop,
    what: &str,
    default_port: u16,
    default_tls: TlsMode,
) -> Result<NextHop, ConfigError> {
    let mut hosts = hop.hosts;
    hosts.extend(hop.host);
    if hosts.is_empty() {
        return Err(ConfigError::Invalid(format!("{what} needs host or hosts")));
    }
    let tls = hop
        .tls
        .as_deref()
        .map(tls_mode)
        .transpose()?
        .unwrap_or(default_tls);
    let credentials = hop
        .credentials
        .as_deref()
        .map(read_credentials)
        .transpose()?;
    if credentials.is_some() && tls == TlsMode::None {
        return Err(ConfigError::Invalid(format!(
            "{what}: credentials are only ever sent over TLS; set tls to required or verify"
        )));
    }
    Ok(NextHop {
        hosts,
        port: hop.port.unwrap_or(default_port),
        tls,
        credentials,
    })
}

/// Apply the configuration file at `path` to `settings`.
pub fn apply(path: &Path, settings: &mut Settings) -> Result<(), ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
    let file: File =
        toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e.to_string()))?;
    let secs = Duration::from_secs;
    if let Some(v) = file.hostname {
        settings.hostname = v;
    }
    if let Some(v) = file.smtp_port {
        settings.smtp_port = v;
    }
    settings.routing.masquerade_domain = file
        .masquerade_domain
        .or(settings.routing.masquerade_domain.take());
    settings
        .routing
        .local_domains
        .extend(file.local_domains.into_iter().map(|d| d.to_lowercase()));
    if let Some(v) = file.max_message_size {
        settings.max_message_bytes = v;
    }
    if let Some(v) = file.max_recipients {
        settings.max_recipients = v;
    }
    if let Some(v) = file.max_recipients_per_transaction {
        settings.max_recipients_per_transaction = v.max(1);
    }
    if let Some(v) = file.retry_profile {
        settings.retry_profile = v;
    }
    if let Some(v) = file.delay_notice_after {
        settings.delay_notice_after = Some((v > 0).then(|| secs(v)));
    }
    if let Some(v) = file.give_up_after {
        settings.give_up_after = Some(secs(v));
    }
    if let Some(v) = file.mx_tls {
        settings.routing.mx_tls = tls_mode(&v)?;
    }
    if let Some(v) = file.ca_file {
        settings.ca_file = Some(v);
    }
    if let Some(v) = file.workers {
        settings.workers = v.max(1);
    }
    if let Some(v) = file.max_connections {
        settings.max_connections = v.max(1);
    }
    if let Some(v) = file.max_per_destination {
        settings.max_per_destination = v.max(1);
    }
    if let Some(hop) = file.smarthost {
        settings.routing.smarthost = Some(next_hop(hop, "[smarthost]", 25, TlsMode::Verify)?);
    }
    for route in file.routes {
        let what = format!("[[route]] {}", route.domain);
        let hop = next_hop(route.hop, &what, 25, TlsMode::Opportunistic)?;
        settings.routing.routes.push(DomainRoute {
            domain: route.domain.to_lowercase(),
            hop,
        });
    }
    if let Some(t) = file.timeouts {
        let s = &mut settings.smtp_timeouts;
        for (field, value) in [
            (&mut s.connect, t.connect),
            (&mut s.greeting, t.greeting),
            (&mut s.mail, t.mail),
            (&mut s.rcpt, t.rcpt),
            (&mut s.data_init, t.data_init),
            (&mut s.data_block, t.data_block),
            (&mut s.data_end, t.data_end),
        ] {
            if let Some(v) = value {
                *field = secs(v);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_full_configuration() {
        let dir = std::env::temp_dir().join(format!("mailroot-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, "secret", "relay-user:s3cret:with:colons\n");
        let config = write(
            &dir,
            "mailroot.toml",
            &format!(
                r#"
hostname = "relay.example.com"
masquerade_domain = "example.com"
local_domains = ["Intranet.Example"]
max_recipients_per_transaction = 50
retry_profile = "iis"
mx_tls = "required"

[smarthost]
host = "smtp.provider.example"
port = 587
credentials = "{}"

[[route]]
domain = "*.partner.example"
hosts = ["mx1.partner.example", "192.0.2.7"]
tls = "verify"

[timeouts]
greeting = 20
"#,
                dir.join("secret").display()
            ),
        );
        let mut settings = Settings::new("/tmp/x");
        apply(&config, &mut settings).unwrap();
        assert_eq!(settings.hostname, "relay.example.com");
        assert_eq!(settings.routing.local_domains, vec!["intranet.example"]);
        assert_eq!(
            settings.routing.masquerade_domain.as_deref(),
            Some("example.com")
        );
        assert!(matches!(settings.routing.mx_tls, TlsMode::Required));
        let smarthost = settings.routing.smarthost.as_ref().unwrap();
        assert_eq!(
            (smarthost.hosts.clone(), smarthost.port),
            (vec!["smtp.provider.example".to_string()], 587)
        );
        assert!(
            matches!(smarthost.tls, TlsMode::Verify),
            "a smart host verifies by default"
        );
        let credentials = smarthost.credentials.as_ref().unwrap();
        assert_eq!(
            (credentials.username.as_str(), credentials.password.as_str()),
            ("relay-user", "s3cret:with:colons")
        );
        assert_eq!(settings.routing.routes[0].hop.hosts.len(), 2);
        assert_eq!(settings.smtp_timeouts.greeting, Duration::from_secs(20));
        assert_eq!(settings.max_recipients_per_transaction, 50);
        assert_eq!(settings.retry_profile, "iis");

        let bad = write(&dir, "bad.toml", "mx_tls = \"sometimes\"\n");
        assert!(
            apply(&bad, &mut Settings::new("/tmp/x"))
                .unwrap_err()
                .to_string()
                .contains("sometimes")
        );
        let typo = write(&dir, "typo.toml", "hostnme = \"x\"\n");
        assert!(
            apply(&typo, &mut Settings::new("/tmp/x")).is_err(),
            "unknown keys are refused"
        );
        let plain = write(
            &dir,
            "plain.toml",
            &format!(
                "[smarthost]\nhost = \"h\"\ntls = \"none\"\ncredentials = \"{}\"\n",
                dir.join("secret").display()
            ),
        );
        assert!(
            apply(&plain, &mut Settings::new("/tmp/x"))
                .unwrap_err()
                .to_string()
                .contains("only ever sent over TLS")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

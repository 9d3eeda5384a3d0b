//! The `mailroot` command line. The binary is a thin wrapper over [`run`],
//! so everything the CLI does can be tested in-process.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::logging;
use crate::relay::Relay;
use crate::settings::{Settings, SmtpTimeouts};

/// Exit status when every message was delivered (or nothing was to do).
pub const EXIT_OK: u8 = 0;
/// `--once` left something rejected, failed or deferred.
pub const EXIT_NOT_ALL_DELIVERED: u8 = 1;
/// Bad arguments or the relay could not start.
pub const EXIT_USAGE: u8 = 2;

const USAGE: &str = "\
mailroot: a pickup-folder mail relay (IIS SMTP style) built on a WebAssembly component

usage: mailroot serve --root DIR [options]
       mailroot check FILE [options]

`check` prints what the relay would do with a pickup file (envelope,
validation findings, the route of each recipient) without sending anything,
and exits 1 when the file would go to Badmail or a recipient would fail.

Creates DIR/Pickup, Queue, Badmail and Drop when missing, then relays every
file dropped into Pickup until SIGINT or SIGTERM.

options:
  --root DIR             the mailroot directory (required for serve)
  --config FILE          a TOML configuration file (see README); options after
                         it override it
  --mx-tls MODE          TLS for MX delivery: none, opportunistic (default),
                         required, verify
  --max-connections N    SMTP connections at once, in all (default 100)
  --max-per-destination N  SMTP connections at once to one domain (default 20)
  --once                 process Pickup and the due queue once, then exit:
                         0 when everything was delivered, 1 otherwise
  --hostname NAME        EHLO name and Received/Message-ID host (default: this host)
  --smtp-port N          port of the MX hosts (default 25)
  --dns-server IP:PORT   DNS server to ask (default: nameservers of /etc/resolv.conf)
  --component FILE       load this relay-world component instead of the built-in one
  --ca-file FILE         CA bundle for verified TLS (default: system trust store)
  --max-message-size N   largest message accepted, in bytes (default 10485760)
  --max-recipients N     most recipients per message (default 1000)
  --workers N            delivery threads; each drives many connections (default 16)
  --poll-interval SECS   how often Pickup and the queue are checked (default 1)
  --retry-profile NAME   postfix (default: backoff 300 s doubling to 4000 s,
                         no delay notice, give up after 5 days) or iis (15, 30,
                         60 min, then every 240 min; delay notice after 12 h;
                         give up after 2 days)
  --delay-notice-after SECS  send one delay notice after this long (0: never)
  --give-up-after SECS   bounce what is still pending after this long
  --smtp-timeout SECS    one timeout for every SMTP stage (default: RFC 5321 values)
  --memory-limit MIB     linear memory per component instance (default 256)
  --cpu-limit SECS       guest CPU time per component call (default 10)
  --verbose              log debug lines too
  --help                 this text
";

/// Why the arguments were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\nrun `mailroot --help` for the options", self.0)
    }
}

/// What the command line asks for.
#[derive(Clone)]
pub enum Command {
    Help,
    Serve {
        settings: Box<Settings>,
        once: bool,
        verbose: bool,
    },
    /// Explain what the relay would do with a pickup file.
    Check {
        settings: Box<Settings>,
        file: PathBuf,
    },
}

fn value<T: std::str::FromStr>(flag: &str, raw: Option<String>) -> Result<T, UsageError> {
    let raw = raw.ok_or_else(|| UsageError(format!("{flag} needs a value")))?;
    raw.parse()
        .map_err(|_| UsageError(format!("{flag}: {raw:?} is not a valid value")))
}

fn seconds(flag: &str, raw: Option<String>) -> Result<Duration, UsageError> {
    let secs: f64 = value(flag, raw)?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| UsageError(format!("{flag}: {secs} is not a valid number of seconds")))
}

/// Parse the arguments after the program name.
pub fn parse(args: Vec<String>) -> Result<Command, UsageError> {
    let mut args = args.into_iter();
    let mut root: Option<PathBuf> = None;
    let mut once = false;
    let mut verbose = false;
    let mut settings = Settings::new("");
    let mut command_seen = false;
    let mut check: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "serve" if !command_seen => command_seen = true,
            "check" if !command_seen => {
                command_seen = true;
                check = Some(value("check FILE", args.next())?);
            }
            "--config" => {
                let path: PathBuf = value("--config", args.next())?;
                crate::config::apply(&path, &mut settings)
                    .map_err(|e| UsageError(e.to_string()))?;
            }
            "--mx-tls" => {
                let mode: String = value("--mx-tls", args.next())?;
                settings.routing.mx_tls =
                    crate::config::tls_mode(&mode).map_err(|e| UsageError(e.to_string()))?;
            }
            "--max-connections" => {
                settings.max_connections = value::<usize>("--max-connections", args.next())?.max(1)
            }
            "--max-per-destination" => {
                settings.max_per_destination =
                    value::<usize>("--max-per-destination", args.next())?.max(1)
            }
            "--help" | "-h" | "help" => return Ok(Command::Help),
            "--root" => root = Some(value::<PathBuf>("--root", args.next())?),
            "--once" => once = true,
            "--verbose" | "-v" => verbose = true,
            "--hostname" => settings.hostname = value("--hostname", args.next())?,
            "--smtp-port" => settings.smtp_port = value("--smtp-port", args.next())?,
            "--dns-server" => {
                settings.dns_server = Some(value::<SocketAddr>("--dns-server", args.next())?)
            }
            "--component" => settings.component = Some(value("--component", args.next())?),
            "--ca-file" => settings.ca_file = Some(value("--ca-file", args.next())?),
            "--max-message-size" => {
                settings.max_message_bytes = value("--max-message-size", args.next())?
            }
            "--max-recipients" => settings.max_recipients = value("--max-recipients", args.next())?,
            "--workers" => settings.workers = value::<usize>("--workers", args.next())?.max(1),
            "--poll-interval" => settings.poll_interval = seconds("--poll-interval", args.next())?,
            "--retry-profile" => settings.retry_profile = value("--retry-profile", args.next())?,
            "--delay-notice-after" => {
                let after = seconds("--delay-notice-after", args.next())?;
                settings.delay_notice_after = Some((!after.is_zero()).then_some(after));
            }
            "--give-up-after" => {
                settings.give_up_after = Some(seconds("--give-up-after", args.next())?)
            }
            "--smtp-timeout" => {
                settings.smtp_timeouts =
                    SmtpTimeouts::uniform(seconds("--smtp-timeout", args.next())?)
            }
            "--memory-limit" => {
                let mib: usize = value("--memory-limit", args.next())?;
                settings.component_limits.memory_bytes = mib.saturating_mul(1 << 20);
            }
            "--cpu-limit" => settings.component_limits.cpu = seconds("--cpu-limit", args.next())?,
            other => return Err(UsageError(format!("unknown argument {other:?}"))),
        }
    }
    if let Some(file) = check {
        // `check` needs no mailroot; a scratch one holds the (unused) folders.
        settings.root = root.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("mailroot-check-{}", std::process::id()))
        });
        return Ok(Command::Check {
            settings: Box::new(settings),
            file,
        });
    }
    settings.root = root.ok_or_else(|| UsageError("--root DIR is required".into()))?;
    if settings.hostname.is_empty() || settings.hostname.contains(char::is_whitespace) {
        return Err(UsageError("--hostname must be a host name".into()));
    }
    Ok(Command::Serve {
        settings: Box::new(settings),
        once,
        verbose,
    })
}

/// Run the command line; returns the exit status.
pub fn run(args: Vec<String>) -> u8 {
    let command = match parse(args) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("mailroot: {e}");
            return EXIT_USAGE;
        }
    };
    match command {
        Command::Help => {
            print!("{USAGE}");
            EXIT_OK
        }
        Command::Check { settings, file } => check(*settings, &file),
        Command::Serve {
            settings,
            once,
            verbose,
        } => {
            logging::set_verbose(verbose);
            // Signals are caught before start-up, so a stop request during it
            // ends the relay cleanly instead of killing it.
            let stop = Arc::new(AtomicBool::new(false));
            if !once {
                for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                    if let Err(e) = signal_hook::flag::register(signal, stop.clone()) {
                        logging::error(&format!("cannot handle signal {signal}: {e}"));
                        return EXIT_USAGE;
                    }
                }
            }
            let relay = match Relay::new(*settings) {
                Ok(relay) => relay,
                Err(e) => {
                    logging::error(&e.to_string());
                    return EXIT_USAGE;
                }
            };
            if once {
                let report = relay.run_pass(false);
                logging::info(&format!("pass done: {report:?}"));
                return if report.all_delivered() {
                    EXIT_OK
                } else {
                    EXIT_NOT_ALL_DELIVERED
                };
            }
            relay.serve(&stop);
            EXIT_OK
        }
    }
}

/// `mailroot check FILE`: print the envelope, the findings and the route of
/// each recipient; exit 1 when the file would go to Badmail or a recipient
/// would fail.
fn check(settings: Settings, file: &std::path::Path) -> u8 {
    let raw = match std::fs::read(file) {
        Ok(raw) => raw,
        Err(e) => {
            eprintln!("mailroot: cannot read {}: {e}", file.display());
            return EXIT_USAGE;
        }
    };
    let scratch = settings
        .root
        .starts_with(std::env::temp_dir())
        .then(|| settings.root.clone());
    let relay = Relay::new(settings);
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    let relay = match relay {
        Ok(relay) => relay,
        Err(e) => {
            eprintln!("mailroot: {e}");
            return EXIT_USAGE;
        }
    };
    let explanation = match relay.explain(&raw) {
        Ok(explanation) => explanation,
        Err(e) => {
            eprintln!("mailroot: {e}");
            return EXIT_USAGE;
        }
    };
    let (report, relayable) = crate::relay::format_explanation(file, &explanation);
    print!("{report}");
    if relayable {
        EXIT_OK
    } else {
        EXIT_NOT_ALL_DELIVERED
    }
}

/// Entry point of the binary.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args: Vec<String> = args
        .into_iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    ExitCode::from(run(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn serve_flags() {
        let Command::Serve { settings, once, .. } = parse(args(&[
            "serve",
            "--root",
            "/tmp/mr",
            "--once",
            "--smtp-port",
            "2525",
            "--hostname",
            "relay.test",
            "--dns-server",
            "127.0.0.1:5353",
            "--smtp-timeout",
            "1.5",
        ]))
        .unwrap() else {
            panic!("expected serve")
        };
        assert!(once);
        assert_eq!(settings.smtp_port, 2525);
        assert_eq!(settings.hostname, "relay.test");
        assert_eq!(settings.dns_server, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(settings.smtp_timeouts.greeting, Duration::from_millis(1500));
    }

    #[test]
    fn usage_errors() {
        assert!(parse(args(&["serve"])).is_err());
        assert!(parse(args(&["--root", "/x", "--smtp-port", "seventy"])).is_err());
        assert!(parse(args(&["--root", "/x", "--bogus"])).is_err());
        assert!(matches!(parse(args(&["--help"])), Ok(Command::Help)));
    }
}

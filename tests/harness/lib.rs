//! Real peers for mailroot's end-to-end tests: NSD serving a test zone, and
//! aiosmtpd recording SMTP servers (`peers/smtp_peer.py`), each on its own
//! loopback address, plus a scratch mailroot. A missing peer program fails
//! the test loudly: nothing here is skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dns_check::wait_for_dns;

/// Port every test SMTP server listens on (each on its own address).
pub const SMTP_PORT: u16 = 2525;
/// Port of every test DNS server (each on its own address).
pub const DNS_PORT: u16 = 5300;

/// A fresh loopback address per call, distinct across concurrently running
/// test processes: 127.<pid-derived>.<n>.<n>.
pub fn unique_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let block = 16 + (std::process::id() % 200) as u8;
    Ipv4Addr::new(127, block, (n / 250) as u8, (n % 250 + 2) as u8)
}

/// A scratch directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mailroot-test-{}-{label}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

fn require(program: &str, hint: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed ({hint}); .ci/run installs it"
    );
}

/// Kill a child process and wait for it.
fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// NSD, authoritative for `test.` with the records given, on its own address.
pub struct Dns {
    child: Child,
    pub addr: SocketAddr,
    _dir: Scratch,
}

impl Dns {
    /// Serve `records` (zone-file lines relative to `test.`, such as
    /// `d1 IN MX 10 mx.d1`). Each name in `broken_zones` (such as
    /// `servfail.test`) is configured without a zone file, so NSD answers
    /// SERVFAIL for it, as a real broken zone does.
    pub fn start(records: &[String], broken_zones: &[&str]) -> Self {
        require("nsd", "Debian package nsd");
        let dir = Scratch::new("nsd");
        let ip = unique_ip();
        let addr = SocketAddr::from((ip, DNS_PORT));
        let mut zone = String::from(
            "$ORIGIN test.\n$TTL 60\n@ IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60\n@ IN NS ns.test.\n",
        );
        zone.push_str(&format!("ns IN A {ip}\n"));
        for record in records {
            zone.push_str(record);
            zone.push('\n');
        }
        fs::write(dir.0.join("test.zone"), zone).unwrap();
        let d = dir.0.display();
        let mut conf = format!(
            "server:\n  ip-address: {ip}@{DNS_PORT}\n  do-ip6: no\n  username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n  zonelistfile: \"{d}/zone.list\"\n  xfrdfile: \"{d}/xfrd.state\"\n  xfrdir: \"{d}\"\n  pidfile: \"{d}/nsd.pid\"\n  logfile: \"{d}/nsd.log\"\n  server-count: 1\nremote-control:\n  control-enable: no\nzone:\n  name: \"test\"\n  zonefile: \"test.zone\"\n"
        );
        for broken in broken_zones {
            conf.push_str(&format!(
                "zone:\n  name: \"{broken}\"\n  zonefile: \"missing-on-purpose.zone\"\n"
            ));
        }
        fs::write(dir.0.join("nsd.conf"), conf).unwrap();
        let child = Command::new("nsd")
            .args(["-d", "-c"])
            .arg(dir.0.join("nsd.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nsd");
        let dns = Dns {
            child,
            addr,
            _dir: dir,
        };
        wait_for_dns(addr);
        dns
    }

    /// Serve one exchanger for each domain: `NAME IN MX 10 mx.NAME` and
    /// `mx.NAME IN A IP`, the set-up most tests need.
    pub fn with_exchangers(exchangers: &[(&str, Ipv4Addr)]) -> Self {
        let records: Vec<String> = exchangers
            .iter()
            .flat_map(|(name, ip)| {
                [
                    format!("{name} IN MX 10 mx.{name}"),
                    format!("mx.{name} IN A {ip}"),
                ]
            })
            .collect();
        Dns::start(&records, &[])
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

mod dns_check {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    /// Wait until the server answers for `ns.test`.
    pub fn wait_for_dns(addr: SocketAddr) {
        let resolver =
            mailroot::dns::Resolver::with_server(addr).timeout(Duration::from_millis(100));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let mailroot::dns::Answer::Records(_) =
                resolver.query("ns.test", mailroot::dns::RecordType::A)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the DNS server on {addr} did not come up");
    }
}

/// One message as the SMTP server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub mail_from: String,
    pub mail_options: Vec<String>,
    pub rcpt_tos: Vec<String>,
    /// The DATA content, dot-unstuffed, as bytes.
    pub data: Vec<u8>,
    /// The session ran over TLS.
    pub tls: bool,
    /// The user the session authenticated as.
    pub auth_user: Option<String>,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// A recording SMTP server (aiosmtpd) on its own loopback address.
pub struct SmtpPeer {
    child: Child,
    pub ip: Ipv4Addr,
    dir: Scratch,
}

impl SmtpPeer {
    /// Start a server that accepts everything.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Start with extra `smtp_peer.py` options (`--mail-reply`, `--rcpt-reply`).
    pub fn start_with(options: &[&str]) -> Self {
        require("python3", "python3 with aiosmtpd from PyPI");
        let dir = Scratch::new("smtp");
        let ip = unique_ip();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/smtp_peer.py");
        let child = Command::new("python3")
            .arg(script)
            .arg("--listen")
            .arg(format!("{ip}:{SMTP_PORT}"))
            .arg("--out")
            .arg(&dir.0)
            .args(options)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.0.join("stderr.log")).unwrap())
            .spawn()
            .expect("start python3 smtp_peer.py");
        let mut peer = SmtpPeer { child, ip, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !peer.dir.0.join("ready").exists() {
            if let Ok(Some(status)) = peer.child.try_wait() {
                let log = fs::read_to_string(peer.dir.0.join("stderr.log")).unwrap_or_default();
                panic!("the SMTP peer exited ({status}); is aiosmtpd installed? {log}");
            }
            assert!(
                Instant::now() < deadline,
                "the SMTP peer on {ip} did not come up"
            );
            std::thread::sleep(Duration::from_millis(30));
        }
        peer
    }

    fn events(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.dir.0.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// Connections the server accepted so far.
    pub fn connections(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| e["event"] == "connect")
            .count()
    }

    /// The most connections the client held open at once so far: each
    /// counts from its connect until the client closed its side (the server
    /// may still be finishing a delayed QUIT reply after that).
    pub fn peak_connections(&self) -> usize {
        let mut open = std::collections::HashSet::new();
        let mut peak = 0;
        for event in self.events() {
            let peer = event["peer"].as_str().unwrap_or_default().to_string();
            match event["event"].as_str() {
                Some("connect") => {
                    open.insert(peer);
                    peak = peak.max(open.len());
                }
                Some("client-closed" | "disconnect") => {
                    open.remove(&peer);
                }
                _ => {}
            }
        }
        peak
    }

    /// Messages the server accepted so far.
    pub fn messages(&self) -> Vec<Received> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == "message")
            .map(|e| Received {
                mail_from: e["mail_from"].as_str().unwrap().to_string(),
                mail_options: e["mail_options"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| o.as_str().unwrap().to_string())
                    .collect(),
                rcpt_tos: e["rcpt_tos"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect(),
                data: e["data"]
                    .as_str()
                    .unwrap()
                    .chars()
                    .map(|c| c as u32 as u8)
                    .collect(),
                tls: e["tls"].as_bool().unwrap_or(false),
                auth_user: e["auth_user"].as_str().map(str::to_string),
            })
            .collect()
    }
}

impl Drop for SmtpPeer {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A scratch mailroot and the `mailroot` command line run in-process.
pub struct TestMailroot {
    pub root: Scratch,
    pub dns: SocketAddr,
}

impl TestMailroot {
    pub fn new(dns: &Dns) -> Self {
        TestMailroot {
            root: Scratch::new("root"),
            dns: dns.addr,
        }
    }

    pub fn dir(&self, folder: &str) -> PathBuf {
        self.root.0.join(folder)
    }

    /// Drop a finished file into Pickup, dated in the past so it is settled.
    pub fn drop_file(&self, name: &str, content: &[u8]) {
        let pickup = self.dir("Pickup");
        fs::create_dir_all(&pickup).unwrap();
        let path = pickup.join(name);
        fs::write(&path, content).unwrap();
        backdate(&path);
    }

    /// The command-line arguments for this mailroot.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--root".into(),
            self.root.0.display().to_string(),
            "--once".into(),
            "--hostname".into(),
            "relay.test".into(),
            "--smtp-port".into(),
            SMTP_PORT.to_string(),
            "--dns-server".into(),
            self.dns.to_string(),
            "--smtp-timeout".into(),
            "10".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// `mailroot serve --once` with these options; returns the exit status.
    pub fn run_once(&self, extra: &[&str]) -> u8 {
        mailroot::cli::run(self.args(extra))
    }

    /// Sorted file names of a folder.
    pub fn files(&self, folder: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.dir(folder))
            .map(|dir| {
                dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// A Badmail reason file, parsed.
    pub fn reason(&self, name: &str) -> serde_json::Value {
        let path = self.dir("Badmail").join(format!("{name}.reason.json"));
        let text = fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; Badmail has {:?}",
                path.display(),
                self.files("Badmail")
            )
        });
        serde_json::from_str(&text).unwrap()
    }

    /// The control records of the queue.
    pub fn queued(&self) -> Vec<serde_json::Value> {
        self.files("Queue")
            .iter()
            .filter(|n| n.ends_with(".json"))
            .map(|n| {
                serde_json::from_str(&fs::read_to_string(self.dir("Queue").join(n)).unwrap())
                    .unwrap()
            })
            .collect()
    }
}

/// A test certificate authority and a server certificate it signed, made
/// with the `openssl` command.
pub struct TestCertificates {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: Scratch,
}

impl TestCertificates {
    /// A CA, and a certificate for `server_name` signed by it.
    pub fn new(server_name: &str) -> Self {
        require("openssl", "Debian package openssl");
        let dir = Scratch::new("certs");
        let d = &dir.0;
        let run = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=mailroot test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            &format!("/CN={server_name}"),
        ]);
        fs::write(d.join("ext.cnf"), format!("subjectAltName=DNS:{server_name}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")).unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        TestCertificates {
            ca: d.join("ca.pem"),
            cert: d.join("server.pem"),
            key: d.join("server.key"),
            _dir: dir,
        }
    }
}

/// A private Postfix instance (its own configuration, queue and log in a
/// scratch directory) with an smtpd on its own loopback address, offering
/// STARTTLS with the given certificate, relaying what it accepts for
/// `domain` to `relay_to` (an [`SmtpPeer`] that records it).
pub struct PostfixPeer {
    pub ip: Ipv4Addr,
    config: PathBuf,
    dir: Scratch,
}

impl PostfixPeer {
    pub fn start(certificates: &TestCertificates, domain: &str, relay_to: Ipv4Addr) -> Self {
        require("postfix", "Debian package postfix");
        let dir = Scratch::new("postfix");
        let d = dir.0.clone();
        let ip = unique_ip();
        for sub in ["conf", "spool", "data"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        // Postfix's daemons run as the postfix user: they must reach the directory.
        let status = Command::new("chmod")
            .arg("755")
            .arg(&d)
            .arg(d.join("conf"))
            .status()
            .unwrap();
        assert!(status.success());
        let status = Command::new("chown")
            .arg("postfix")
            .arg(d.join("data"))
            .status()
            .unwrap();
        assert!(
            status.success(),
            "chown postfix: is the postfix user there?"
        );
        fs::copy(&certificates.cert, d.join("cert.pem")).unwrap();
        fs::copy(&certificates.key, d.join("key.pem")).unwrap();
        let dd = d.display();
        fs::write(
            d.join("conf/main.cf"),
            format!(
                "compatibility_level = 3.6\nqueue_directory = {dd}/spool\ndata_directory = {dd}/data\nmyhostname = mx.{domain}\n\
                 mydestination =\nlocal_recipient_maps =\nlocal_transport = error:no local delivery\nalias_maps =\nalias_database =\n\
                 inet_interfaces = all\ninet_protocols = ipv4\nmynetworks = 127.0.0.0/8\nrelay_domains = {domain}\n\
                 relayhost = [{relay_to}]:{SMTP_PORT}\nsmtpd_tls_cert_file = {dd}/cert.pem\nsmtpd_tls_key_file = {dd}/key.pem\n\
                 smtpd_tls_security_level = may\nsmtpd_tls_received_header = yes\nmaillog_file_prefixes = {dd}\n\
                 maillog_file = {dd}/maillog\nsmtputf8_enable = no\nbiff = no\n"
            ),
        )
        .unwrap();
        let mut master = format!("{ip}:{SMTP_PORT} inet n - n - - smtpd\n");
        for line in [
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ] {
            master.push_str(line);
            master.push('\n');
        }
        fs::write(d.join("conf/master.cf"), master).unwrap();
        let config = d.join("conf");
        let output = Command::new("postfix")
            .arg("-c")
            .arg(&config)
            .arg("start")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "postfix start: {} {}",
            String::from_utf8_lossy(&output.stderr),
            fs::read_to_string(d.join("maillog")).unwrap_or_default()
        );
        let peer = PostfixPeer { ip, config, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect_timeout(
            &SocketAddr::from((ip, SMTP_PORT)),
            Duration::from_millis(200),
        )
        .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "Postfix did not listen on {ip}: {}",
                peer.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        peer
    }

    /// Postfix's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.0.join("maillog")).unwrap_or_default()
    }
}

impl Drop for PostfixPeer {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(&self.config)
            .arg("stop")
            .output();
    }
}

/// Postfix's `smtp-sink`, a real SMTP server for tests and benchmarks, on
/// its own address, dumping each message it receives into a file.
pub struct SmtpSink {
    child: Child,
    pub ip: Ipv4Addr,
    dir: Scratch,
}

impl SmtpSink {
    /// Start with extra options (`-8`: no 8BITMIME, ...).
    pub fn start(options: &[&str]) -> Self {
        require("smtp-sink", "Debian package postfix");
        let dir = Scratch::new("sink");
        let ip = unique_ip();
        // As root, smtp-sink insists on dropping privileges (-u); its dumps
        // go to a directory that user can write.
        let status = Command::new("chmod")
            .arg("1777")
            .arg(&dir.0)
            .status()
            .unwrap();
        assert!(status.success());
        let child = Command::new("smtp-sink")
            .args(["-u", "nobody"])
            .args(options)
            .arg("-d")
            .arg(format!("{}/message.", dir.0.display()))
            .arg(format!("{ip}:{SMTP_PORT}"))
            .arg("64")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start smtp-sink");
        let sink = SmtpSink { child, ip, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(
            &SocketAddr::from((ip, SMTP_PORT)),
            Duration::from_millis(200),
        )
        .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "smtp-sink did not listen on {ip}"
            );
            std::thread::sleep(Duration::from_millis(30));
        }
        sink
    }

    /// The messages dumped so far (smtp-sink's dump format: envelope lines, then the message).
    pub fn dumped(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|f| String::from_utf8_lossy(&fs::read(f).unwrap()).into_owned())
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A fault no real server produces: accepts connections and never says a
/// word (hand-written, as the guide allows for fault injection).
pub struct SilentServer {
    pub ip: Ipv4Addr,
    _listener: std::net::TcpListener,
}

impl SilentServer {
    pub fn start() -> Self {
        let ip = unique_ip();
        let listener = std::net::TcpListener::bind((ip, SMTP_PORT)).unwrap();
        // The kernel completes the handshakes; nobody ever reads or writes.
        SilentServer {
            ip,
            _listener: listener,
        }
    }
}

/// A clock the test moves by hand: the relay's queue and component see it.
#[derive(Clone)]
pub struct ManualClock(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl ManualClock {
    /// Starting at the real time, so that backdated Pickup files are settled.
    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        ManualClock(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(ms)))
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl mailroot::clock::Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.get()
    }
}

impl TestMailroot {
    /// A relay on this mailroot, in-process, with `clock` and these options.
    pub fn relay(&self, clock: &ManualClock, extra: &[&str]) -> mailroot::Relay {
        let mailroot::cli::Command::Serve { settings, .. } =
            mailroot::cli::parse(self.args(extra)).unwrap()
        else {
            panic!("not a serve command");
        };
        mailroot::Relay::with_clock(*settings, std::sync::Arc::new(clock.clone())).unwrap()
    }
}

/// One part of a MIME multipart body: its headers and body, as text.
#[derive(Debug, Clone)]
pub struct Part {
    pub headers: String,
    pub body: String,
}

/// Split a `multipart/*` message into its parts (enough for DSNs).
pub fn mime_parts(message: &str) -> Vec<Part> {
    let boundary = message
        .split("boundary=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no boundary in {message}"));
    let delimiter = format!("\r\n--{boundary}");
    message
        .split(&delimiter)
        .skip(1)
        .filter(|chunk| !chunk.starts_with("--"))
        .map(|chunk| {
            let chunk = chunk.trim_start_matches("\r\n");
            let (headers, body) = chunk.split_once("\r\n\r\n").unwrap_or((chunk, ""));
            Part {
                headers: headers.to_string(),
                body: body.to_string(),
            }
        })
        .collect()
}

/// The value of header `name` in a header block (first occurrence, unfolded).
pub fn header(block: &str, name: &str) -> Option<String> {
    let prefix = format!("{}:", name.to_ascii_lowercase());
    let mut lines = block.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        if line.to_ascii_lowercase().starts_with(&prefix) {
            let mut value = line[prefix.len()..].trim().to_string();
            while let Some(next) = lines.peek().filter(|l| l.starts_with([' ', '\t'])) {
                value.push(' ');
                value.push_str(next.trim());
                lines.next();
            }
            return Some(value);
        }
    }
    None
}

/// Set a file's modification time 10 s into the past.
pub fn backdate(path: &Path) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(10))
        .unwrap();
}

/// A pickup file with IIS envelope lines.
pub fn pickup_file(sender: &str, recipients: &[&str], headers_and_body: &str) -> Vec<u8> {
    let mut text = format!("x-sender: {sender}\r\n");
    for r in recipients {
        text.push_str(&format!("x-receiver: {r}\r\n"));
    }
    text.push_str(headers_and_body);
    text.into_bytes()
}

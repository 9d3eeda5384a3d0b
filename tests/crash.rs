//! Fault injection: 2,000 messages, the relay killed with SIGKILL at random
//! moments several times and restarted each time. Every message must arrive;
//! duplicates may only come from deliveries in flight at a kill, and the
//! relay must say so when it restarts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use mailroot_e2e::{Dns, SmtpPeer, TestMailroot, backdate, header};

const MESSAGES: usize = 2000;
const KILLS: usize = 6;
const WORKERS: usize = 8;

/// A small xorshift generator: random kill moments without a dependency.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn start_relay(root: &TestMailroot, log: &std::path::Path) -> Child {
    let mut args = root.args(&["--workers", &WORKERS.to_string(), "--poll-interval", "0.05"]);
    args.retain(|a| a != "--once");
    Command::new(env!("CARGO_BIN_EXE_mailroot-under-test"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap()
}

#[test]
fn every_message_survives_repeated_kill_9() {
    let peer = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[("d1", peer.ip)]);
    let root = TestMailroot::new(&dns);
    fs::create_dir_all(root.dir("Pickup")).unwrap();
    for n in 0..MESSAGES {
        let path = root.dir("Pickup").join(format!("msg-{n:05}.eml"));
        let body = format!(
            "x-sender: s@src.test\r\nx-receiver: r{}@d1.test\r\nFrom: s@src.test\r\nTo: r@d1.test\r\nSubject: crash test\r\nX-Sequence: {n}\r\n\r\n{}\r\n",
            n % 7,
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(50)
        );
        fs::write(&path, body).unwrap();
        backdate(&path);
    }

    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut random = Random(seed);
    let log = root.root.0.join("relay.log");
    for kill in 0..KILLS {
        let mut relay = start_relay(&root, &log);
        let wait = 300 + random.below(1200);
        std::thread::sleep(Duration::from_millis(wait));
        relay.kill().unwrap(); // SIGKILL
        relay.wait().unwrap();
        eprintln!(
            "kill {} after {wait} ms: {} messages at the server",
            kill + 1,
            peer.messages().len()
        );
    }

    // The last run finishes the work.
    let mut relay = start_relay(&root, &log);
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut counts: HashMap<String, usize> = HashMap::new();
    while Instant::now() < deadline {
        counts.clear();
        for message in peer.messages() {
            let text = message.text();
            let (headers, _) = text.split_once("\r\n\r\n").unwrap();
            *counts
                .entry(header(headers, "X-Sequence").unwrap())
                .or_default() += 1;
        }
        if counts.len() == MESSAGES
            && root.files("Queue").is_empty()
            && root.files("Pickup").is_empty()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(relay.id().to_string())
        .status();
    relay.wait().unwrap();

    let delivered = counts.values().sum::<usize>();
    let duplicates = delivered - counts.len();
    let log_text = fs::read_to_string(&log).unwrap();
    let warned = log_text.matches("may receive the message twice").count();
    eprintln!(
        "{MESSAGES} messages, {KILLS} kills (seed {seed}): {} arrived, {duplicates} duplicates, {warned} restart warnings of possible duplicates",
        counts.len()
    );
    assert_eq!(
        counts.len(),
        MESSAGES,
        "every message arrived; queue: {:?}",
        root.files("Queue").len()
    );
    assert!(
        root.files("Badmail").is_empty(),
        "{:?}",
        root.files("Badmail")
    );
    assert!(root.files("Queue").is_empty());
    // Only deliveries in flight at a kill can repeat: at most one per worker per kill,
    // and each is announced on restart.
    assert!(duplicates <= KILLS * WORKERS, "{duplicates} duplicates");
    assert!(
        warned >= duplicates,
        "{duplicates} duplicates but {warned} warnings"
    );
}

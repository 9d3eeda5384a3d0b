//! Delivery an operator deploys: STARTTLS modes against a TLS server with a
//! test certificate, AUTH to a smart host, per-domain routes, the Drop
//! folder, transactions of 100 recipients, a silent server, and `check`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::process::Command;
use std::time::{Duration, Instant};

use mailroot_e2e::{
    Dns, PostfixPeer, SilentServer, SmtpPeer, SmtpSink, TestCertificates, TestMailroot, pickup_file,
};

fn write_config(root: &TestMailroot, text: &str) -> String {
    let path = root.root.0.join("mailroot.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn starttls_verify_succeeds_with_the_test_ca_and_fails_without_it() {
    let certs = TestCertificates::new("mx.tls.test");
    let peer = SmtpPeer::start_with(&[
        "--tls-cert",
        certs.cert.to_str().unwrap(),
        "--tls-key",
        certs.key.to_str().unwrap(),
    ]);
    let dns = Dns::with_exchangers(&[("tls", peer.ip)]);
    let message = pickup_file("s@src.test", &["r@tls.test"], "Subject: tls\r\n\r\nx\r\n");

    // verify, with the test CA: delivered over TLS.
    let root = TestMailroot::new(&dns);
    root.drop_file("verified.eml", &message);
    assert_eq!(
        root.run_once(&[
            "--mx-tls",
            "verify",
            "--ca-file",
            certs.ca.to_str().unwrap()
        ]),
        0
    );
    let got = peer.messages();
    assert_eq!(got.len(), 1);
    assert!(got[0].tls, "the session ran over TLS");

    // verify, with the system trust store only: the certificate does not verify; deferred.
    let root = TestMailroot::new(&dns);
    root.drop_file("unverified.eml", &message);
    assert_eq!(root.run_once(&["--mx-tls", "verify"]), 1);
    assert_eq!(
        peer.messages().len(),
        1,
        "nothing sent to an unverified server"
    );
    let queued = root.queued();
    let recipient = &queued[0]["recipients"][0];
    assert_eq!(recipient["state"], "pending");
    assert_eq!(recipient["status"], "4.7.5");
    assert!(
        recipient["last_reply"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("certificate"),
        "{recipient}"
    );

    // opportunistic (the default): TLS when offered, the certificate unchecked.
    let root = TestMailroot::new(&dns);
    root.drop_file("opportunistic.eml", &message);
    assert_eq!(root.run_once(&[]), 0);
    assert!(peer.messages()[1].tls);
}

#[test]
fn starttls_to_postfix_verifies_with_the_test_ca_and_fails_without_it() {
    let certs = TestCertificates::new("mx.pftls.test");
    let recorder = SmtpPeer::start();
    let postfix = PostfixPeer::start(&certs, "pftls.test", recorder.ip);
    let dns = Dns::with_exchangers(&[("pftls", postfix.ip)]);
    let message = pickup_file(
        "s@src.test",
        &["r@pftls.test"],
        "Subject: to postfix\r\n\r\nx\r\n",
    );

    // Without the test CA the certificate does not verify: deferred, nothing sent.
    let root = TestMailroot::new(&dns);
    root.drop_file("unverified.eml", &message);
    assert_eq!(root.run_once(&["--mx-tls", "verify"]), 1);
    let recipient = &root.queued()[0]["recipients"][0];
    assert_eq!(recipient["status"], "4.7.5", "{recipient}");

    // With it: Postfix accepts the message over TLS and relays it on.
    let root = TestMailroot::new(&dns);
    root.drop_file("verified.eml", &message);
    assert_eq!(
        root.run_once(&[
            "--mx-tls",
            "verify",
            "--ca-file",
            certs.ca.to_str().unwrap()
        ]),
        0
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while recorder.messages().is_empty() {
        assert!(
            Instant::now() < deadline,
            "Postfix did not relay the message: {}",
            postfix.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = recorder.messages();
    assert_eq!(got.len(), 1, "only the verified attempt reached Postfix");
    let text = got[0].text();
    assert!(
        text.contains("(using TLS"),
        "Postfix's Received header records TLS: {text}"
    );
    assert!(text.contains("Subject: to postfix"));
    let log = postfix.log();
    assert!(
        log.contains("alert unknown ca"),
        "the first attempt refused Postfix's certificate: {log}"
    );
    assert!(
        log.contains("starttls=1 mail=1 rcpt=1 data=1"),
        "the second sent the message after STARTTLS: {log}"
    );
}

#[test]
fn required_tls_defers_when_the_server_offers_none() {
    let peer = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[("plain", peer.ip)]);
    let root = TestMailroot::new(&dns);
    root.drop_file(
        "needs-tls.eml",
        &pickup_file("s@src.test", &["r@plain.test"], "Subject: x\r\n\r\nx\r\n"),
    );
    assert_eq!(root.run_once(&["--mx-tls", "required"]), 1);
    assert!(peer.messages().is_empty());
    let recipient = &root.queued()[0]["recipients"][0];
    assert_eq!(recipient["status"], "4.7.0");
    assert!(
        recipient["last_reply"]
            .as_str()
            .unwrap()
            .contains("does not offer STARTTLS")
    );
}

#[test]
fn a_smart_host_with_auth_over_tls() {
    let certs = TestCertificates::new("smarthost.test");
    let peer = SmtpPeer::start_with(&[
        "--tls-cert",
        certs.cert.to_str().unwrap(),
        "--tls-key",
        certs.key.to_str().unwrap(),
        "--auth",
        "relay-user:correct horse",
    ]);
    let dns = Dns::start(&[format!("smarthost IN A {}", peer.ip)], &[]);
    let root = TestMailroot::new(&dns);
    let secret = root.root.0.join("smarthost.secret");
    let config = |password: &str| {
        std::fs::write(&secret, format!("relay-user:{password}\n")).unwrap();
        write_config(
            &root,
            &format!(
                "[smarthost]\nhost = \"smarthost.test\"\nport = 2525\ntls = \"verify\"\ncredentials = \"{}\"\n",
                secret.display()
            ),
        )
    };
    // The smart host takes mail for any domain, without MX lookups.
    root.drop_file(
        "via-smarthost.eml",
        &pickup_file(
            "s@src.test",
            &["a@anywhere.example", "b@elsewhere.example"],
            "Subject: x\r\n\r\nx\r\n",
        ),
    );
    let config_path = config("correct horse");
    assert_eq!(
        root.run_once(&[
            "--config",
            &config_path,
            "--ca-file",
            certs.ca.to_str().unwrap()
        ]),
        0
    );
    let got = peer.messages();
    assert_eq!(got.len(), 2, "one transaction per destination domain");
    assert!(
        got.iter()
            .all(|m| m.tls && m.auth_user.as_deref() == Some("relay-user"))
    );

    // A wrong password defers (no bounce) and sends nothing.
    root.drop_file(
        "bad-password.eml",
        &pickup_file(
            "s@src.test",
            &["c@anywhere.example"],
            "Subject: y\r\n\r\ny\r\n",
        ),
    );
    let config_path = config("wrong");
    assert_eq!(
        root.run_once(&[
            "--config",
            &config_path,
            "--ca-file",
            certs.ca.to_str().unwrap()
        ]),
        1
    );
    assert_eq!(peer.messages().len(), 2);
    let recipient = &root.queued()[0]["recipients"][0];
    assert!(
        recipient["last_reply"]
            .as_str()
            .unwrap()
            .starts_with("AUTH: 535"),
        "{recipient}"
    );
    assert!(
        !recipient.to_string().contains("wrong"),
        "the password never appears"
    );
}

#[test]
fn a_150_recipient_message_goes_in_two_transactions() {
    let peer = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[("many", peer.ip)]);
    let root = TestMailroot::new(&dns);
    let recipients: Vec<String> = (0..150).map(|n| format!("user{n:03}@many.test")).collect();
    let refs: Vec<&str> = recipients.iter().map(String::as_str).collect();
    root.drop_file(
        "many.eml",
        &pickup_file("s@src.test", &refs, "Subject: all hands\r\n\r\nx\r\n"),
    );
    assert_eq!(root.run_once(&[]), 0);
    let got = peer.messages();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].rcpt_tos.len(), 100);
    assert_eq!(got[1].rcpt_tos.len(), 50);
    let mut all: Vec<String> = got.iter().flat_map(|m| m.rcpt_tos.clone()).collect();
    all.sort();
    assert_eq!(all, recipients);
    assert_eq!(peer.connections(), 1, "both transactions on one connection");
}

#[test]
fn a_silent_server_times_out_while_another_domain_is_delivered() {
    let silent = SilentServer::start();
    let peer = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[("slow", silent.ip), ("fast", peer.ip)]);
    let root = TestMailroot::new(&dns);
    root.drop_file(
        "a-slow.eml",
        &pickup_file("s@src.test", &["r@slow.test"], "Subject: slow\r\n\r\nx\r\n"),
    );
    root.drop_file(
        "b-fast.eml",
        &pickup_file("s@src.test", &["r@fast.test"], "Subject: fast\r\n\r\nx\r\n"),
    );
    let started = Instant::now();
    let args = root.args(&["--smtp-timeout", "4"]);
    let pass = std::thread::spawn(move || mailroot::cli::run(args));
    let mut fast_arrived = None;
    while !pass.is_finished() {
        if fast_arrived.is_none() && !peer.messages().is_empty() {
            fast_arrived = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let finished = started.elapsed();
    assert_eq!(
        pass.join().unwrap(),
        1,
        "the silent destination is deferred"
    );
    let fast_arrived = fast_arrived.expect("the other domain was delivered during the pass");
    assert!(
        finished >= Duration::from_secs(4),
        "the greeting timeout ran out: {finished:?}"
    );
    assert!(
        fast_arrived + Duration::from_secs(2) < finished,
        "delivered at {fast_arrived:?}, while the silent server held on until {finished:?}"
    );
    let queued = root.queued();
    assert_eq!(queued.len(), 1);
    assert!(
        queued[0]["recipients"][0]["last_reply"]
            .as_str()
            .unwrap()
            .contains("greeting: timed out"),
        "{}",
        queued[0]
    );
}

/// Destinations behind one slow server (every reply takes 0.3 s). Two
/// delivery workers hold 200 sessions at once: the files are accepted a
/// chunk at a time, and a call already waiting on its first servers takes
/// on the later chunks' destinations beside them. Then a connection limit
/// of twenty is used in full and never passed, while every message still
/// arrives.
#[test]
fn slow_destinations_are_held_at_once_by_few_workers_within_the_connection_limit() {
    for (domains, limit) in [(200, 200), (60, 20)] {
        let peer = SmtpPeer::start_with(&["--reply-delay", "0.3"]);
        let mut records = vec![format!("mx.slow IN A {}", peer.ip)];
        records.extend((0..domains).map(|n| format!("s{n} IN MX 10 mx.slow")));
        let dns = Dns::start(&records, &[]);
        let root = TestMailroot::new(&dns);
        for n in 0..domains {
            root.drop_file(
                &format!("{n:03}.eml"),
                &pickup_file(
                    "s@src.test",
                    &[&format!("r{n}@s{n}.test")],
                    &format!("Subject: {n}\r\n\r\nx\r\n"),
                ),
            );
        }
        let limit_arg = limit.to_string();
        assert_eq!(
            root.run_once(&["--workers", "2", "--max-connections", &limit_arg]),
            0
        );
        assert_eq!(peer.messages().len(), domains);
        assert_eq!(
            peer.peak_connections(),
            limit,
            "{domains} slow destinations, two workers, a limit of {limit} connections: \
             used in full, never passed"
        );
    }
}

/// Messages to three domains each, behind the slow server: the component
/// opens a session for each domain, so a message counts three connections
/// against the limit, not one.
#[test]
fn a_message_to_several_domains_counts_a_connection_for_each() {
    let peer = SmtpPeer::start_with(&["--reply-delay", "0.3"]);
    let messages = 12;
    let mut records = vec![format!("mx.slow IN A {}", peer.ip)];
    for n in 0..messages {
        records.extend(["a", "b", "c"].map(|d| format!("{d}{n} IN MX 10 mx.slow")));
    }
    let dns = Dns::start(&records, &[]);
    let root = TestMailroot::new(&dns);
    for n in 0..messages {
        root.drop_file(
            &format!("{n:03}.eml"),
            &pickup_file(
                "s@src.test",
                &[
                    &format!("r@a{n}.test"),
                    &format!("r@b{n}.test"),
                    &format!("r@c{n}.test"),
                ],
                &format!("Subject: {n}\r\n\r\nx\r\n"),
            ),
        );
    }
    assert_eq!(
        root.run_once(&["--workers", "2", "--max-connections", "9"]),
        0
    );
    // One transaction per domain.
    assert_eq!(peer.messages().len(), 3 * messages);
    assert_eq!(
        peer.peak_connections(),
        9,
        "three messages of three domains at once: the limit of 9 is used in full, never passed"
    );
}

#[test]
fn local_domains_are_written_to_drop() {
    let watcher = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[("intranet", watcher.ip)]);
    let root = TestMailroot::new(&dns);
    let config = write_config(&root, "local_domains = [\"intranet.test\"]\n");
    root.drop_file(
        "local.eml",
        &pickup_file(
            "s@src.test",
            &["alice@intranet.test", "bob@Intranet.Test"],
            "Subject: memo\r\n\r\nfor the team\r\n",
        ),
    );
    assert_eq!(root.run_once(&["--config", &config]), 0);
    assert_eq!(watcher.connections(), 0, "local mail never leaves");
    let dropped = root.files("Drop");
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert!(dropped[0].ends_with(".eml"));
    let text = std::fs::read_to_string(root.dir("Drop").join(&dropped[0])).unwrap();
    assert!(text.starts_with("x-sender: <s@src.test>\r\nx-receiver: <alice@intranet.test>\r\nx-receiver: <bob@Intranet.Test>\r\nReceived: "), "{text}");
    assert!(text.ends_with("\r\n\r\nfor the team\r\n"));
}

#[test]
fn per_domain_routes_override_mx() {
    let mx = SmtpPeer::start();
    let gateway = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[("partner", mx.ip)]);
    let root = TestMailroot::new(&dns);
    let config = write_config(
        &root,
        &format!(
            "[[route]]\ndomain = \"*.partner.test\"\nhosts = [\"{}\"]\nport = 2525\ntls = \"none\"\n",
            gateway.ip
        ),
    );
    root.drop_file(
        "routed.eml",
        &pickup_file(
            "s@src.test",
            &["a@eu.partner.test", "b@partner.test"],
            "Subject: x\r\n\r\nx\r\n",
        ),
    );
    assert_eq!(root.run_once(&["--config", &config]), 0);
    let via_route = gateway.messages();
    assert_eq!(via_route.len(), 1);
    assert_eq!(
        via_route[0].rcpt_tos,
        vec!["a@eu.partner.test"],
        "*.partner.test matches subdomains"
    );
    let via_mx = mx.messages();
    assert_eq!(via_mx.len(), 1);
    assert_eq!(
        via_mx[0].rcpt_tos,
        vec!["b@partner.test"],
        "the parent domain still goes by MX"
    );
}

#[test]
fn check_explains_a_file_without_sending_anything() {
    let peer = SmtpPeer::start();
    let dns = Dns::start(
        &[
            "d1 IN MX 20 mx2.d1".to_string(),
            "d1 IN MX 10 mx1.d1".to_string(),
            format!("mx1.d1 IN A {}", peer.ip),
            "null IN MX 0 .".to_string(),
        ],
        &[],
    );
    let root = TestMailroot::new(&dns);
    let dir = &root.root.0;
    std::fs::write(
        dir.join("good.eml"),
        pickup_file("s@src.test", &["r@d1.test"], "Subject: x\r\n\r\nx\r\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("null.eml"),
        pickup_file("s@src.test", &["r@null.test"], "Subject: x\r\n\r\nx\r\n"),
    )
    .unwrap();
    std::fs::write(dir.join("broken.eml"), b"no headers here\n").unwrap();
    let check = |file: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_mailroot-under-test"))
            .arg("check")
            .arg(dir.join(file))
            .args([
                "--dns-server",
                &dns.addr.to_string(),
                "--hostname",
                "relay.test",
            ])
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let (code, out) = check("good.eml");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("MAIL FROM:<s@src.test>") && out.contains("RCPT TO:<r@d1.test>"),
        "{out}"
    );
    assert!(
        out.contains("<r@d1.test>: MX: mx1.d1.test, mx2.d1.test (port 25, TLS opportunistic)"),
        "{out}"
    );
    let (code, out) = check("null.eml");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("fails (5.1.10)"), "{out}");
    let (code, out) = check("broken.eml");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("reject unparseable"), "{out}");
    assert_eq!(peer.connections(), 0, "check never connects");
}

#[test]
fn servers_without_8bitmime_or_smtputf8_are_never_sent_what_they_cannot_take() {
    let seven_bit = SmtpSink::start(&["-8"]);
    let no_utf8 = SmtpPeer::start_with(&["--no-smtputf8"]);
    let senders = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[
        ("seven", seven_bit.ip),
        ("ascii", no_utf8.ip),
        ("src", senders.ip),
    ]);
    let root = TestMailroot::new(&dns);
    root.drop_file(
        "eight-bit.eml",
        &pickup_file(
            "s@src.test",
            &["r@seven.test"],
            "Subject: menu\r\n\r\ncaf\u{e9} au lait\r\n",
        ),
    );
    root.drop_file(
        "utf8-header.eml",
        &pickup_file(
            "s@src.test",
            &["r@ascii.test"],
            "Subject: caf\u{e9}\r\n\r\nplain body\r\n",
        ),
    );
    root.drop_file(
        "plain.eml",
        &pickup_file(
            "s@src.test",
            &["r@seven.test"],
            "Subject: plain\r\n\r\nplain body\r\n",
        ),
    );
    assert_eq!(root.run_once(&[]), 1);

    let dumped = seven_bit.dumped();
    assert_eq!(
        dumped.len(),
        1,
        "only the 7-bit message reached the server without 8BITMIME"
    );
    assert!(dumped[0].contains("Subject: plain"));
    assert!(
        no_utf8.messages().is_empty(),
        "no UTF-8 header to a server without SMTPUTF8"
    );

    let dsns: Vec<String> = senders.messages().iter().map(|m| m.text()).collect();
    assert_eq!(dsns.len(), 2, "one DSN each");
    assert!(dsns.iter().any(|d| {
        d.contains("Final-Recipient: rfc822; r@seven.test\r\nAction: failed\r\nStatus: 5.6.3\r\n")
    }));
    assert!(dsns.iter().any(|d| {
        d.contains("Final-Recipient: rfc822; r@ascii.test\r\nAction: failed\r\nStatus: 5.6.7\r\n")
    }));
}

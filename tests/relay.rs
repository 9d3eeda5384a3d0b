//! End-to-end relaying: real DNS (NSD) and real SMTP servers (aiosmtpd) on
//! loopback addresses, `mailroot serve --once` run in-process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use mailroot_e2e::{Dns, SmtpPeer, TestMailroot, pickup_file};

fn mx(name: &str, preference: impl std::fmt::Display, host: &str) -> String {
    format!("{name} IN MX {preference} {host}")
}

fn a(name: &str, ip: impl std::fmt::Display) -> String {
    format!("{name} IN A {ip}")
}

const BODY_WITH_DOTS: &str = "Subject: dots\r\n\r\n.leading dot\r\n.\r\n..\r\nplain\r\n";

#[test]
fn two_domains_get_one_transaction_each_without_envelope_lines_or_bcc() {
    let one = SmtpPeer::start();
    let two = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[("d1", one.ip), ("d2", two.ip)]);
    let root = TestMailroot::new(&dns);
    let file = pickup_file(
        "sender@src.test",
        &["alice@d1.test", "bob@d2.test"],
        &format!(
            "From: Sender <sender@src.test>\r\nTo: alice@d1.test\r\nBcc: bob@d2.test\r\n{BODY_WITH_DOTS}"
        ),
    );
    root.drop_file("two-domains.eml", &file);

    assert_eq!(root.run_once(&[]), 0);

    let (got_one, got_two) = (one.messages(), two.messages());
    assert_eq!(got_one.len(), 1, "one transaction at mx.d1");
    assert_eq!(got_two.len(), 1, "one transaction at mx.d2");
    assert_eq!(got_one[0].mail_from, "sender@src.test");
    assert_eq!(got_two[0].mail_from, "sender@src.test");
    assert_eq!(got_one[0].rcpt_tos, vec!["alice@d1.test"]);
    assert_eq!(got_two[0].rcpt_tos, vec!["bob@d2.test"]);
    for message in [&got_one[0], &got_two[0]] {
        let text = message.text();
        let lower = text.to_ascii_lowercase();
        assert!(
            !lower.contains("x-sender") && !lower.contains("x-receiver"),
            "{text}"
        );
        assert!(!lower.contains("bcc"), "{text}");
        assert!(
            text.starts_with("Received: from pickup by relay.test (mailroot) id "),
            "{text}"
        );
        assert!(text.contains("\r\nMessage-ID: <"), "{text}");
        assert!(text.contains("\r\nDate: "), "{text}");
        // Lines starting with "." arrive exactly as written (stuffed on the wire, unstuffed by the server).
        assert!(
            text.ends_with("\r\n\r\n.leading dot\r\n.\r\n..\r\nplain\r\n"),
            "{text:?}"
        );
    }
    assert_eq!(
        got_one[0].data, got_two[0].data,
        "both domains get the same bytes"
    );
    assert!(
        root.files("Queue").is_empty()
            && root.files("Pickup").is_empty()
            && root.files("Badmail").is_empty()
    );
}

#[test]
fn headers_give_the_envelope_when_there_are_no_pickup_lines() {
    let peer = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[("d1", peer.ip)]);
    let root = TestMailroot::new(&dns);
    root.drop_file(
        "headers.eml",
        b"From: a@src.test\nTo: x@d1.test, y@d1.test\nCc: x@d1.test\nBcc: z@d1.test\nSubject: bare LF\n\nline one\nline two\n",
    );
    assert_eq!(root.run_once(&[]), 0);
    let got = peer.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "a@src.test");
    assert_eq!(got[0].rcpt_tos, vec!["x@d1.test", "y@d1.test", "z@d1.test"]);
    let text = got[0].text();
    assert!(
        !text.contains("Bcc") && !text.contains("z@d1.test"),
        "{text}"
    );
    assert!(text.contains("\r\nSubject: bare LF\r\n"), "{text:?}");
    assert!(
        text.ends_with("\r\n\r\nline one\r\nline two\r\n"),
        "bare LF becomes CRLF: {text:?}"
    );
}

#[test]
fn the_next_mx_gets_the_mail_when_the_first_refuses_or_defers() {
    // Preference 10: nothing listens (connection refused). 20: answers 451 to MAIL. 30: accepts.
    let refusing = mailroot_e2e::unique_ip();
    let busy = SmtpPeer::start_with(&["--mail-reply", "451 4.3.2 try again later"]);
    let good = SmtpPeer::start();
    let dns = Dns::start(
        &[
            mx("d1", 10, "mx1.d1"),
            mx("d1", 20, "mx2.d1"),
            mx("d1", 30, "mx3.d1"),
            a("mx1.d1", refusing),
            a("mx2.d1", busy.ip),
            a("mx3.d1", good.ip),
        ],
        &[],
    );
    let root = TestMailroot::new(&dns);
    root.drop_file(
        "fallback.eml",
        &pickup_file(
            "s@src.test",
            &["r@d1.test"],
            "Subject: fallback\r\n\r\nhello\r\n",
        ),
    );
    assert_eq!(root.run_once(&[]), 0);
    assert_eq!(busy.connections(), 1, "the 451 server was tried");
    assert!(busy.messages().is_empty());
    let got = good.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, vec!["r@d1.test"]);
}

#[test]
fn a_domain_without_mx_gets_mail_at_its_address() {
    let peer = SmtpPeer::start();
    let dns = Dns::start(&[a("aonly", peer.ip)], &[]);
    let root = TestMailroot::new(&dns);
    root.drop_file(
        "aonly.eml",
        &pickup_file(
            "s@src.test",
            &["r@aonly.test"],
            "Subject: implicit MX\r\n\r\nhi\r\n",
        ),
    );
    assert_eq!(root.run_once(&[]), 0);
    assert_eq!(peer.messages().len(), 1);
}

#[test]
fn null_mx_nxdomain_and_malformed_files_go_to_badmail_without_a_connection() {
    let watcher = SmtpPeer::start();
    // null.test has a null MX but also an A record: a relay that ignored the
    // null MX would connect to the watcher.
    let dns = Dns::start(&["null IN MX 0 .".to_string(), a("null", watcher.ip)], &[]);
    let root = TestMailroot::new(&dns);
    root.drop_file(
        "null-mx.eml",
        &pickup_file("s@src.test", &["r@null.test"], "Subject: null\r\n\r\nx\r\n"),
    );
    root.drop_file(
        "nxdomain.eml",
        &pickup_file(
            "s@src.test",
            &["r@nowhere.test"],
            "Subject: nx\r\n\r\nx\r\n",
        ),
    );
    root.drop_file("malformed.eml", b"this is not a mail message at all\n");
    root.drop_file(
        "no-recipient.eml",
        b"From: s@src.test\r\nSubject: nobody\r\n\r\nx\r\n",
    );
    root.drop_file(
        "with-nul.eml",
        b"From: s@src.test\r\nTo: r@null.test\r\n\r\nx\0y\r\n",
    );

    assert_eq!(root.run_once(&[]), 1, "not everything was delivered");
    assert_eq!(
        watcher.connections(),
        0,
        "no SMTP connection for any of them"
    );
    assert!(root.files("Queue").is_empty(), "{:?}", root.files("Queue"));
    let badmail = root.files("Badmail");
    for name in [
        "null-mx.eml",
        "nxdomain.eml",
        "malformed.eml",
        "no-recipient.eml",
        "with-nul.eml",
    ] {
        assert!(
            badmail.contains(&format!("{name}.bad")),
            "{name} in {badmail:?}"
        );
        let reason = root.reason(name);
        assert_eq!(reason["file"], name);
        assert!(
            reason["time"].as_str().unwrap().starts_with("20"),
            "{reason}"
        );
        assert!(!reason["reason"].as_str().unwrap().is_empty());
    }
    let null = root.reason("null-mx.eml");
    assert_eq!(null["code"], "delivery-failed");
    assert_eq!(null["recipients"][0]["status"], "5.1.10");
    assert!(
        null["reason"].as_str().unwrap().contains("null MX"),
        "{null}"
    );
    let nx = root.reason("nxdomain.eml");
    assert_eq!(nx["recipients"][0]["status"], "5.1.2");
    assert!(
        nx["reason"].as_str().unwrap().contains("does not exist"),
        "{nx}"
    );
    assert_eq!(root.reason("malformed.eml")["code"], "unparseable");
    assert_eq!(root.reason("no-recipient.eml")["code"], "no-recipients");
    assert!(
        root.reason("with-nul.eml")["reason"]
            .as_str()
            .unwrap()
            .contains("NUL")
    );
    // The original bytes are kept.
    let kept = std::fs::read(root.dir("Badmail").join("malformed.eml.bad")).unwrap();
    assert_eq!(kept, b"this is not a mail message at all\n");
}

#[test]
fn servfail_leaves_the_message_queued() {
    let watcher = SmtpPeer::start();
    let dns = Dns::start(&[], &["servfail.test"]);
    let root = TestMailroot::new(&dns);
    root.drop_file(
        "servfail.eml",
        &pickup_file(
            "s@src.test",
            &["r@servfail.test"],
            "Subject: later\r\n\r\nx\r\n",
        ),
    );
    assert_eq!(root.run_once(&[]), 1);
    assert!(root.files("Badmail").is_empty());
    assert_eq!(watcher.connections(), 0);
    let queued = root.queued();
    assert_eq!(queued.len(), 1);
    let recipient = &queued[0]["recipients"][0];
    assert_eq!(recipient["state"], "pending");
    assert_eq!(recipient["status"], "4.4.3");
    assert!(
        recipient["last_reply"]
            .as_str()
            .unwrap()
            .contains("SERVFAIL")
            || recipient["last_reply"]
                .as_str()
                .unwrap()
                .contains("Server Failure"),
        "{recipient}"
    );
    assert_eq!(queued[0]["attempts"], 1);
}

#[test]
fn per_recipient_replies_deliver_some_and_report_the_rest() {
    let peer = SmtpPeer::start_with(&[
        "--rcpt-reply",
        "gone@=550 5.1.1 no such user",
        "--rcpt-reply",
        "later@=451 4.2.0 mailbox busy",
    ]);
    let dns = Dns::with_exchangers(&[("d1", peer.ip)]);
    let root = TestMailroot::new(&dns);
    root.drop_file(
        "mixed.eml",
        &pickup_file(
            "s@src.test",
            &["ok@d1.test", "gone@d1.test", "later@d1.test"],
            "Subject: mixed\r\n\r\nx\r\n",
        ),
    );
    assert_eq!(root.run_once(&[]), 1);
    let got = peer.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, vec!["ok@d1.test"]);
    // The permanent failure is in Badmail with the server's reply...
    let reason = root.reason("mixed.eml");
    assert_eq!(reason["recipients"][0]["address"], "gone@d1.test");
    assert!(
        reason["recipients"][0]["reply"]
            .as_str()
            .unwrap()
            .contains("550 5.1.1 no such user"),
        "{reason}"
    );
    // ...the deferred recipient stays queued, the delivered one is never offered again.
    let queued = root.queued();
    assert_eq!(queued.len(), 1);
    let states: Vec<(String, String)> = queued[0]["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("ok@d1.test".into(), "delivered".into()),
            ("gone@d1.test".into(), "failed".into()),
            ("later@d1.test".into(), "pending".into()),
        ]
    );
}

#[test]
fn lines_over_998_characters_are_broken_before_sending() {
    let peer = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[("d1", peer.ip)]);
    let root = TestMailroot::new(&dns);
    let long = "x".repeat(3000);
    root.drop_file(
        "long.eml",
        &pickup_file(
            "s@src.test",
            &["r@d1.test"],
            &format!("Subject: long\r\n\r\n{long}\r\nend\r\n"),
        ),
    );
    assert_eq!(root.run_once(&[]), 0);
    let got = peer.messages();
    assert_eq!(got.len(), 1);
    let text = got[0].text();
    assert!(
        text.split("\r\n").all(|line| line.len() <= 998),
        "no line over 998 characters"
    );
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        body.replace("\r\n ", ""),
        format!("{long}\r\nend\r\n"),
        "broken with CRLF SP, nothing lost"
    );
}

#[test]
fn a_truncated_udp_answer_is_asked_again_over_tcp() {
    // 40 MX records do not fit a 512-byte UDP answer: NSD sets TC, and the
    // resolver must ask again over TCP to get them all.
    let mut records: Vec<String> = (0..40)
        .map(|n| {
            mx(
                "big",
                10 + n,
                &format!("a-rather-long-exchanger-name-{n:02}.big"),
            )
        })
        .collect();
    records.push(a("a-rather-long-exchanger-name-00.big", "127.0.0.1"));
    let dns = Dns::start(&records, &[]);
    let resolver = mailroot::dns::Resolver::with_server(dns.addr);
    match resolver.lookup_mx("big.test") {
        mailroot::runtime::bindings::mailroot::relay::types::MxAnswer::Records(list) => {
            assert_eq!(list.len(), 40)
        }
        other => panic!("expected 40 MX records, got {other:?}"),
    }
}

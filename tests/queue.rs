//! The durable queue end to end, with the clock driven by the test: retries
//! on the schedule, DSNs (parsed and checked field by field), the one delay
//! notice, expiry, and the null sender.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use mailroot_e2e::{
    Dns, ManualClock, Received, SmtpPeer, TestMailroot, header, mime_parts, pickup_file,
};

/// What the tests of a message's life in the queue share: d1.test goes to
/// `dest`, src.test (the senders' domain, where DSNs go) to `senders`, and
/// the relay runs on a clock the test drives.
///
/// Fields drop in order: the relay before the mailroot it works in.
struct World {
    relay: mailroot::Relay,
    clock: ManualClock,
    root: TestMailroot,
    /// Serves the two domains for as long as the test runs.
    _dns: Dns,
    senders: SmtpPeer,
    dest: SmtpPeer,
}

/// `dest` is an `smtp_peer.py` started with `dest_options`; the relay gets
/// the command-line `relay_args`.
fn start_world(dest_options: &[&str], relay_args: &[&str]) -> World {
    let dest = SmtpPeer::start_with(dest_options);
    let senders = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[("d1", dest.ip), ("src", senders.ip)]);
    let root = TestMailroot::new(&dns);
    let clock = ManualClock::now();
    let relay = root.relay(&clock, relay_args);
    World {
        dest,
        senders,
        _dns: dns,
        root,
        clock,
        relay,
    }
}

fn control(root: &TestMailroot) -> serde_json::Value {
    let queued = root.queued();
    assert_eq!(queued.len(), 1, "{queued:?}");
    queued.into_iter().next().unwrap()
}

/// The DSNs the sender's server received, as text.
fn dsns(senders: &SmtpPeer) -> Vec<String> {
    senders
        .messages()
        .iter()
        .map(|m: &Received| {
            assert_eq!(
                m.mail_from, "<>",
                "a DSN comes from the null sender (MAIL FROM:<>)"
            );
            assert_eq!(m.rcpt_tos, vec!["s@src.test"]);
            m.text()
        })
        .collect()
}

#[test]
fn a_451_at_rcpt_is_retried_on_schedule_and_then_delivered() {
    let world = start_world(&["--rcpt-fail-first", "later@=1"], &[]);
    let t0 = world.clock.get();
    world.root.drop_file(
        "retry.eml",
        &pickup_file(
            "s@src.test",
            &["ok@d1.test", "later@d1.test"],
            "Subject: retry\r\n\r\nx\r\n",
        ),
    );

    let first = world.relay.run_pass(false);
    assert_eq!(first.deferred, 1);
    let got = world.dest.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, vec!["ok@d1.test"]);
    let c = control(&world.root);
    assert_eq!(c["attempts"], 1);
    assert_eq!(
        c["next_attempt_ms"],
        t0 + 300_000,
        "postfix profile: first retry after 300 s"
    );
    assert_eq!(c["recipients"][0]["state"], "delivered");
    assert_eq!(c["recipients"][1]["state"], "pending");
    assert!(
        c["recipients"][1]["last_reply"]
            .as_str()
            .unwrap()
            .contains("451 4.2.0")
    );

    // Not due yet: nothing happens.
    world.clock.advance(Duration::from_secs(299));
    world.relay.run_pass(false);
    assert_eq!(world.dest.messages().len(), 1);

    // Due: only the deferred recipient is tried, and it is delivered.
    world.clock.advance(Duration::from_secs(1));
    let second = world.relay.run_pass(false);
    assert_eq!(second.delivered, 1);
    let got = world.dest.messages();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[1].rcpt_tos,
        vec!["later@d1.test"],
        "the delivered recipient is never sent the message again"
    );
    assert!(world.root.queued().is_empty());
    assert!(
        world.senders.messages().is_empty(),
        "no DSN for a delivered message"
    );
}

#[test]
fn one_550_and_one_250_give_one_delivery_and_one_dsn() {
    let world = start_world(&["--rcpt-reply", "gone@=550 5.1.1 no such user here"], &[]);
    world.root.drop_file(
        "mixed.eml",
        &pickup_file(
            "s@src.test",
            &["ok@d1.test", "gone@d1.test"],
            "From: Sender <s@src.test>\r\nTo: ok@d1.test, gone@d1.test\r\nSubject: quarterly figures\r\n\r\nsecret body\r\n",
        ),
    );
    world.relay.run_pass(false);

    let got = world.dest.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, vec!["ok@d1.test"]);
    let dsns = dsns(&world.senders);
    assert_eq!(dsns.len(), 1, "one DSN");
    let dsn = &dsns[0];
    let (top, _) = dsn.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        header(top, "From").unwrap(),
        "Mail Delivery System <MAILER-DAEMON@relay.test>"
    );
    assert_eq!(header(top, "To").unwrap(), "<s@src.test>");
    assert_eq!(header(top, "Auto-Submitted").unwrap(), "auto-replied");
    let content_type = header(top, "Content-Type").unwrap();
    assert!(
        content_type.starts_with("multipart/report; report-type=delivery-status;"),
        "{content_type}"
    );

    let parts = mime_parts(dsn);
    assert_eq!(parts.len(), 3, "{dsn}");
    assert!(
        header(&parts[0].headers, "Content-Type")
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(
        parts[0]
            .body
            .contains("<gone@d1.test>: RCPT TO: 550 5.1.1 no such user here"),
        "{}",
        parts[0].body
    );
    assert_eq!(
        header(&parts[1].headers, "Content-Type").unwrap(),
        "message/delivery-status"
    );
    let fields: Vec<&str> = parts[1].body.split("\r\n\r\n").collect();
    let per_message = fields[0];
    assert_eq!(
        header(per_message, "Reporting-MTA").unwrap(),
        "dns; relay.test"
    );
    assert!(
        header(per_message, "Arrival-Date")
            .unwrap()
            .ends_with("+0000")
    );
    let per_recipient = fields[1];
    assert_eq!(
        header(per_recipient, "Final-Recipient").unwrap(),
        "rfc822; gone@d1.test"
    );
    assert_eq!(header(per_recipient, "Action").unwrap(), "failed");
    assert_eq!(header(per_recipient, "Status").unwrap(), "5.1.1");
    assert_eq!(
        header(per_recipient, "Remote-MTA").unwrap(),
        "dns; mx.d1.test"
    );
    assert_eq!(
        header(per_recipient, "Diagnostic-Code").unwrap(),
        "smtp; RCPT TO: 550 5.1.1 no such user here"
    );
    assert!(
        !parts[1].body.contains("ok@d1.test"),
        "only the failed recipient is reported"
    );
    assert_eq!(
        header(&parts[2].headers, "Content-Type").unwrap(),
        "text/rfc822-headers"
    );
    assert_eq!(
        header(&parts[2].body, "Subject").unwrap(),
        "quarterly figures"
    );
    assert!(!dsn.contains("secret body"), "headers only, never the body");
    assert!(world.root.queued().is_empty());
}

#[test]
fn a_delay_notice_once_then_expiry_with_4_4_7() {
    let world = start_world(
        &["--rcpt-reply", "later@=451 4.2.0 mailbox busy"],
        &["--retry-profile", "iis"],
    );
    let t0 = world.clock.get();
    world.root.drop_file(
        "late.eml",
        &pickup_file(
            "s@src.test",
            &["later@d1.test"],
            "Subject: late\r\n\r\nx\r\n",
        ),
    );

    // Follow the schedule: each pass at the stored next-attempt time.
    let mut attempts_at = Vec::new();
    for _ in 0..40 {
        world.relay.run_pass(false);
        let queued = world.root.queued();
        let Some(c) = queued.first() else { break };
        attempts_at.push((world.clock.get() - t0) / 60_000);
        world.clock.set(c["next_attempt_ms"].as_u64().unwrap());
    }
    assert_eq!(
        &attempts_at[..5],
        &[0, 15, 45, 105, 345],
        "IIS: 15, 30, 60 minutes, then every 240"
    );
    assert!(
        world.root.queued().is_empty(),
        "the message left the queue at expiry"
    );

    let dsns = dsns(&world.senders);
    let delayed: Vec<&String> = dsns
        .iter()
        .filter(|d| d.contains("Action: delayed"))
        .collect();
    let failed: Vec<&String> = dsns
        .iter()
        .filter(|d| d.contains("Action: failed"))
        .collect();
    assert_eq!(delayed.len(), 1, "exactly one delay notice");
    assert_eq!(failed.len(), 1, "one final DSN");
    assert_eq!(dsns.len(), 2);
    let status = mime_parts(delayed[0]).remove(1).body;
    assert_eq!(header(&status, "Status").unwrap(), "4.2.0");
    assert!(header(&status, "Will-Retry-Until").is_some(), "{status}");
    let status = mime_parts(failed[0]).remove(1).body;
    assert_eq!(header(&status, "Status").unwrap(), "4.4.7");
    assert!(
        header(&status, "Diagnostic-Code")
            .unwrap()
            .contains("451 4.2.0 mailbox busy")
    );
    // The expiry came two days after arrival.
    assert_eq!((world.clock.get() - t0) / 3_600_000, 48);
}

#[test]
fn a_null_sender_failure_goes_to_badmail_without_a_dsn() {
    let world = start_world(&["--rcpt-reply", "gone@=550 5.1.1 no such user"], &[]);
    world.root.drop_file(
        "bounce.eml",
        &pickup_file(
            "<>",
            &["gone@d1.test"],
            "From: MAILER-DAEMON@src.test\r\nSubject: a bounce\r\n\r\nx\r\n",
        ),
    );
    world.relay.run_pass(false);
    assert!(world.root.queued().is_empty());
    assert_eq!(world.senders.connections(), 0, "never a DSN to <>");
    let reason = world.root.reason("bounce.eml");
    assert_eq!(reason["code"], "delivery-failed");
    assert!(
        reason["reason"].as_str().unwrap().contains("null sender"),
        "{reason}"
    );
    assert_eq!(reason["recipients"][0]["status"], "5.1.1");
}

#[test]
fn a_dsn_that_fails_goes_to_badmail() {
    // The sender's domain does not exist: the DSN itself fails, and stops there.
    let dest = SmtpPeer::start_with(&["--rcpt-reply", "gone@=550 5.1.1 no such user"]);
    let dns = Dns::with_exchangers(&[("d1", dest.ip)]);
    let root = TestMailroot::new(&dns);
    let clock = ManualClock::now();
    let relay = root.relay(&clock, &[]);
    root.drop_file(
        "orphan.eml",
        &pickup_file(
            "s@nowhere.test",
            &["gone@d1.test"],
            "Subject: orphan\r\n\r\nx\r\n",
        ),
    );
    relay.run_pass(false);
    assert!(root.queued().is_empty());
    let original = root.reason("orphan.eml");
    assert!(
        original["reason"]
            .as_str()
            .unwrap()
            .contains("a DSN was sent to <s@nowhere.test>"),
        "{original}"
    );
    let dsn = root.reason("orphan.eml.dsn");
    assert_eq!(dsn["sender"], "");
    assert_eq!(dsn["recipients"][0]["address"], "s@nowhere.test");
    assert_eq!(dsn["recipients"][0]["status"], "5.1.2");
    let kept = std::fs::read_to_string(root.dir("Badmail").join("orphan.eml.dsn.bad")).unwrap();
    assert!(kept.contains("Final-Recipient: rfc822; gone@d1.test"));
}

#[test]
fn an_oversized_message_gets_a_dsn_with_its_headers() {
    let world = start_world(&[], &["--max-message-size", "2000"]);
    let mut file = pickup_file("s@src.test", &["r@d1.test"], "Subject: attachment\r\n\r\n");
    file.extend(std::iter::repeat_n(b'A', 10_000));
    world.root.drop_file("huge.eml", &file);
    world.relay.run_pass(false);
    assert_eq!(world.dest.connections(), 0);
    assert_eq!(world.root.reason("huge.eml")["code"], "too-large");
    let dsns = dsns(&world.senders);
    assert_eq!(dsns.len(), 1);
    let parts = mime_parts(&dsns[0]);
    assert_eq!(
        header(parts[1].body.split("\r\n\r\n").nth(1).unwrap(), "Status").unwrap(),
        "5.3.4"
    );
    assert_eq!(header(&parts[2].body, "Subject").unwrap(), "attachment");
    assert!(!dsns[0].contains("AAAAAAAA"));
}

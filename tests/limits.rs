//! A hostile component (tests/hostile-guest) that loops forever or allocates
//! without bound is stopped by the CPU deadline and the memory cap; the host
//! keeps relaying the other mail, and keeps the hostile files until it gives
//! up on them, into Badmail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use mailroot_e2e::{Dns, SmtpPeer, TestMailroot, pickup_file};

const HOSTILE: &str = env!("MAILROOT_HOSTILE_COMPONENT");

#[test]
fn looping_and_allocating_components_are_stopped_and_the_host_keeps_serving() {
    let peer = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[("d1", peer.ip)]);
    let root = TestMailroot::new(&dns);
    root.drop_file(
        "loop.eml",
        &pickup_file(
            "s@src.test",
            &["r@d1.test"],
            "Subject: LOOP-FOREVER\r\n\r\nx\r\n",
        ),
    );
    root.drop_file(
        "hog.eml",
        &pickup_file(
            "s@src.test",
            &["r@d1.test"],
            "Subject: ALLOCATE-FOREVER\r\n\r\nx\r\n",
        ),
    );
    root.drop_file(
        "good.eml",
        &pickup_file(
            "s@src.test",
            &["r@d1.test"],
            "Subject: ordinary\r\n\r\nx\r\n",
        ),
    );
    let limits = [
        "--component",
        HOSTILE,
        "--cpu-limit",
        "0.5",
        "--memory-limit",
        "64",
    ];

    let started = Instant::now();
    assert_eq!(
        root.run_once(&limits),
        1,
        "the hostile files are not delivered"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the pass must end: {:?}",
        started.elapsed()
    );
    let got = peer.messages();
    assert_eq!(
        got.len(),
        1,
        "the ordinary message is relayed beside the hostile ones"
    );
    assert!(got[0].text().contains("Subject: ordinary"));
    // Kept for another try, not lost.
    let claimed: Vec<String> = root
        .files("Queue")
        .into_iter()
        .filter(|n| n.ends_with(".claimed"))
        .collect();
    assert_eq!(claimed.len(), 2, "{claimed:?}");

    // After three failures on the same file the host gives up: Badmail, with the reason.
    assert_eq!(root.run_once(&limits), 1);
    assert_eq!(root.run_once(&limits), 1);
    assert!(root.files("Queue").is_empty(), "{:?}", root.files("Queue"));
    let cpu = root.reason("loop.eml");
    assert_eq!(cpu["code"], "component-failed");
    assert!(cpu["reason"].as_str().unwrap().contains("CPU"), "{cpu}");
    let memory = root.reason("hog.eml");
    assert_eq!(memory["code"], "component-failed");
    assert!(
        memory["reason"].as_str().unwrap().contains("trapped"),
        "{memory}"
    );
}

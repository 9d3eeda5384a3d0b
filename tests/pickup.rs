//! Pickup semantics: what is claimed, what is left alone, what is created.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fs;
use std::io::Write;

use mailroot_e2e::{Dns, SmtpPeer, TestMailroot, backdate, pickup_file};

fn setup() -> (SmtpPeer, Dns) {
    let peer = SmtpPeer::start();
    let dns = Dns::with_exchangers(&[("d1", peer.ip)]);
    (peer, dns)
}

#[test]
fn serve_creates_the_four_folders() {
    let (_peer, dns) = setup();
    let root = TestMailroot::new(&dns);
    assert_eq!(root.run_once(&[]), 0, "nothing to do is success");
    for folder in ["Pickup", "Queue", "Badmail", "Drop"] {
        assert!(root.dir(folder).is_dir(), "{folder}");
    }
}

#[test]
fn files_being_written_are_left_alone() {
    let (peer, dns) = setup();
    let root = TestMailroot::new(&dns);
    fs::create_dir_all(root.dir("Pickup")).unwrap();
    let message = pickup_file("s@src.test", &["r@d1.test"], "Subject: x\r\n\r\nbody\r\n");

    // Still open for writing by its writer, although old enough.
    let open_path = root.dir("Pickup").join("open.eml");
    let mut writer = fs::File::create(&open_path).unwrap();
    writer.write_all(&message).unwrap();
    backdate(&open_path);
    // Changed within the settle time. Dated ahead, so that a slow test
    // machine cannot let the second pass by before the relay looks.
    let fresh = root.dir("Pickup").join("fresh.eml");
    fs::write(&fresh, &message).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&fresh)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(30))
        .unwrap();
    // Hidden and .tmp names, by convention still being written.
    root.drop_file(".hidden.eml", &message);
    root.drop_file("partial.tmp", &message);

    assert_eq!(root.run_once(&[]), 0);
    assert!(peer.messages().is_empty());
    assert_eq!(
        root.files("Pickup"),
        vec![".hidden.eml", "fresh.eml", "open.eml", "partial.tmp"]
    );
    assert!(root.files("Queue").is_empty());

    // Closed and settled: now it goes.
    drop(writer);
    backdate(&open_path);
    backdate(&root.dir("Pickup").join("fresh.eml"));
    assert_eq!(root.run_once(&[]), 0);
    assert_eq!(peer.messages().len(), 2);
    assert_eq!(root.files("Pickup"), vec![".hidden.eml", "partial.tmp"]);
}

#[test]
fn a_symbolic_link_in_pickup_is_not_followed() {
    let (peer, dns) = setup();
    let root = TestMailroot::new(&dns);
    let outside = root.root.0.join("outside.eml");
    fs::write(
        &outside,
        pickup_file(
            "s@src.test",
            &["r@d1.test"],
            "Subject: secret\r\n\r\nsecret\r\n",
        ),
    )
    .unwrap();
    fs::create_dir_all(root.dir("Pickup")).unwrap();
    std::os::unix::fs::symlink(&outside, root.dir("Pickup").join("link.eml")).unwrap();
    assert_eq!(root.run_once(&[]), 0);
    assert!(peer.messages().is_empty());
    assert!(outside.exists());
}

#[test]
fn an_oversized_file_goes_to_badmail_with_its_size() {
    let (peer, dns) = setup();
    let root = TestMailroot::new(&dns);
    let mut message = pickup_file("s@src.test", &["r@d1.test"], "Subject: big\r\n\r\n");
    message.extend(std::iter::repeat_n(b'x', 5000));
    root.drop_file("big.eml", &message);
    assert_eq!(root.run_once(&["--max-message-size", "4096"]), 1);
    assert_eq!(peer.connections(), 0);
    let reason = root.reason("big.eml");
    assert_eq!(reason["code"], "too-large");
    assert!(
        reason["reason"]
            .as_str()
            .unwrap()
            .contains("limit is 4096 bytes"),
        "{reason}"
    );
}

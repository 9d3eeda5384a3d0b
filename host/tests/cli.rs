//! The `mailroot` binary itself: `serve` creates the folders, runs until
//! SIGTERM and exits cleanly; bad arguments exit with status 2.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_mailroot");

#[test]
fn serve_runs_until_sigterm() {
    let root = std::env::temp_dir().join(format!("mailroot-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut child = Command::new(BINARY)
        .args(["serve", "--root"])
        .arg(&root)
        .args([
            "--dns-server",
            "127.0.0.1:9",
            "--poll-interval",
            "0.1",
            "--hostname",
            "relay.test",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !["Pickup", "Queue", "Badmail", "Drop"]
        .iter()
        .all(|f| root.join(f).is_dir())
    {
        assert!(Instant::now() < deadline, "the folders were not created");
        assert!(child.try_wait().unwrap().is_none(), "serve exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "serve keeps running");
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn bad_arguments_exit_with_status_2() {
    let output = Command::new(BINARY)
        .args(["serve", "--smtp-port", "x"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--smtp-port"));
    let help = Command::new(BINARY).arg("--help").output().unwrap();
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--root DIR"));
}

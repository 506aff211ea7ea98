//! A short scale run (the long one is `cargo xtask scale`: 100,000 connections): captured pods
//! hold their connections open at once, each reaching its pod's proxy with its own original
//! destination; a pod registered meanwhile is captured at once, and the map empties after.

use sockmesh_tests::lab::{run, testkit_bin};

#[test]
fn many_connections_held_at_once_each_get_their_own_destination() {
    let out = run(std::process::Command::new(testkit_bin().unwrap()).args([
        "scale",
        "--pods",
        "3",
        "--per-pod",
        "2000",
    ]))
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("6000 captured connections open at once"),
        "{report}"
    );
    assert!(
        report.contains("Every connection right, and the map back at its baseline: yes."),
        "{report}"
    );
}

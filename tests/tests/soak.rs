//! A short soak (the long one is `cargo xtask soak`): a captured pod under churn of every kind
//! for a few seconds; no connection or query fails, and the maps and the agent are back at
//! their baseline afterwards (the soak itself fails otherwise, naming what did not come back).

use sockmesh_tests::lab::{run, testkit_bin};

#[test]
fn a_short_soak_leaves_nothing_behind() {
    let out = run(std::process::Command::new(testkit_bin().unwrap()).args([
        "soak",
        "--secs",
        "8",
        "--min-connections",
        "1000",
    ]))
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("Back at the baseline after the churn: yes."),
        "{report}"
    );
    assert!(report.contains(", 0 failed."), "{report}");
}

//! deploy/: every kustomization renders with `kubectl kustomize`, and every resource it renders
//! passes `kubernetes-validate --strict` against the Kubernetes schemas.

use std::{path::PathBuf, process::Command};

use sockmesh_tests::lab::run;

const KUBERNETES_VERSION: &str = "1.33.0";

fn kustomizations() -> Vec<PathBuf> {
    let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut found = Vec::new();
    let mut dirs = vec![deploy];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().is_some_and(|n| n == "kustomization.yaml") {
                found.push(d.clone());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn every_kustomization_renders_and_validates() {
    let dirs = kustomizations();
    assert!(
        dirs.len() >= 2,
        "expected the base and the istio overlay, found {dirs:?}"
    );
    for dir in dirs {
        let rendered =
            run(Command::new("kubectl").arg("kustomize").arg(&dir)).unwrap_or_else(|e| {
                panic!(
                    "kubectl kustomize {}: {e:#} (cargo xtask setup installs the tools)",
                    dir.display()
                )
            });
        let yaml = String::from_utf8(rendered.stdout).unwrap();
        let documents = yaml
            .split("\n---\n")
            .filter(|d| d.contains("kind:"))
            .count();
        let file = std::env::temp_dir().join(format!(
            "smt-deploy-{}-{}.yaml",
            std::process::id(),
            dir.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&file, &yaml).unwrap();
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
            .arg(&file)
            .output();
        let _ = std::fs::remove_file(&file);
        let out = out.expect("kubernetes-validate is not installed: run `cargo xtask setup`");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{}: {report}", dir.display());
        let passed = report.matches(" passed for resource ").count();
        assert_eq!(
            passed,
            documents,
            "{}: not every resource was validated: {report}",
            dir.display()
        );
    }
}

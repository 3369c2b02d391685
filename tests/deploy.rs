//! The deployment artefacts, checked with the real tools (deploy/check.py does the work):
//! the Helm chart (helm lint/template with every values file under helm/kinlink/ci,
//! Kubernetes schemas, ports ↔ Services ↔ config agreement, the rendered config accepted by
//! this build of kinlink), the Dockerfile (hadolint), the compose file (docker-compose
//! config) and the systemd unit (systemd-analyze verify, where systemd is present).

use std::process::Command;

fn check(what: &str) {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/check.py"))
        .arg(what)
        .arg(env!("CARGO_BIN_EXE_kinlink"))
        .output()
        .expect("python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "deploy/check.py {what}:\n{text}");
    println!("{text}");
}

#[test]
fn helm_chart_lints_renders_validates_and_agrees_with_the_config() {
    check("chart");
}

#[test]
fn dockerfile_passes_hadolint() {
    check("dockerfile");
}

#[test]
fn compose_file_is_valid() {
    check("compose");
}

#[test]
fn systemd_unit_verifies() {
    check("systemd");
}

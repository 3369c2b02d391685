//! The TypeScript client (clients/js) from the tests: built once per test binary, run by
//! `node`, results read from the scripts' last `{"ok": …}` line.

use std::sync::OnceLock;

use serde_json::Value;

/// clients/js.
pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js");

/// Builds the client (`npm run build`, tsc) once for every test of this binary.
pub fn build() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let r = BUILT.get_or_init(|| {
        let out = std::process::Command::new("npm").args(["run", "--silent", "build"]).current_dir(DIR).output().map_err(|e| format!("npm: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        }
    });
    if let Err(e) = r {
        panic!("building clients/js failed (scripts/test runs `npm ci` there first): {e}");
    }
}

/// The flag `node` needs for a global WebSocket (behind a flag in Node 20, global from 22).
pub fn websocket_flag() -> Option<&'static str> {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    let major = *MAJOR.get_or_init(|| {
        let out = std::process::Command::new("node").args(["-p", "process.versions.node.split('.')[0]"]).output().expect("node runs");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("a node version")
    });
    (major < 22).then_some("--experimental-websocket")
}

/// The result line a script printed; panics with its output unless it says `ok`.
pub fn result(stdout: &str, stderr: &str) -> Value {
    let line = stdout.lines().rev().find(|l| l.starts_with("{\"ok\"")).unwrap_or_else(|| panic!("no result: {stdout}\n{stderr}"));
    let v: Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["ok"], true, "script failed: {v:#}\n{stderr}");
    v
}

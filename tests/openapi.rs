//! docs/openapi.yaml: valid OpenAPI 3.1 (openapi-spec-validator, installed by scripts/test),
//! and true of a running server: every documented operation answers with a documented
//! status, and CORS preflights are answered for configured origins only.

mod common;

use common::*;
use serde_json::Value;

fn spec() -> Value {
    spec_at(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"))
}

fn spec_at(path: &str) -> Value {
    let out = std::process::Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))", path])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn openapi_document_is_valid() {
    validate(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"));
    validate(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi-admin.yaml"));
}

const ADMIN_TOKEN: &str = "openapi-admin-token-0123456789abcdef";

/// docs/openapi-admin.yaml against the admin listener: every operation without a token, with
/// a wrong one, and with the right one answers a documented status; none is on `http.listen`.
#[tokio::test]
async fn every_documented_admin_operation_answers_as_documented() {
    let dir = temp_dir("openapi-admin");
    let server = TestServer::with(|c| {
        c.admin.listen = "127.0.0.1:0".into();
        c.admin.token = Some(kinlink::config::Secret::new(ADMIN_TOKEN));
        c.data_dir = dir.clone();
    })
    .await;
    let admin = server.admin.expect("admin listener");
    let http = reqwest::Client::new();
    let spec = spec_at(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi-admin.yaml"));
    let mut checked = 0;
    for (path, ops) in spec["paths"].as_object().unwrap() {
        let concrete = path.replace("{family}", "fam").replace("{device}", "dev");
        for (method, op) in ops.as_object().unwrap() {
            let documented: Vec<u16> = op["responses"].as_object().unwrap().keys().map(|k| k.parse().unwrap()).collect();
            let req = |base: std::net::SocketAddr, p: &str| match method.as_str() {
                "get" => http.get(format!("http://{base}{p}")),
                "post" => http.post(format!("http://{base}{p}")),
                other => panic!("{other}"),
            };
            for (r, want) in [
                (req(admin, &concrete), Some(401)),
                (req(admin, &concrete).bearer_auth("wrong-token-wrong-token-wrong-token"), Some(401)),
                (req(admin, &concrete).bearer_auth(ADMIN_TOKEN), Some(200)),
                (req(admin, &path.replace("{family}", "bad:id").replace("{device}", "dev")).bearer_auth(ADMIN_TOKEN), None),
                (req(server.http, &concrete).bearer_auth(ADMIN_TOKEN), Some(404)),
            ] {
                let status = r.send().await.unwrap().status().as_u16();
                if let Some(want) = want {
                    assert_eq!(status, want, "{method} {path}");
                }
                if want != Some(404) {
                    assert!(documented.contains(&status), "{method} {path} answered {status}, documented {documented:?}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 25, "{checked}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn validate(path: &str) {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; from openapi_spec_validator import validate; from openapi_spec_validator.readers import read_from_filename; validate(read_from_filename(sys.argv[1])[0])", path])
        .output()
        .unwrap();
    assert!(out.status.success(), "openapi-spec-validator: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let server = TestServer::with(|c| c.http.cors_origins = vec!["https://app.example.com".into()]).await;
    let base = format!("http://{}", server.http);
    let http = reqwest::Client::new();
    let spec = spec();
    let device = token("fam", "u", "phone");
    let mut checked = 0;
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let documented: Vec<u16> = op["responses"].as_object().unwrap().keys().map(|k| k.parse().unwrap()).collect();
            // /metrics is on the metrics listener here, as by default.
            let url = if path == "/metrics" { format!("http://{}{path}", server.metrics) } else { format!("{base}{path}") };
            let req = match method.as_str() {
                "get" => http.get(&url),
                "post" => http.post(&url),
                "options" => http
                    .request(reqwest::Method::OPTIONS, &url)
                    .header("Origin", "https://app.example.com")
                    .header("Access-Control-Request-Method", "GET")
                    .header("Access-Control-Request-Headers", "authorization"),
                other => panic!("{other}"),
            };
            // Once without credentials, once with a device token where one is accepted.
            let mut tries = vec![req.try_clone().unwrap()];
            if op.get("security").is_some() {
                tries.push(req.bearer_auth(&device));
            }
            for r in tries {
                let resp = r.send().await.unwrap();
                let status = resp.status().as_u16();
                assert!(documented.contains(&status), "{method} {path} answered {status}, documented {documented:?}");
                if method == "options" {
                    assert_eq!(resp.headers()["access-control-allow-origin"], "https://app.example.com", "{path}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 12, "{checked}");
    // An origin not configured gets no CORS headers; an undocumented path is 404.
    let r = http.get(format!("{base}/v1/ice-servers")).header("Origin", "https://evil.example").bearer_auth(&device).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert_eq!(http.get(format!("{base}/nope")).send().await.unwrap().status(), 404);
}

#[tokio::test]
async fn without_cors_origins_no_preflight_is_granted() {
    let server = TestServer::start().await;
    let r = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, format!("http://{}/v1/ice-servers", server.http))
        .header("Origin", "https://app.example.com")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none(), "{:?}", r.headers());
}

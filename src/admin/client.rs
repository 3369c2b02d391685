//! `kinlink admin ...`: one request to the admin API, its JSON answer printed as it came.
//! The token comes from `KINLINK_ADMIN_TOKEN` or a file, never from the command line
//! (which other users of the machine can read in the process list).

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};

/// Largest answer read (a family's devices and routes, or the deny list).
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// The HTTP status and body of `method path` on the admin API at `base` (`http://host:port`).
pub async fn request(base: &str, token: &str, method: &str, path: &str) -> Result<(u16, String), String> {
    let rest = base.strip_prefix("http://").ok_or_else(|| format!("admin URL `{base}`: only http:// (the admin API listens on loopback)"))?;
    let authority = rest.trim_end_matches('/');
    let work = async {
        let tcp = tokio::net::TcpStream::connect(authority).await.map_err(|e| format!("connect {authority}: {e} (is admin.listen set?)"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
        let conn = tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::USER_AGENT, concat!("kinlink/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES).collect().await.map_err(|e| format!("answer: {e}"))?.to_bytes();
        conn.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(30), work).await.map_err(|_| "no answer within 30 s".to_string())?
}

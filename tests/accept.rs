//! The accept loop survives running out of file descriptors (EMFILE): it logs,
//! backs off and keeps serving once descriptors are free again.
mod common;

use std::time::Duration;

use common::bin::{Serve, MEMORY_STORE};
use common::kg::{self, get};
use common::upstream::Upstream;
use tokio::net::TcpStream;

/// GET `path` on the admin listener; `None` while it cannot answer.
async fn admin_get(admin: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(admin).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    text.starts_with("HTTP/1.1 200").then_some(text)
}

#[tokio::test]
async fn accept_loop_survives_emfile() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("prlimit not found: install util-linux");
    }
    let up = Upstream::start().await;
    let kg_proc = Serve::at(up.addr).store(MEMORY_STORE).start().await;
    let pid = kg_proc.pid().to_string();
    // Leave the process very few descriptors.
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=40:40"])
        .status()
        .expect("prlimit runs");
    assert!(status.success(), "prlimit failed");

    // Far more connections than descriptors: accept() hits EMFILE.
    let mut held = Vec::new();
    for _ in 0..80 {
        if let Ok(s) = TcpStream::connect(kg_proc.public).await {
            held.push(s);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !kg_proc.output().contains("accept failed") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no accept error logged:\n{}",
            kg_proc.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Free the descriptors: keygate must serve again, without a restart.
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ok = match tokio::time::timeout(Duration::from_secs(2), async {
            let mut s = TcpStream::connect(kg_proc.public).await.ok()?;
            use tokio::io::AsyncWriteExt;
            s.write_all(&get("/after-emfile", "")).await.ok()?;
            Some(kg::read_response(&mut s).await.status)
        })
        .await
        {
            Ok(Some(status)) => status == 200,
            _ => false,
        };
        if ok {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "keygate did not recover after EMFILE:\n{}",
            kg_proc.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = admin_get(kg_proc.admin, "/metrics").await.expect("metrics");
    let errors: f64 = metrics
        .lines()
        .find(|l| l.starts_with("keygate_accept_errors_total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("keygate_accept_errors_total");
    assert!(errors >= 1.0, "accept errors counted: {errors}");
    assert!(up.seen().iter().any(|s| s.uri.path() == "/after-emfile"));
}

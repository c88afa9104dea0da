//! `/org/tokens` over raw HTTP/1.1: one request per fresh connection.
#![allow(dead_code)]

use std::net::SocketAddr;

use super::kg::{self, RawResponse, HOST};

/// The fields of a key in `GET /org/tokens`.
pub const LIST_FIELDS: [&str; 10] = [
    "id",
    "prefix",
    "name",
    "created_by",
    "created_at",
    "last_used_at",
    "expires_at",
    "role",
    "workspaces",
    "rate_limit",
];

/// The fields of a `POST /org/tokens` answer.
pub const MINT_FIELDS: [&str; 9] = [
    "id",
    "prefix",
    "name",
    "expires_at",
    "role",
    "workspaces",
    "rate_limit",
    "auth_token",
    "warning",
];

/// One HTTP/1.1 request on a fresh connection (Host acme); `body` gets a
/// Content-Length.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> RawResponse {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {HOST}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("Connection: close\r\n\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    kg::raw(addr, req.as_bytes()).await
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `GET <target>` with `Authorization: Bearer <token>`.
pub async fn get_with(addr: SocketAddr, target: &str, token: &str) -> RawResponse {
    send(
        addr,
        "GET",
        target,
        &[("Authorization", &bearer(token))],
        None,
    )
    .await
}

/// `GET /org/tokens` with a key; it must answer 200.
pub async fn list(addr: SocketAddr, token: &str) -> RawResponse {
    let r = get_with(addr, "/org/tokens", token).await;
    assert_eq!(r.status, 200, "{r:?}");
    r
}

/// `POST /org/tokens` with a key and a JSON body.
pub async fn mint(addr: SocketAddr, token: &str, body: &str) -> RawResponse {
    send(
        addr,
        "POST",
        "/org/tokens",
        &[
            ("Authorization", &bearer(token)),
            ("Content-Type", "application/json"),
        ],
        Some(body),
    )
    .await
}

/// Mint through the API; it must answer 200. Returns (id, token).
pub async fn mint_ok(addr: SocketAddr, token: &str, body: &str) -> (String, String) {
    let r = mint(addr, token, body).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    (
        v["id"].as_str().unwrap().to_string(),
        v["auth_token"].as_str().unwrap().to_string(),
    )
}

/// `DELETE /org/tokens/<id>` with a key.
pub async fn delete(addr: SocketAddr, token: &str, id: &str) -> RawResponse {
    send(
        addr,
        "DELETE",
        &format!("/org/tokens/{id}"),
        &[("Authorization", &bearer(token))],
        None,
    )
    .await
}

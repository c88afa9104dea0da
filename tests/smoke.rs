//! End-to-end smoke test: a key minted in the memory store is accepted and the
//! app sees the principal; a refused request never reaches the app.
mod common;

use common::kg::{self, get, raw};
use common::upstream::Upstream;
use keygate::auth::store::Store;

#[tokio::test]
async fn key_is_forwarded_with_principal_and_admin_prefix_is_refused() {
    let up = Upstream::start().await;
    let kg = kg::start(kg::config(up.url()), Store::memory("acme")).await;
    let minted = kg::mint_key(&kg, None).await;
    let auth = format!("Authorization: Bearer {}\r\n", minted.token);

    let r = raw(kg.public_addr, &get("/cp/admin", &auth)).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error(), "forbidden");
    assert_eq!(up.count(), 0, "a refused request reached the app");

    let r = raw(kg.public_addr, &get("/api/x?y=1", &auth)).await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = up.wait_for(1).await;
    assert_eq!(
        seen[0].headers["x-molecule-principal"],
        format!("org-key:{}", minted.id).as_str()
    );
    assert!(seen[0].headers.get("authorization").is_none());
    assert_eq!(seen[0].uri.to_string(), "/api/x?y=1");
    kg.stop().await;
}

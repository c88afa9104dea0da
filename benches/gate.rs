//! The full gate for a typical request, and each stage alone:
//! `GET /api/v1/things?x=1`, `Host: acme.moleculesai.app`,
//! `Authorization: Bearer <minted token>`.
//!
//! full = Gate::check (framing, target, host, path) + credential::parse +
//! token::check_format + token::hash (SHA-256) + a DashMap<KeyHash, u64> hit
//! (stand-in for the auth cache).
//!
//! scope/* = the §8 check (step 4½) alone, on top of the gate: an admin
//! key, an editor against three `admin_only` rules, a reader bound to two
//! workspaces on a workspace path (canonical and not). Goal: under 50 ns.
//!
//! Run: `cargo bench --bench gate -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use dashmap::DashMap;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Uri, Version};

use keygate::auth::credential::{self, Credential};
use keygate::auth::scope::Role;
use keygate::auth::token::{self, KeyHash};
use keygate::config::{AdminOnlyRule, Config, ScopesConfig};
use keygate::request::{scope, Gate};

const PREFIX: &str = "mok_";

fn typical(token: &str) -> Parts {
    Request::builder()
        .version(Version::HTTP_11)
        .method("GET")
        .uri("/api/v1/things?x=1")
        .header("host", "acme.moleculesai.app")
        .header("authorization", format!("Bearer {token}"))
        .header("user-agent", "curl/8.5.0")
        .header("accept", "*/*")
        .body(())
        .expect("valid request")
        .into_parts()
        .0
}

fn full(gate: &Gate, cache: &DashMap<KeyHash, u64>, parts: &Parts) -> Option<u64> {
    let admitted = gate.check(parts).ok()?;
    black_box(&admitted);
    let Ok(Credential::OrgKey(tok)) = credential::parse(&parts.headers, PREFIX) else {
        return None;
    };
    if !token::check_format(tok, PREFIX) {
        return None;
    }
    let h = token::hash(tok);
    cache.get(&h).map(|v| *v)
}

fn benches(c: &mut Criterion) {
    let config = Config::new("acme", Uri::from_static("http://127.0.0.1:8080"));
    let gate = Gate::new(&config);
    let t = token::mint(PREFIX);
    let parts = typical(t.expose());

    // A cache with some other keys in it, and ours.
    let cache: DashMap<KeyHash, u64> = DashMap::new();
    for i in 0..10_000u64 {
        cache.insert(token::mint(PREFIX).hash(), i);
    }
    cache.insert(t.hash(), 42);
    assert_eq!(full(&gate, &cache, &parts), Some(42));

    c.bench_function("gate/full", |b| {
        b.iter(|| full(black_box(&gate), black_box(&cache), black_box(&parts)))
    });

    let mut g = c.benchmark_group("stage");
    g.bench_function("gate_check", |b| b.iter(|| gate.check(black_box(&parts))));
    g.bench_function("credential_parse", |b| {
        b.iter(|| credential::parse(black_box(&parts.headers), PREFIX))
    });
    g.bench_function("check_format", |b| {
        b.iter(|| token::check_format(black_box(t.expose()), PREFIX))
    });
    g.bench_function("sha256", |b| b.iter(|| token::hash(black_box(t.expose()))));
    let h = t.hash();
    g.bench_function("dashmap_hit", |b| {
        b.iter(|| cache.get(black_box(&h)).map(|v| *v))
    });
    // Non-canonical path (escapes, case, repeated slashes): still no allocation.
    let mut odd = parts.clone();
    odd.uri = Uri::from_static("/API//v1/%54hings/%7Eme?x=1");
    odd.headers.insert(
        "host",
        HeaderValue::from_static("ACME.moleculesai.app.:8443"),
    );
    assert!(gate.check(&odd).is_ok());
    g.bench_function("gate_check_noncanonical", |b| {
        b.iter(|| gate.check(black_box(&odd)))
    });
    g.finish();

    // §8, step 4½: the scope check alone.
    let rules = ScopesConfig {
        workspace_prefix: "/workspaces/".into(),
        admin_only: vec![
            AdminOnlyRule {
                method: Some(Method::POST),
                prefix: "/org/import".into(),
            },
            AdminOnlyRule {
                method: None,
                prefix: "/org/billing/".into(),
            },
            AdminOnlyRule {
                method: Some(Method::DELETE),
                prefix: "/workspaces/".into(),
            },
        ],
    };
    let bound: Vec<Box<str>> = vec!["ws_1".into(), "ws_2".into()];
    let get = Method::GET;
    let check = |role, ws: &[Box<str>], path: &str| scope::check(&rules, role, ws, &get, path);
    assert!(check(Role::Editor, &[], "/api/v1/things").is_ok());
    assert!(check(Role::Reader, &bound, "/workspaces/ws_2/things").is_ok());
    assert!(check(Role::Reader, &bound, "/Workspaces/ws%5F2/things").is_ok());
    assert!(check(Role::Reader, &bound, "/workspaces/ws_3/things").is_err());
    let mut g = c.benchmark_group("scope");
    g.bench_function("admin", |b| {
        b.iter(|| check(Role::Admin, black_box(&[]), black_box("/api/v1/things")))
    });
    g.bench_function("editor_3_rules", |b| {
        b.iter(|| check(Role::Editor, black_box(&[]), black_box("/api/v1/things")))
    });
    g.bench_function("reader_bound", |b| {
        b.iter(|| {
            check(
                Role::Reader,
                black_box(&bound),
                black_box("/workspaces/ws_2/things"),
            )
        })
    });
    g.bench_function("reader_bound_noncanonical", |b| {
        b.iter(|| {
            check(
                Role::Reader,
                black_box(&bound),
                black_box("/Workspaces/ws%5F2/things"),
            )
        })
    });
    g.finish();
}

criterion_group!(gate, benches);
criterion_main!(gate);

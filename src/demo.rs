//! `keygate demo`: everything in one process — memory store, a built-in echo
//! upstream, keygate on 127.0.0.1:<port> for tenant `demo` — plus an admin and
//! a reader key, curl lines that work when pasted, and keygate's access log
//! (text) on stdout below them.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::signal::unix::SignalKind;

use crate::auth::scope::Role;
use crate::auth::store::Store;
use crate::auth::{MintRequest, OpContext};
use crate::config::{Config, LogFormat};
use crate::failure::Failure;

pub async fn run(port: u16) -> Result<(), Failure> {
    let upstream = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Failure::Operation(format!("cannot bind the demo upstream: {e}")))?;
    let upstream_addr = upstream
        .local_addr()
        .map_err(|e| Failure::Operation(e.to_string()))?;
    tokio::spawn(echo_server(upstream));

    let mut config = Config::new(
        "demo",
        format!("http://{upstream_addr}")
            .parse()
            .map_err(|_| Failure::Operation("bad upstream address".into()))?,
    );
    config.tenant.extra_hosts = vec!["localhost".into(), "127.0.0.1".into()];
    config.listen.addr = SocketAddr::from(([127, 0, 0, 1], port));
    // keygate's own events: warnings only, on stderr, so the lines below
    // stay readable. The access log (level info, on stdout, text format):
    // one line per request, so a newcomer sees what keygate decided.
    config.log.format = LogFormat::Text;
    config.log.access = true;
    config.log.level = "warn".into();
    crate::logging::init(&config.log, crate::logging::Sink::Stderr);
    config.log.level = "info".into();

    let public = TcpListener::bind(config.listen.addr).await.map_err(|e| {
        Failure::Operation(format!("cannot bind 127.0.0.1:{port}: {e} (try --port)"))
    })?;
    let admin = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Failure::Operation(format!("cannot bind the admin listener: {e}")))?;
    // Ctrl-C (and SIGTERM) stop the demo from the moment its lines are printed.
    let signal = |kind| {
        tokio::signal::unix::signal(kind)
            .map_err(|e| Failure::Operation(format!("cannot install signal handlers: {e}")))
    };
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let store = Store::memory("demo");
    let handle = crate::spawn(
        config,
        store,
        crate::Listeners {
            public,
            admin: Some(admin),
        },
    )
    .await
    .map_err(|e| Failure::Operation(e.to_string()))?;

    let ctx = OpContext {
        actor: crate::auth::Actor::cli(),
        client: Some("demo".into()),
        user_agent: Some("keygate-demo".into()),
    };
    let keys = handle.app.auth.keys();
    let mint = async |name: &str, role: Role| {
        let req = MintRequest {
            name: Some(name.into()),
            role,
            ..MintRequest::default()
        };
        keys.mint(req, &ctx)
            .await
            .map_err(|e| Failure::Operation(format!("cannot mint the {name} key: {e:?}")))
    };
    let minted = mint("demo", Role::Admin).await?;
    let reader = mint("demo-reader", Role::Reader).await?;
    let token = minted.token.expose();
    let reader_token = reader.token.expose();
    let base = format!("http://127.0.0.1:{}", handle.public_addr.port());
    let bad = crate::auth::token::mint("mok_");
    let admin = handle
        .admin_addr
        .map(|a| format!("http://{a}"))
        .unwrap_or_default();
    println!(
        "keygate demo: tenant \"demo\" on {base} -> built-in echo app on {upstream_addr}
admin (/healthz /readyz /metrics): {admin}
minted org API key {id} (prefix {prefix}); the token is shown once:

  {token}

and a reader key {reader_id} (prefix {reader_prefix}): GET, HEAD and OPTIONS only:

  {reader_token}

Try it (Ctrl-C to stop):

  # 1. a valid key: forwarded; the echo app shows X-Molecule-Principal: org-key:{id}
  curl -s {base}/api/whoami -H 'Authorization: Bearer {token}'

  # 2. a wrong key: 401 invalid or revoked org API key
  curl -si {base}/api/whoami -H 'Authorization: Bearer {bad}'

  # 3. the control-plane admin prefix: 403 forbidden for every caller
  curl -si {base}/cp/admin/tenants -H 'Authorization: Bearer {token}'

  # 4. the reader key: a GET is forwarded (X-Molecule-Key-Role: reader),
  #    a POST gets 403 forbidden: outside this key's scope
  curl -s {base}/api/whoami -H 'Authorization: Bearer {reader_token}'
  curl -si -X POST {base}/api/whoami -H 'Authorization: Bearer {reader_token}'

  # 5. list keys, then revoke the first one; re-run 1 afterwards: 401
  curl -s {base}/org/tokens -H 'Authorization: Bearer {token}'
  curl -s -X DELETE {base}/org/tokens/{id} -H 'Authorization: Bearer {token}'

keygate's access log follows, one line per request: what keygate decided
(outcome), the key's id (the app sees org-key:<id> in X-Molecule-Principal)
and the request_id that the app and the client get as X-Request-Id.
",
        id = minted.record.id,
        prefix = minted.record.prefix,
        reader_id = reader.record.id,
        reader_prefix = reader.record.prefix,
        bad = bad.expose(),
    );
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("stopping");
    handle.stop().await;
    Ok(())
}

/// The demo's app: answers every request with what it received, as JSON.
async fn echo_server(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let headers: serde_json::Map<String, serde_json::Value> = parts
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_string(),
                            serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into()),
                        )
                    })
                    .collect();
                let echo = serde_json::json!({
                    "app": "keygate demo echo",
                    "method": parts.method.as_str(),
                    "path": parts.uri.to_string(),
                    "headers": headers,
                    "body_bytes": body.len(),
                });
                let mut resp = Response::new(Full::new(Bytes::from(format!("{echo:#}\n"))));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

//! Every default value, written once (contract §2). The parser starts each
//! section from these and overwrites what the document gives; [`Config::new`],
//! the tests and the demo build from them too.
//!
//! Sections with a required key (`[upstream]` url, `[tenant]` slug,
//! `[listen.tls]` cert and key, `[session]` verify_url and cookie) have a
//! `new(required…)` constructor instead of `Default`: there is no sensible
//! default to invent for those keys.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;

use super::*;

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            addr: SocketAddr::from(([0, 0, 0, 0], 8443)),
            trusted_proxies: vec![],
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

impl TlsConfig {
    /// `[listen.tls]` with `cert` and `key`, every other key at its default.
    pub fn new(cert: PathBuf, key: PathBuf) -> Self {
        TlsConfig {
            cert,
            key,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

impl UpstreamConfig {
    /// `[upstream]` with `url`, every other key at its default.
    pub fn new(url: http::Uri) -> Self {
        UpstreamConfig {
            url,
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(60),
            read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(90),
            own_links: 1024,
            // As many as `own_links`: HTTP/2 clients (64 connections x 10
            // streams in benches/load) must not churn app connections.
            max_idle: 1024,
            authorization: None,
            ca_file: None,
        }
    }
}

impl TenantConfig {
    /// `[tenant]` with `slug`, every other key at its default.
    pub fn new(slug: impl Into<String>) -> Self {
        TenantConfig {
            slug: slug.into(),
            domain: "moleculesai.app".into(),
            extra_hosts: vec![],
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            key_prefix: "mok_".into(),
            principal_header: HeaderName::from_static("x-molecule-principal"),
            role_header: HeaderName::from_static("x-molecule-key-role"),
            workspaces_header: HeaderName::from_static("x-molecule-key-workspaces"),
            other_bearer: ForwardPolicy::Forward,
            anonymous: ForwardPolicy::Forward,
            on_store_unavailable: OutagePolicy::Reject,
            max_stale: Duration::from_secs(30),
            cache_ttl: Duration::from_secs(60),
            cache_capacity: 100_000,
            negative_ttl: Duration::from_secs(5),
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            deny_prefixes: vec!["/cp/admin".into()],
        }
    }
}

impl Default for StoreConfig {
    /// The contract's default: a Redis on the same host ([`DEFAULT_REDIS_URL`]).
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Redis(RedisTarget::Url(Secret::new(DEFAULT_REDIS_URL))),
            timeout: Duration::from_millis(250),
        }
    }
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            max_live: 100,
            rotate_grace: Duration::from_secs(24 * 3_600),
            expiry_notice: Duration::from_secs(7 * 86_400),
            expiry_header: HeaderName::from_static("x-molecule-key-expires"),
            usage_flush: Duration::from_secs(10),
            usage_retention: Duration::from_secs(30 * 86_400),
            default_rate_limit: None,
        }
    }
}

impl Default for ScopesConfig {
    fn default() -> Self {
        ScopesConfig {
            workspace_prefix: "/workspaces/".into(),
            admin_only: vec![],
        }
    }
}

impl SessionConfig {
    /// `[session]` with `verify_url` and `cookie`, every other key at its default.
    pub fn new(verify_url: http::Uri, cookie: impl Into<String>) -> Self {
        SessionConfig {
            verify_url,
            cookie: cookie.into(),
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".into(),
            access: true,
        }
    }
}

// Written out (not derived) so that every default reads in this one file.
#[allow(clippy::derivable_impls)]
impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { worker_threads: 0 }
    }
}

impl Config {
    /// Tenant `slug` in front of `upstream`, every other value at its real
    /// default, except: the memory store, and both listeners on 127.0.0.1:0.
    /// For tests, benches and the demo.
    pub fn new(slug: &str, upstream: http::Uri) -> Config {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Config {
            listen: ListenConfig {
                addr: loopback,
                ..ListenConfig::default()
            },
            admin: AdminConfig { addr: loopback },
            upstream: UpstreamConfig::new(upstream),
            tenant: TenantConfig::new(slug),
            auth: AuthConfig::default(),
            policy: PolicyConfig::default(),
            store: StoreConfig {
                backend: StoreBackend::Memory,
                ..StoreConfig::default()
            },
            keys: KeysConfig::default(),
            scopes: ScopesConfig::default(),
            session: None,
            log: LogConfig::default(),
            runtime: RuntimeConfig::default(),
            spellings: Default::default(),
        }
    }

    /// Old name of [`Config::new`], kept for branches still calling it.
    #[doc(hidden)]
    pub fn for_tests(slug: &str, upstream: http::Uri) -> Config {
        Config::new(slug, upstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_new_is_memory_store_on_loopback_port_zero() {
        let c = Config::new("acme", http::Uri::from_static("http://127.0.0.1:8080"));
        assert_eq!(c.listen.addr, "127.0.0.1:0".parse().unwrap());
        assert_eq!(c.admin.addr, "127.0.0.1:0".parse().unwrap());
        assert!(matches!(c.store.backend, StoreBackend::Memory));
        assert_eq!(c.tenant.slug, "acme");
        assert_eq!(c.upstream.url, "http://127.0.0.1:8080");
        // everything else is the section defaults
        assert_eq!(c.store.timeout, StoreConfig::default().timeout);
        assert_eq!(
            c.listen.header_timeout,
            ListenConfig::default().header_timeout
        );
    }
}

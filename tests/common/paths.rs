//! The two ways keygate reaches the app, for tests that must hold on both:
//! a client connection's own link (the default config), and the shared pool.
#![allow(dead_code)]

use keygate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The default config: a client connection's own link to the app.
    Link,
    /// Every request through the shared pool ([`pool_path`]).
    Pool,
}

/// Every request through the shared pool instead of a connection's own link.
pub fn pool_path(c: &mut Config) {
    // 0: no client connection keeps a link of its own.
    c.upstream.own_links = 0;
}

/// `c` set up for `route`.
pub fn on(route: Route, mut c: Config) -> Config {
    if route == Route::Pool {
        pool_path(&mut c);
    }
    c
}

/// One `#[tokio::test]` per upstream path for each listed `async fn
/// case(route: Route)` of the calling file: `link::<case>` and `pool::<case>`.
#[macro_export]
macro_rules! on_both_paths {
    ($($case:ident),* $(,)?) => {
        mod link {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case($crate::common::paths::Route::Link).await
                }
            )*
        }
        mod pool {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case($crate::common::paths::Route::Pool).await
                }
            )*
        }
    };
}

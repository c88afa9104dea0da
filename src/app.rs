//! App state and [`run`]: the seam shared by `keygate serve`, `keygate demo`
//! and the integration tests.

pub struct Listeners;
pub struct RunHandle;
pub async fn run() {}

//! Request quotas, as KMS has per account and operation: per principal and route, a rate of
//! requests that seal and of requests that open (`[quota]`, or the route's `quota`), with a
//! burst. Over it: 429 with `Retry-After`, counted in `envelope_proxy_access_denials_total`
//! (reason `quota`) and audited. Off by default.

use std::collections::HashMap;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota as Rate};

use crate::config::{Action, Route};
use crate::error::ProxyError;

struct RouteLimits {
    seal: Option<DefaultKeyedRateLimiter<String>>,
    open: Option<DefaultKeyedRateLimiter<String>>,
}

/// The running quotas of every route that has one.
pub struct Quotas {
    routes: HashMap<String, RouteLimits>,
    clock: DefaultClock,
}

impl Quotas {
    pub fn new(routes: &[Route]) -> Quotas {
        let limiter = |per_second: u32, burst: u32| {
            let rate = NonZeroU32::new(per_second)?;
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            Some(DefaultKeyedRateLimiter::keyed(
                Rate::per_second(rate).allow_burst(burst),
            ))
        };
        Quotas {
            routes: routes
                .iter()
                .filter(|r| !r.quota.is_off())
                .map(|r| {
                    (
                        r.name.clone(),
                        RouteLimits {
                            seal: limiter(r.quota.seal_per_second, r.quota.burst),
                            open: limiter(r.quota.open_per_second, r.quota.burst),
                        },
                    )
                })
                .collect(),
            clock: DefaultClock::default(),
        }
    }

    /// Count one request of `principal` that seals (`Action::Seal`) or opens (any other
    /// action) on `route`: `QuotaExceeded` with the seconds to wait when over its rate.
    pub fn charge(&self, route: &str, principal: &str, action: Action) -> Result<(), ProxyError> {
        let Some(limits) = self.routes.get(route) else {
            return Ok(());
        };
        let limiter = match action {
            Action::Seal => &limits.seal,
            _ => &limits.open,
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        limiter
            .check_key(&principal.to_string())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(self.clock.now());
                ProxyError::QuotaExceeded(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
            })
    }

    /// Forget principals idle long enough to be back at a full burst (bounds memory).
    pub fn shrink(&self) {
        for l in self.routes.values() {
            for lim in [&l.seal, &l.open].into_iter().flatten() {
                lim.retain_recent();
                lim.shrink_to_fit();
            }
        }
    }
}

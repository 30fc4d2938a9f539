//! Grants: runtime delegation of key use (placeholder until the grants store lands).

use crate::auth::Principal;
use crate::config::Action;
use crate::envelope::Context;
use crate::keys::KeyRef;
use std::sync::Arc;

/// The grants a proxy knows.
#[derive(Debug, Default)]
pub struct Grants {}

impl Grants {
    /// No grants at all.
    pub fn disabled() -> Grants {
        Grants {}
    }

    /// Bumped on every change, so cached decisions made before it are not reused.
    pub fn generation(&self) -> u64 {
        0
    }

    /// The id of a live grant that lets `principal` do `action` with `key` under `context`.
    pub fn find(
        &self,
        _principal: &Principal,
        _key: &KeyRef,
        _action: Action,
        _context: &Context,
        _tokens: &[&str],
    ) -> Option<Arc<str>> {
        None
    }
}

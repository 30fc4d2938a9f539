//! envelope-proxy: a reverse proxy that does transparent envelope encryption.
//!
//! ```text
//!                JSON route                          S3 route (s3s checks SigV4 first)
//! client ──► server ──► pipeline::route ──► pipeline::identity (auth: mTLS | JWT | XFCC | none;
//!                                              S3: access key) ──► require rules
//!                  ──► context (path, headers, bucket, principal)
//!                  ──► pipeline::authorize (policy: key policies + grants; quota)
//!                  ──► keys (cache → backend) ──► transform (JSON fields | S3 object stream)
//!                  ──► pipeline::upstream ──► storage
//! client ◄── transform (open | masked | withheld) ◄──┘      every request audited
//! ```
//!
//! - [`config`]: TOML → typed settings (plain data, the bottom layer), every problem reported
//!   with its place.
//! - [`auth`]: authenticators → [`auth::Principal`]; [`policy`]: key policies and grants.
//! - [`server`]: listeners (TLS via rustls), admin endpoints, graceful shutdown.
//! - [`pipeline`]: the data path, one stage per module; `pipeline::handle` reads top to bottom.
//! - [`transform`]: body transforms (JSON fields).
//! - [`keys`]: the [`keys::RootKeyProvider`] trait, the local keyring, the data-key cache.
//! - [`envelope`]: versioned on-storage formats (see `docs/FORMAT.md`).
//! - [`audit`], [`metrics`], [`error`].
#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod body;
pub mod cli;
pub mod config;
pub mod devstore;
pub mod envelope;
pub mod error;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod pki;
pub mod policy;
pub mod reencrypt;
pub mod s3;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod transform;

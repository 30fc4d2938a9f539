//! envelope-proxy: a reverse proxy that does transparent envelope encryption.
//!
//! ```text
//! client ──► server ──► pipeline::route ──► context ──► keys (cache → backend)
//!                           │                               │
//!                           ▼                               ▼
//!                    transform (seal JSON fields)  ──►  pipeline::upstream ──► storage
//!                                                           │
//! client ◄── transform (open JSON fields) ◄─────────────────┘
//! ```
//!
//! - [`config`]: TOML → typed settings, every problem reported with its place.
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
pub mod policy;
pub mod s3;
pub mod secret;
pub mod server;
pub mod transform;

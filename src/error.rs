//! Errors of the data path, grouped by whose fault they are, and the one place that maps them
//! to HTTP responses ([`ProxyError::to_response`]).
//!
//! Messages never carry plaintext, keys or request content: only names from the config (route,
//! header, capture names) and positions.

use http::{HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::keys::BackendError;
use crate::transform::strict_json::JsonError;

/// Why one stored value did not open. Never shown to the peer (it gets one opaque error);
/// logged and audited.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecryptFailure {
    #[error("the value at a configured path is not an envelope token")]
    NotAToken,
    #[error("the wrapped data key did not unwrap (tampered, foreign key, or another key context)")]
    WrappedKey,
    #[error("the message did not open (tampered, moved, or another context)")]
    Message,
    #[error("a context value for this record is missing")]
    MissingContext,
    /// Not about the value: never redacted, never reported as `decrypt_failed`; it becomes
    /// [`ProxyError::KeyBackend`].
    #[error("key backend: {0}")]
    Backend(BackendError),
}

/// Where a value that did not open sits in the response: the configured field path and, in a
/// list, the document's position (0-based, in the order the documents appear). Config names
/// and positions only, never content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValuePlace {
    pub document: Option<usize>,
    pub field: String,
}

impl std::fmt::Display for ValuePlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.document {
            Some(d) => write!(f, "document {d}, field {}", self.field),
            None => write!(f, "field {}", self.field),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    // -- the client's fault (4xx) -----------------------------------------------------------
    #[error("no route matches this path")]
    NoRoute,
    #[error("request path rejected: {0}")]
    BadPath(&'static str),
    #[error("this route encrypts JSON: the body must be application/json without content-encoding")]
    UnsupportedMediaType,
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(JsonError),
    #[error("request body is larger than the configured limit of {0} bytes")]
    BodyTooLarge(u64),
    #[error("missing {0}, needed for the encryption context")]
    MissingContext(String),
    #[error(
        "a member name differs from an encrypted field's only by case; the store would take it as that field"
    )]
    CaseVariant,
    #[error("reading the request body failed")]
    ClientBody,
    #[error(
        "a query parameter names the encrypted field {0:?}; the store would read its value in clear (allow it with the route's allow_query_params)"
    )]
    SensitiveQueryParameter(String),
    #[error("query rejected: {0}")]
    BadQuery(&'static str),
    #[error("not authenticated: {0}")]
    Unauthenticated(crate::auth::AuthError, crate::config::RouteAuth),
    /// A route requirement (`require`) does not hold: the message names the request value.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    PolicyDenied(crate::policy::Denial),
    #[error("request quota exceeded; retry after {0} s")]
    QuotaExceeded(u64),

    // -- stored data's fault ----------------------------------------------------------------
    #[error("a stored value could not be decrypted ({1})")]
    DecryptFailed(DecryptFailure, ValuePlace),

    // -- the upstream's fault (502/504) -----------------------------------------------------
    #[error("upstream unavailable")]
    UpstreamUnavailable(String),
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("upstream response could not be processed: {0}")]
    UpstreamResponse(&'static str),
    #[error(
        "the upstream answered with a body that is not JSON; this route serves JSON only (its stored values are sealed)"
    )]
    NonJsonResponse,

    // -- the key backend ---------------------------------------------------------------------
    #[error("key backend: {0}")]
    KeyBackend(BackendError),

    // -- ours --------------------------------------------------------------------------------
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<BackendError> for ProxyError {
    fn from(e: BackendError) -> Self {
        ProxyError::KeyBackend(e)
    }
}

impl ProxyError {
    /// Status, stable error code and whether a retry may help, in one ordered list.
    fn classify(&self) -> (StatusCode, &'static str, bool) {
        use ProxyError::*;
        match self {
            // Unmatched paths are refused, never forwarded in clear.
            NoRoute => (StatusCode::NOT_FOUND, "no_route", false),
            // Dot segments and encoded slashes could route differently upstream: refuse.
            BadPath(_) => (StatusCode::BAD_REQUEST, "bad_path", false),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                false,
            ),
            MalformedJson(JsonError::DuplicateKey { .. }) => {
                (StatusCode::BAD_REQUEST, "duplicate_key", false)
            }
            MalformedJson(JsonError::TooDeep(_)) => (StatusCode::BAD_REQUEST, "too_deep", false),
            MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json", false),
            BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", false),
            MissingContext(_) => (StatusCode::BAD_REQUEST, "missing_context", false),
            // A store that ignores case would store it as the encrypted field, in clear.
            CaseVariant => (StatusCode::BAD_REQUEST, "case_variant_field", false),
            ClientBody => (StatusCode::BAD_REQUEST, "bad_body", false),
            // A store filtering by it (or binding it) would read an encrypted field's value
            // in clear, and its access log would keep it.
            SensitiveQueryParameter(_) => {
                (StatusCode::BAD_REQUEST, "sensitive_query_parameter", false)
            }
            BadQuery(_) => (StatusCode::BAD_REQUEST, "bad_query", false),
            // The authenticator could not check (JWKS unreachable): not the client's fault.
            Unauthenticated(crate::auth::AuthError::Unavailable(_), _) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "authentication_unavailable",
                true,
            ),
            Unauthenticated(..) => (StatusCode::UNAUTHORIZED, "unauthenticated", false),
            Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", false),
            PolicyDenied(_) => (StatusCode::FORBIDDEN, "access_denied", false),
            QuotaExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", true),
            // What storage returned does not decrypt: the proxy cannot serve it.
            DecryptFailed(..) => (StatusCode::BAD_GATEWAY, "decrypt_failed", false),
            UpstreamUnavailable(_) => (StatusCode::BAD_GATEWAY, "upstream_unavailable", true),
            UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", true),
            UpstreamResponse(_) => (StatusCode::BAD_GATEWAY, "bad_upstream_response", false),
            // Sealed values would reach the client as data (JSONP, text): refuse.
            NonJsonResponse => (StatusCode::BAD_GATEWAY, "non_json_response", false),
            // Only a wrapped key its backend refused as invalid blames the stored data.
            KeyBackend(BackendError::InvalidCiphertext) => {
                (StatusCode::BAD_GATEWAY, "decrypt_failed", false)
            }
            // Outage, throttling, expired or unrecognized credentials: retry later (the
            // credential chain refreshes); the data is fine.
            KeyBackend(BackendError::Credentials(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "key_backend_credentials",
                true,
            ),
            KeyBackend(BackendError::Unavailable(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "key_backend_unavailable",
                true,
            ),
            // The proxy may not use the key, or the key is off: an operator must act.
            KeyBackend(BackendError::AccessDenied(_)) => {
                (StatusCode::FORBIDDEN, "key_access_denied", false)
            }
            KeyBackend(BackendError::KeyDisabled(_)) => {
                (StatusCode::FORBIDDEN, "key_disabled", false)
            }
            // As KMS's KMSInvalidStateException: the key exists but its state allows no use.
            KeyBackend(BackendError::KeyState { state, .. }) => (
                StatusCode::CONFLICT,
                match *state {
                    "pending_deletion" => "key_pending_deletion",
                    "pending_import" => "key_pending_import",
                    "destroyed" => "key_destroyed",
                    "pending_shred" => "key_record_pending_shred",
                    _ => "key_state",
                },
                false,
            ),
            // A v2 token's record is not in the vault: storage is incomplete (a restore
            // without the vault, a record not replicated yet, a shredded key context).
            KeyBackend(BackendError::RecordMissing(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "key_record_missing", false)
            }
            KeyBackend(BackendError::RecordInvalid(_)) => {
                (StatusCode::BAD_GATEWAY, "key_record_invalid", false)
            }
            KeyBackend(BackendError::KeyNotFound(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "key_not_found", false)
            }
            KeyBackend(BackendError::Refused(_) | BackendError::UnknownBackend(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "key_unusable", false)
            }
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", false),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.classify().0
    }

    pub fn code(&self) -> &'static str {
        self.classify().1
    }

    /// What the peer is told. Decryption and internal details stay in the logs.
    fn public_message(&self) -> String {
        match self {
            // Which document and field, so a client can find the record in a list.
            ProxyError::DecryptFailed(_, place) => {
                format!("a stored value could not be decrypted for this request ({place})")
            }
            ProxyError::KeyBackend(BackendError::InvalidCiphertext) => {
                "a stored value could not be decrypted for this request".into()
            }
            ProxyError::Internal(_) => "internal error".into(),
            ProxyError::KeyBackend(e) if e.retryable() => {
                "the key backend is unavailable; retry later".into()
            }
            ProxyError::KeyBackend(BackendError::KeyDisabled(_)) => {
                "the root key is disabled".into()
            }
            ProxyError::KeyBackend(BackendError::KeyState { state, detail, .. })
                if *state == "pending_shred" =>
            {
                format!("a data-key record is pending shred: {detail}")
            }
            ProxyError::KeyBackend(BackendError::KeyState { state, detail, .. }) => {
                format!("the root key is {}: {detail}", state.replace('_', " "))
            }
            ProxyError::KeyBackend(BackendError::AccessDenied(_)) => {
                "the proxy is not allowed to use the root key".into()
            }
            ProxyError::KeyBackend(BackendError::RecordMissing(_)) => {
                "the data-key record of a stored value is not in the key vault".into()
            }
            ProxyError::KeyBackend(BackendError::RecordInvalid(_)) => {
                "the data-key record of a stored value is invalid".into()
            }
            ProxyError::KeyBackend(_) => "the configured root key cannot be used".into(),
            ProxyError::UpstreamUnavailable(_) => "upstream unavailable".into(),
            // Why a credential was refused stays in the audit log.
            ProxyError::Unauthenticated(crate::auth::AuthError::Missing(what), _) => {
                format!("authentication required: no {what} presented")
            }
            ProxyError::Unauthenticated(crate::auth::AuthError::Invalid(_), _) => {
                "the credentials presented were refused".into()
            }
            ProxyError::Unauthenticated(crate::auth::AuthError::Unavailable(_), _) => {
                "credentials cannot be verified now; retry later".into()
            }
            other => other.to_string(),
        }
    }

    /// The JSON error response: `{"error": {"code": "...", "message": "..."}}`.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let (status, code, retryable) = self.classify();
        let body =
            serde_json::json!({ "error": { "code": code, "message": self.public_message() } });
        let mut resp = crate::body::json_response(status, &body);
        let h = resp.headers_mut();
        if retryable && status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if let ProxyError::QuotaExceeded(secs) = self {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(*secs));
        }
        if let ProxyError::Unauthenticated(e, method) = self
            && let Some(c) = crate::auth::Authenticators::challenge(*method, e)
            && let Ok(v) = HeaderValue::from_str(&c)
        {
            h.insert(http::header::WWW_AUTHENTICATE, v);
        }
        resp
    }
}

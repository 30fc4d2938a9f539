//! `auth = "jwt"`: `Authorization: Bearer <JWT>` signed with RS256, ES256 or EdDSA by a key of
//! the configured JWKS (a file, or an https URL).
//!
//! What is checked: the token is at most [`MAX_TOKEN_BYTES`]; its `alg` is one of
//! `algorithms` (so never `none` or `HS*`: a public key is not an HMAC secret); the key is
//! found by `kid` (or, without one, among the keys of that algorithm) and its `kty`/`crv` (and
//! `alg`, `use` when the JWK has them) fit the token's `alg`; the signature; `iss`; `aud` (a
//! string or an array holding ours); `exp` (required), `nbf` (when present), both with
//! `leeway`. Keys a token carries itself (`jwk`, `jku` headers) are never used.
//!
//! Crate choice: `jsonwebtoken` parses the token, checks `crit`, the claims and their types.
//! Since 10.0 it leaves signatures to a `CryptoProvider`; it ships aws-lc-rs (a second C
//! crypto library to build) and RustCrypto (`rsa`, `p256`, `ed25519-dalek`: a second crypto
//! stack, with `rsa` under an open timing advisory) providers. The last release on `ring`
//! (9.3) has an open advisory (GHSA-h395-gr6q-cpjc: a mistyped `nbf` skips the check), fixed
//! in 10.3. So we use 12.x without either provider and install [`RING_PROVIDER`], which
//! verifies RS256 (≥ 2048-bit keys), ES256 and EdDSA with `ring`, already our TLS and
//! envelope crypto. It only verifies: signing is refused.
//!
//! JWKS from a URL: fetched at first use with a client trusting the webpki roots plus
//! `jwks_ca_file`, kept, and fetched again after `refresh`; a token naming an unknown `kid`
//! triggers one extra fetch at most every [`UNKNOWN_KID_REFETCH`] (keys rotate; garbage
//! `kid`s must not make us hammer the issuer). A failed refresh keeps the keys we have; with
//! none yet, requests get [`AuthError::Unavailable`] (503). A JWKS file is read at start (an
//! error then stops the start) and again when it changes (a bad new file keeps the old keys).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::{AuthError, Principal};
use crate::config::RouteAuth;
use crate::config::auth::{JwksSource, JwtAlgorithm, JwtSettings};

/// Longest bearer token accepted, before any parsing (real tokens are 1–4 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest JWKS document read (file or URL).
pub const MAX_JWKS_BYTES: usize = 1 << 20;
/// At most one JWKS fetch for unknown `kid`s in this time.
pub const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(10);
/// Time allowed for one JWKS fetch (connect, TLS, body).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a JWKS file is looked at for changes (on use).
const FILE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Most keys tried for a token without `kid`.
const MAX_KEYS_WITHOUT_KID: usize = 8;

pub use provider::RING_PROVIDER;

/// A ring-backed `jsonwebtoken` crypto provider: verification of RS256, ES256, EdDSA only.
mod provider {
    use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
    use jsonwebtoken::errors::{ErrorKind, Result};
    use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
    use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
    use ring::signature::{
        ECDSA_P256_SHA256_FIXED, ED25519, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents,
        UnparsedPublicKey,
    };

    struct RingVerifier {
        alg: Algorithm,
        key: DecodingKey,
    }

    impl signature::Verifier<Vec<u8>> for RingVerifier {
        /// `msg` and `sig` are attacker-controlled; ring rejects, never panics.
        fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> std::result::Result<(), signature::Error> {
            let ok = match (self.alg, self.key.kind()) {
                (Algorithm::RS256, DecodingKeyKind::RsaModulusExponent { n, e }) => {
                    RsaPublicKeyComponents { n, e }
                        .verify(&RSA_PKCS1_2048_8192_SHA256, msg, sig)
                        .is_ok()
                }
                (Algorithm::ES256, DecodingKeyKind::SecretOrDer(point)) => {
                    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                        .verify(msg, sig)
                        .is_ok()
                }
                (Algorithm::EdDSA, DecodingKeyKind::SecretOrDer(x)) => {
                    UnparsedPublicKey::new(&ED25519, x).verify(msg, sig).is_ok()
                }
                _ => false,
            };
            if ok {
                Ok(())
            } else {
                Err(signature::Error::new())
            }
        }
    }

    impl JwtVerifier for RingVerifier {
        fn algorithm(&self) -> Algorithm {
            self.alg
        }
    }

    fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
        let family = match alg {
            Algorithm::RS256 => AlgorithmFamily::Rsa,
            Algorithm::ES256 => AlgorithmFamily::Ec,
            Algorithm::EdDSA => AlgorithmFamily::Ed,
            _ => return Err(ErrorKind::InvalidAlgorithm.into()),
        };
        if key.family() != family {
            return Err(ErrorKind::InvalidAlgorithm.into());
        }
        Ok(Box::new(RingVerifier {
            alg: *alg,
            key: key.clone(),
        }))
    }

    fn signer(_: &Algorithm, _: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
        Err(ErrorKind::Signing("envelope-proxy only verifies tokens".into()).into())
    }

    fn unsupported<T>() -> Result<T> {
        Err(ErrorKind::UnsupportedAlgorithm.into())
    }

    fn digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>> {
        let alg = match hash {
            ThumbprintHash::SHA256 => &ring::digest::SHA256,
            ThumbprintHash::SHA384 => &ring::digest::SHA384,
            ThumbprintHash::SHA512 => &ring::digest::SHA512,
            _ => return unsupported(),
        };
        Ok(ring::digest::digest(alg, data).as_ref().to_vec())
    }

    /// Installed as the process default by [`super::JwtAuthenticator::new`].
    pub static RING_PROVIDER: CryptoProvider = CryptoProvider {
        signer_factory: signer,
        verifier_factory: verifier,
        key_utils: KeyUtils {
            rsa_pub_components_from_private_key: |_| unsupported(),
            rsa_pub_components_from_public_key: |_| unsupported(),
            ec_pub_components_from_private_key: |_, _| unsupported(),
            ed_pub_components_from_private_key: |_: &[u8], _: &EllipticCurve| unsupported(),
            compute_digest: digest,
        },
    };
}

fn install_provider() -> Result<(), String> {
    match RING_PROVIDER.install_default() {
        Ok(()) => Ok(()),
        Err(p) if std::ptr::eq(p, &RING_PROVIDER) => Ok(()),
        Err(_) => Err("another jsonwebtoken crypto provider is installed in this process".into()),
    }
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::Rs256 => Algorithm::RS256,
        JwtAlgorithm::Es256 => Algorithm::ES256,
        JwtAlgorithm::EdDsa => Algorithm::EdDSA,
    }
}

/// One usable verification key.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The usable keys of a JWKS (others are skipped: encryption keys, other algorithms).
struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Parse a JWKS document; keys we cannot or may not use are skipped. A document without
    /// one usable key is an error (it is more likely wrong than meant).
    fn parse(doc: &[u8], allowed: &[Algorithm]) -> Result<KeySet, String> {
        let doc: Value =
            serde_json::from_slice(doc).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let Some(items) = doc.get("keys").and_then(Value::as_array) else {
            return Err("JWKS has no \"keys\" array".into());
        };
        let mut keys = Vec::new();
        for item in items {
            let jwk: Jwk = match serde_json::from_value(item.clone()) {
                Ok(j) => j,
                Err(e) => {
                    tracing::debug!(error = %e, "JWKS: skipping a key we cannot read");
                    continue;
                }
            };
            match usable(&jwk, allowed) {
                Ok(k) => keys.push(k),
                Err(why) => tracing::debug!(kid = ?jwk.common.key_id, why, "JWKS: skipping a key"),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "JWKS has no usable key ({} listed; usable: RSA ≥ 2048 bits, EC P-256, OKP Ed25519 \
                 signing keys for the configured algorithms)",
                items.len()
            ));
        }
        Ok(KeySet { keys })
    }

    /// The key for a token's `kid` and `alg`, or every key of that algorithm without `kid`.
    fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Result<Vec<&Key>, Lookup> {
        match kid {
            Some(kid) => {
                let named: Vec<&Key> = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .collect();
                if named.is_empty() {
                    return Err(Lookup::UnknownKid);
                }
                let fit: Vec<&Key> = named.into_iter().filter(|k| k.alg == alg).collect();
                if fit.is_empty() {
                    return Err(Lookup::WrongType);
                }
                Ok(fit)
            }
            None => {
                let fit: Vec<&Key> = self
                    .keys
                    .iter()
                    .filter(|k| k.alg == alg)
                    .take(MAX_KEYS_WITHOUT_KID)
                    .collect();
                if fit.is_empty() {
                    return Err(Lookup::WrongType);
                }
                Ok(fit)
            }
        }
    }

    fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

enum Lookup {
    UnknownKid,
    WrongType,
}

/// The algorithm a JWK serves, if it is a signing key we can use for one of `allowed`.
fn usable(jwk: &Jwk, allowed: &[Algorithm]) -> Result<Key, &'static str> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return Err("not a signing key (use)");
    }
    let (alg, key) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => (
            Algorithm::RS256,
            DecodingKey::from_rsa_components(&p.n, &p.e).map_err(|_| "bad RSA components")?,
        ),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => (
            Algorithm::ES256,
            DecodingKey::from_ec_components(&p.x, &p.y).map_err(|_| "bad EC components")?,
        ),
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => (
            Algorithm::EdDSA,
            DecodingKey::from_ed_components(&p.x).map_err(|_| "bad OKP components")?,
        ),
        _ => return Err("unsupported key type or curve"),
    };
    let stated = jwk.common.key_algorithm.map(|a| match a {
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
        _ => None,
    });
    if let Some(s) = stated
        && s != Some(alg)
    {
        return Err("its alg is not one we verify with this key type");
    }
    if !allowed.contains(&alg) {
        return Err("algorithm not configured");
    }
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}

/// `auth = "jwt"`.
pub struct JwtAuthenticator {
    settings: JwtSettings,
    algorithms: Vec<Algorithm>,
    validations: HashMap<Algorithm, Validation>,
    keys: Source,
}

enum Source {
    File(FileKeys),
    Url(Box<UrlKeys>),
}

impl JwtAuthenticator {
    /// Read a JWKS file (an error if it does not load) or prepare the URL client (an error if
    /// the CA file does not load; the URL is fetched at first use).
    pub async fn new(settings: &JwtSettings) -> Result<JwtAuthenticator, String> {
        install_provider()?;
        let algorithms: Vec<Algorithm> =
            settings.algorithms.iter().map(|a| algorithm(*a)).collect();
        if algorithms.is_empty() {
            return Err("auth.jwt.algorithms: list at least one".into());
        }
        let validations = algorithms
            .iter()
            .map(|&alg| {
                // One algorithm per validation: jsonwebtoken wants them of one family.
                let mut v = Validation::new(alg);
                v.leeway = settings.leeway.as_secs();
                v.validate_exp = true;
                v.validate_nbf = true;
                v.validate_aud = true;
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                v.set_issuer(&[&settings.issuer]);
                v.set_audience(&[&settings.audience]);
                (alg, v)
            })
            .collect();
        let keys = match &settings.jwks {
            JwksSource::File(path) => Source::File(
                FileKeys::load(path, &algorithms)
                    .map_err(|e| format!("auth.jwt.jwks_file: {e}"))?,
            ),
            JwksSource::Url {
                url,
                ca_file,
                refresh,
            } => Source::Url(Box::new(
                UrlKeys::new(url, ca_file.as_deref(), *refresh)
                    .map_err(|e| format!("auth.jwt.jwks_url: {e}"))?,
            )),
        };
        Ok(JwtAuthenticator {
            settings: settings.clone(),
            algorithms,
            validations,
            keys,
        })
    }

    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let token = bearer(headers)?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("unreadable token header: {}", reason(&e))))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Invalid(format!(
                "token algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header.kid.as_deref();
        let set = match &self.keys {
            Source::File(f) => f.keys(&self.algorithms),
            Source::Url(u) => u.keys(kid).await?,
        };
        let candidates = set.candidates(kid, header.alg).map_err(|e| match e {
            Lookup::UnknownKid => AuthError::Invalid("token names an unknown key id".into()),
            Lookup::WrongType => AuthError::Invalid(format!(
                "no {:?} key for this token in the JWKS",
                header.alg
            )),
        })?;
        let validation = self
            .validations
            .get(&header.alg)
            .ok_or_else(|| AuthError::Invalid("token algorithm is not accepted".into()))?;
        let mut last = None;
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(
                token, &key.key, validation,
            ) {
                Ok(data) => return self.principal(data.claims),
                Err(e) => {
                    let signature = matches!(e.kind(), ErrorKind::InvalidSignature);
                    last = Some(e);
                    // Another key (same algorithm, no kid) may fit; a claim failure is final.
                    if !signature {
                        break;
                    }
                }
            }
        }
        Err(AuthError::Invalid(match last {
            Some(e) => reason(&e),
            None => "no key to verify with".into(),
        }))
    }

    fn principal(&self, claims: serde_json::Map<String, Value>) -> Result<Principal, AuthError> {
        let name = match claims.get(&self.settings.identity_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(AuthError::Invalid(format!(
                    "token has no {:?} claim naming the caller (a non-empty string)",
                    self.settings.identity_claim
                )));
            }
        };
        let mut scalars = BTreeMap::new();
        for (k, v) in &claims {
            let v = match v {
                Value::String(s) => s.clone(),
                // As written in the token (serde_json keeps the text of numbers here).
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => continue,
            };
            scalars.insert(k.clone(), v);
        }
        let mut p = Principal::new(name, RouteAuth::Jwt);
        for (attr, claim) in &self.settings.attributes {
            if let Some(v) = scalars.get(claim) {
                p.attributes.insert(attr.clone(), v.clone());
            }
        }
        p.claims = scalars;
        Ok(p)
    }
}

/// The token of `Authorization: Bearer <token>` (RFC 6750 §2.1; the scheme is
/// case-insensitive). Several `Authorization` headers are refused.
fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AuthError::Missing("bearer token"));
    };
    if values.next().is_some() {
        return Err(AuthError::Invalid("several Authorization headers".into()));
    }
    let bytes = value.as_bytes();
    if bytes.len() < 7 || !bytes[..7].eq_ignore_ascii_case(b"bearer ") {
        return Err(AuthError::Missing("bearer token"));
    }
    let token = &bytes[7..];
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Invalid(format!(
            "token longer than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    let token = std::str::from_utf8(token)
        .ok()
        .map(|t| t.trim_matches(' '))
        .filter(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.=".contains(&b))
        })
        .ok_or_else(|| AuthError::Invalid("the bearer token is not a JWT".into()))?;
    Ok(token)
}

/// Why jsonwebtoken refused: for the audit log, without token contents.
fn reason(e: &jsonwebtoken::errors::Error) -> String {
    match e.kind() {
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::ExpiredSignature => "token expired".into(),
        ErrorKind::ImmatureSignature => "token not yet valid (nbf)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("token has no {c:?} claim"),
        ErrorKind::InvalidClaimFormat(c) => format!("claim {c:?} has the wrong type"),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "algorithm not accepted for this key".into()
        }
        ErrorKind::UnsupportedAlgorithm => "unsupported algorithm".into(),
        ErrorKind::InvalidToken => "not a JWT".into(),
        ErrorKind::Base64(_) => "bad base64url".into(),
        ErrorKind::Json(_) => "bad JSON".into(),
        ErrorKind::Utf8(_) => "not UTF-8".into(),
        _ => "token refused".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// A JWKS file.

#[derive(Clone, PartialEq, Eq)]
struct Stamp(Option<(SystemTime, u64)>);

fn stamp(path: &Path) -> Stamp {
    Stamp(
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())),
    )
}

struct FileKeys {
    path: PathBuf,
    state: Mutex<FileState>,
}

struct FileState {
    set: Arc<KeySet>,
    stamp: Stamp,
    /// The stamp of a version that did not load (reported once).
    failed: Option<Stamp>,
    checked: Instant,
}

fn read_jwks(path: &Path, allowed: &[Algorithm]) -> Result<KeySet, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_JWKS_BYTES as u64 {
        return Err(format!(
            "{}: larger than {MAX_JWKS_BYTES} bytes",
            path.display()
        ));
    }
    let doc = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    KeySet::parse(&doc, allowed).map_err(|e| format!("{}: {e}", path.display()))
}

impl FileKeys {
    fn load(path: &Path, allowed: &[Algorithm]) -> Result<FileKeys, String> {
        let stamp = stamp(path);
        let set = read_jwks(path, allowed)?;
        Ok(FileKeys {
            path: path.to_path_buf(),
            state: Mutex::new(FileState {
                set: Arc::new(set),
                stamp,
                failed: None,
                checked: Instant::now(),
            }),
        })
    }

    /// The keys, read again first if the file changed (looked at once a second at most).
    fn keys(&self, allowed: &[Algorithm]) -> Arc<KeySet> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.checked.elapsed() >= FILE_CHECK_EVERY {
            st.checked = Instant::now();
            let now = stamp(&self.path);
            if now != st.stamp && st.failed.as_ref() != Some(&now) {
                match read_jwks(&self.path, allowed) {
                    Ok(set) => {
                        tracing::info!(path = %self.path.display(), keys = set.keys.len(), "JWKS file reloaded");
                        st.set = Arc::new(set);
                        st.stamp = now;
                        st.failed = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "JWKS file changed but does not load; keeping the previous keys");
                        st.failed = Some(now);
                    }
                }
            }
        }
        st.set.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// A JWKS URL.

struct UrlKeys {
    url: http::Uri,
    refresh: Duration,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    state: RwLock<UrlState>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct UrlState {
    set: Option<Arc<KeySet>>,
    /// When `set` was fetched.
    fetched: Option<Instant>,
    /// The last fetch attempt, successful or not (failed refreshes are retried after a pause).
    attempted: Option<Instant>,
    /// The last fetch made for an unknown `kid`.
    forced: Option<Instant>,
}

impl UrlKeys {
    fn new(url: &str, ca_file: Option<&Path>, refresh: Duration) -> Result<UrlKeys, String> {
        let url: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
        if url.scheme_str() != Some("https") {
            return Err("only https:// URLs (keys fetched in clear could be replaced)".into());
        }
        let tls = crate::pki::client_config(ca_file)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(https);
        Ok(UrlKeys {
            url,
            refresh,
            client,
            state: RwLock::new(UrlState::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let req = http::Request::get(self.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let work = async {
            let resp = self.client.request(req).await.map_err(|e| {
                use std::error::Error;
                match e.source() {
                    Some(s) => format!("{e}: {s}"),
                    None => e.to_string(),
                }
            })?;
            if resp.status() != http::StatusCode::OK {
                return Err(format!("answered {}", resp.status()));
            }
            let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the body: {e}"))?
                .to_bytes();
            Ok(body)
        };
        let body = tokio::time::timeout(FETCH_TIMEOUT, work)
            .await
            .map_err(|_| format!("no answer in {} s", FETCH_TIMEOUT.as_secs()))??;
        // The algorithms are checked per token; keep every signing key we can use.
        KeySet::parse(
            &body,
            &[Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
        )
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, UrlState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fetch (one at a time) unless someone else fetched since `seen`; record the outcome.
    async fn refetch(&self, seen: Option<Instant>, forced: bool) -> Result<(), String> {
        let _one = self.fetching.lock().await;
        if self.state().fetched != seen {
            return Ok(()); // another request fetched while we waited
        }
        {
            let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
            st.attempted = Some(Instant::now());
            if forced {
                st.forced = Some(Instant::now());
            }
        }
        let result = self.fetch().await;
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(set) => {
                tracing::debug!(url = %self.url, keys = set.keys.len(), "JWKS fetched");
                st.set = Some(Arc::new(set));
                st.fetched = Some(Instant::now());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn keys(&self, kid: Option<&str>) -> Result<Arc<KeySet>, AuthError> {
        let (set, fetched, attempted, forced) = {
            let st = self.state();
            (st.set.clone(), st.fetched, st.attempted, st.forced)
        };
        let Some(mut set) = set else {
            // Nothing yet: every request waits for the one fetch.
            if let Err(e) = self.refetch(fetched, false).await {
                tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed");
                return Err(AuthError::Unavailable("the JWKS cannot be fetched".into()));
            }
            return self
                .state()
                .set
                .clone()
                .ok_or_else(|| AuthError::Unavailable("the JWKS cannot be fetched".into()));
        };
        let stale = fetched.is_none_or(|f| f.elapsed() >= self.refresh);
        let pause = self.refresh.min(UNKNOWN_KID_REFETCH);
        let unknown = kid.is_some_and(|k| !set.has_kid(k));
        let may_force = forced.is_none_or(|f| f.elapsed() >= UNKNOWN_KID_REFETCH);
        let retry_ok = attempted.is_none_or(|a| a.elapsed() >= pause);
        if (unknown && may_force) || (stale && retry_ok) {
            if let Err(e) = self.refetch(fetched, unknown && may_force).await {
                tracing::warn!(url = %self.url, error = %e, "JWKS refresh failed; using the keys fetched before");
            }
            if let Some(s) = self.state().set.clone() {
                set = s;
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_forms() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert_eq!(
            bearer(&HeaderMap::new()),
            Err(AuthError::Missing("bearer token"))
        );
        assert_eq!(
            bearer(&h("Basic dXNlcjpwdw==")),
            Err(AuthError::Missing("bearer token"))
        );
        assert_eq!(bearer(&h("Bearer a.b.c")), Ok("a.b.c"));
        assert_eq!(bearer(&h("bearer a.b.c")), Ok("a.b.c"));
        assert!(matches!(bearer(&h("Bearer ")), Err(AuthError::Invalid(_))));
        assert!(matches!(
            bearer(&h("Bearer a b")),
            Err(AuthError::Invalid(_))
        ));
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert!(matches!(bearer(&h(&long)), Err(AuthError::Invalid(m)) if m.contains("longer")));
        let mut two = h("Bearer a.b.c");
        two.append(http::header::AUTHORIZATION, "Bearer d.e.f".parse().unwrap());
        assert!(matches!(bearer(&two), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn jwks_key_selection() {
        let all = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];
        // A P-256 point (the generator) and an Ed25519 key: only the shapes matter here.
        let x = "axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY";
        let y = "T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU";
        let doc = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "ec"},
            {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "ec-enc", "use": "enc"},
            {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "ec-rs", "alg": "RS256"},
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "ed"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "XYZ", "kid": "odd"},
            "not even an object"
        ]});
        let set = KeySet::parse(doc.to_string().as_bytes(), &all).unwrap();
        let kids: Vec<_> = set.keys.iter().map(|k| k.kid.as_deref().unwrap()).collect();
        assert_eq!(kids, vec!["ec", "ed"]);
        assert!(set.candidates(Some("ec"), Algorithm::ES256).is_ok());
        assert!(matches!(
            set.candidates(Some("ec"), Algorithm::EdDSA),
            Err(Lookup::WrongType)
        ));
        assert!(matches!(
            set.candidates(Some("hmac"), Algorithm::ES256),
            Err(Lookup::UnknownKid)
        ));
        assert_eq!(
            set.candidates(None, Algorithm::EdDSA).map(|c| c.len()).ok(),
            Some(1)
        );
        assert!(matches!(
            set.candidates(None, Algorithm::RS256),
            Err(Lookup::WrongType)
        ));
        // Only algorithms configured.
        let set = KeySet::parse(doc.to_string().as_bytes(), &[Algorithm::EdDSA]).unwrap();
        assert_eq!(set.keys.len(), 1);
        // Nothing usable, or not a JWKS: errors.
        assert!(KeySet::parse(br#"{"keys": []}"#, &all).is_err());
        assert!(KeySet::parse(br#"{"keys": [{"kty":"oct","k":"c2VjcmV0"}]}"#, &all).is_err());
        assert!(KeySet::parse(br#"[]"#, &all).is_err());
        assert!(KeySet::parse(b"\xff", &all).is_err());
    }

    #[test]
    fn provider_refuses_to_sign_and_foreign_algorithms() {
        install_provider().unwrap();
        let key = jsonwebtoken::EncodingKey::from_secret(b"k").unwrap();
        assert!(jsonwebtoken::crypto::sign(b"m", &key, Algorithm::HS256).is_err());
        let hmac = DecodingKey::from_secret(b"secret").unwrap();
        assert!((RING_PROVIDER.verifier_factory)(&Algorithm::HS256, &hmac).is_err());
        assert!((RING_PROVIDER.verifier_factory)(&Algorithm::RS256, &hmac).is_err());
        assert!((RING_PROVIDER.verifier_factory)(&Algorithm::PS256, &hmac).is_err());
    }
}

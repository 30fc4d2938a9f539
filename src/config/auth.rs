//! Who may call and who may use which key: authenticators (`[auth.*]`), route authentication
//! (`auth`, `require`), key policies (`[[key_policy]]`), grants (`[grants]`), request quotas
//! (`[quota]`) and masking (`[masking]`, route `mask`). Plain data: the running parts live in
//! `crate::auth` (authenticators), `crate::policy` (decisions, grants) and `crate::pipeline`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::KeyRef;
use super::template::{Source, Template};
use super::{SecretSource, section};

// ---------------------------------------------------------------------------------------------
// File types.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAuth {
    jwt: Option<FileJwt>,
    mtls: Option<FileMtls>,
    trusted_header: Option<FileTrustedHeader>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJwt {
    jwks_file: Option<PathBuf>,
    jwks_url: Option<String>,
    /// Extra CA certificates (PEM) trusted for `jwks_url`, beside the webpki roots.
    jwks_ca_file: Option<PathBuf>,
    jwks_refresh_secs: Option<u64>,
    issuer: String,
    audience: String,
    identity_claim: Option<String>,
    leeway_secs: Option<u64>,
    algorithms: Option<Vec<String>>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMtls {
    /// "uri-san" (default: the first URI SAN, a SPIFFE id) or "subject-cn".
    identity: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTrustedHeader {
    header: Option<String>,
    trusted_peers: Vec<String>,
    identity: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeyPolicy {
    key: String,
    #[serde(default)]
    statement: Vec<FileStatement>,
    /// The statements in a file of their own (`[[statement]]` tables), e.g. one file per key
    /// owned by its team; relative to the working directory.
    file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePolicyFile {
    #[serde(default)]
    statement: Vec<FileStatement>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStatement {
    sid: Option<String>,
    effect: String,
    principals: Vec<String>,
    actions: Vec<String>,
    #[serde(default)]
    conditions: BTreeMap<String, FileCondition>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileCondition {
    Equals(String),
    Op(FileConditionOp),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConditionOp {
    equals: Option<String>,
    like: Option<String>,
    present: Option<bool>,
    any_of: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGrants {
    path: Option<PathBuf>,
    token_key_file: Option<PathBuf>,
    token_lifetime_secs: Option<u64>,
    reload_secs: Option<u64>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct FileQuota {
    seal_per_second: Option<u32>,
    open_per_second: Option<u32>,
    burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMasking {
    hash_key_file: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Resolved types.

/// The authenticators a route may name with `auth = "..."`.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    pub jwt: Option<JwtSettings>,
    pub mtls: Option<MtlsSettings>,
    pub trusted_header: Option<TrustedHeaderSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url {
        url: String,
        ca_file: Option<PathBuf>,
        refresh: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    Rs256,
    Es256,
    EdDsa,
}

#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub jwks: JwksSource,
    pub issuer: String,
    pub audience: String,
    /// The claim naming the principal (default `sub`).
    pub identity_claim: String,
    /// Clock skew allowed on `exp` / `nbf` (default 60 s, at most 300 s).
    pub leeway: Duration,
    pub algorithms: Vec<JwtAlgorithm>,
    /// Principal attributes from claims: attribute name → claim name.
    pub attributes: BTreeMap<String, String>,
}

/// Where a certificate-based authenticator takes the principal's name from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertIdentity {
    /// The first URI SAN (SPIFFE ids, as meshes issue).
    UriSan,
    /// The subject's common name.
    SubjectCn,
}

/// A certificate field an attribute is read from: `subject.CN`, `subject.O`, `subject.OU`,
/// `subject.C`, `subject.L`, `subject.ST`, `san.uri`, `san.dns`, `san.email`, `spiffe.trust_domain`,
/// `spiffe.path`. Checked by `crate::auth::cert`.
pub type CertField = String;

#[derive(Debug, Clone)]
pub struct MtlsSettings {
    pub identity: CertIdentity,
    pub attributes: BTreeMap<String, CertField>,
}

#[derive(Debug, Clone)]
pub struct TrustedHeaderSettings {
    pub header: http::HeaderName,
    /// Peers whose header is believed: addresses or CIDR blocks (`10.0.0.0/8`).
    pub trusted_peers: Vec<(IpAddr, u8)>,
    pub identity: CertIdentity,
    pub attributes: BTreeMap<String, CertField>,
}

/// How a route's clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteAuth {
    /// Nobody is authenticated: the principal is `anonymous`. Only when a route (or the
    /// listener) says so.
    None,
    Mtls,
    Jwt,
    TrustedHeader,
    /// S3 routes: the client's SigV4 access key (`[[route.s3.client]]`).
    SigV4,
}

impl RouteAuth {
    pub fn name(self) -> &'static str {
        match self {
            RouteAuth::None => "none",
            RouteAuth::Mtls => "mtls",
            RouteAuth::Jwt => "jwt",
            RouteAuth::TrustedHeader => "trusted-header",
            RouteAuth::SigV4 => "sigv4",
        }
    }

    pub(super) fn parse(s: &str) -> Option<RouteAuth> {
        Some(match s {
            "none" => RouteAuth::None,
            "mtls" => RouteAuth::Mtls,
            "jwt" => RouteAuth::Jwt,
            "trusted-header" => RouteAuth::TrustedHeader,
            "sigv4" => RouteAuth::SigV4,
            _ => return None,
        })
    }
}

/// `require = { "path.tenant" = "{claim.tenant}" }`: the request value must equal the
/// rendered template (403 otherwise).
#[derive(Debug, Clone)]
pub struct Requirement {
    pub subject: Source,
    pub equals: Template,
}

/// What a key policy statement or grant permits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Encrypt: generate or use a data key under the root key.
    Seal,
    /// Decrypt to plaintext.
    Open,
    /// Decrypt to masked values only (route `mask` rules).
    OpenMasked,
    /// Decrypt and seal again under another key (`reencrypt`).
    Reencrypt,
    Describe,
    List,
    Create,
    Rotate,
    Enable,
    Disable,
    ScheduleDeletion,
    CancelDeletion,
    CreateGrant,
    ListGrants,
    RevokeGrant,
}

impl Action {
    pub const ALL: [Action; 15] = [
        Action::Seal,
        Action::Open,
        Action::OpenMasked,
        Action::Reencrypt,
        Action::Describe,
        Action::List,
        Action::Create,
        Action::Rotate,
        Action::Enable,
        Action::Disable,
        Action::ScheduleDeletion,
        Action::CancelDeletion,
        Action::CreateGrant,
        Action::ListGrants,
        Action::RevokeGrant,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Seal => "seal",
            Action::Open => "open",
            Action::OpenMasked => "open-masked",
            Action::Reencrypt => "reencrypt",
            Action::Describe => "describe",
            Action::List => "list",
            Action::Create => "create",
            Action::Rotate => "rotate",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::ScheduleDeletion => "schedule-deletion",
            Action::CancelDeletion => "cancel-deletion",
            Action::CreateGrant => "create-grant",
            Action::ListGrants => "list-grants",
            Action::RevokeGrant => "revoke-grant",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == s)
    }

    /// Actions a grant may delegate (data-key use only, as KMS grant operations).
    pub fn grantable(self) -> bool {
        matches!(
            self,
            Action::Seal | Action::Open | Action::OpenMasked | Action::Reencrypt | Action::Describe
        )
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

/// What a condition looks at: an encryption-context value or a fact about the principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Context(String),
    Principal(String),
    Claim(String),
    Identity,
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Context(n) => write!(f, "context.{n}"),
            Subject::Principal(n) => write!(f, "principal.{n}"),
            Subject::Claim(n) => write!(f, "claim.{n}"),
            Subject::Identity => write!(f, "identity"),
        }
    }
}

#[derive(Debug, Clone)]
pub enum ConditionOp {
    /// Equal to the rendered template (principal sources only: `{claim.X}`, `{principal.X}`,
    /// `{identity}`); a template whose source is missing never matches.
    Equals(Template),
    /// A glob (`*` any run, `?` one character) matched against the value.
    Like(String),
    Present(bool),
    AnyOf(Vec<Template>),
}

#[derive(Debug, Clone)]
pub struct Condition {
    pub subject: Subject,
    pub op: ConditionOp,
}

#[derive(Debug, Clone)]
pub struct Statement {
    /// The statement's id, named in audit lines (default `statement[N]`).
    pub sid: String,
    pub effect: Effect,
    /// Principal names or globs (`*`, `spiffe://acme/ns/billing/*`).
    pub principals: Vec<String>,
    pub actions: Vec<Action>,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone)]
pub struct KeyPolicy {
    pub key: KeyRef,
    pub statements: Vec<Statement>,
}

#[derive(Debug, Clone)]
pub struct GrantSettings {
    /// The grants file (default: `grants.json` beside the keyring file); replicas share it.
    pub path: Option<PathBuf>,
    /// The secret grant tokens are authenticated with (default: derived from the keyring's
    /// master key, which every replica sharing the keyring has).
    pub token_key: Option<SecretSource>,
    /// How long a grant token is accepted (default 300 s, at most 3600 s).
    pub token_lifetime: Duration,
    /// How often the grants file is read again for other replicas' changes (default 2 s).
    pub reload: Duration,
}

impl Default for GrantSettings {
    fn default() -> Self {
        GrantSettings {
            path: None,
            token_key: None,
            token_lifetime: Duration::from_secs(300),
            reload: Duration::from_secs(2),
        }
    }
}

/// Request quotas per principal (0 = unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub seal_per_second: u32,
    pub open_per_second: u32,
    /// Requests allowed at once above the rate (default: one second's worth).
    pub burst: u32,
}

impl Quota {
    pub fn is_off(&self) -> bool {
        self.seal_per_second == 0 && self.open_per_second == 0
    }
}

#[derive(Debug, Clone, Default)]
pub struct MaskingSettings {
    /// The key of `hash` masks (a keyed hash, stable across records, for joins).
    pub hash_key: Option<SecretSource>,
}

/// How one field is shown to a principal that may only `open-masked`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mask {
    /// `***-**-6789`: every character but the last four replaced by `*`, separators kept.
    Last4,
    /// `J***`: the first character, then `*`s.
    First1,
    /// A fixed string.
    Fixed(String),
    /// A keyed hash (hex, HMAC-SHA-256 under `[masking] hash_key_file`), equal for equal values.
    Hash,
    /// `null` (the default for fields without a rule).
    Null,
}

// ---------------------------------------------------------------------------------------------
// Resolution.

/// Everything of this module the file's top level holds.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub auth: AuthSettings,
    pub key_policies: Vec<KeyPolicy>,
    pub grants: GrantSettings,
    pub quota: Quota,
    pub masking: MaskingSettings,
}

pub(super) fn resolve_access(
    table: &toml::Table,
    backends: &[&str],
    errors: &mut Vec<String>,
) -> Access {
    let auth: FileAuth = section(table, "auth", errors, false).unwrap_or_default();
    let grants: Option<FileGrants> = section(table, "grants", errors, false);
    let quota: Option<FileQuota> = section(table, "quota", errors, false);
    let masking: Option<FileMasking> = section(table, "masking", errors, false);
    let mut key_policies = Vec::new();
    match table.get("key_policy") {
        None => {}
        Some(toml::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let place = format!("key_policy[{i}]");
                match item.clone().try_into::<FileKeyPolicy>() {
                    Ok(p) => {
                        if let Some(p) = resolve_policy(&place, p, backends, errors) {
                            key_policies.push(p);
                        }
                    }
                    Err(e) => errors.push(format!("{place}: {}", e.message())),
                }
            }
        }
        Some(_) => errors.push("key_policy: use [[key_policy]] (an array of tables)".into()),
    }
    for (i, a) in key_policies.iter().enumerate() {
        if key_policies[..i].iter().any(|b| b.key == a.key) {
            errors.push(format!(
                "key_policy[{i}]: key {} already has a policy; put every statement in one",
                a.key
            ));
        }
    }
    Access {
        auth: AuthSettings {
            jwt: auth.jwt.and_then(|j| resolve_jwt(j, errors)),
            mtls: auth.mtls.map(|m| MtlsSettings {
                identity: cert_identity("auth.mtls.identity", m.identity.as_deref(), errors),
                attributes: cert_fields("auth.mtls.attributes", m.attributes, errors),
            }),
            trusted_header: auth
                .trusted_header
                .and_then(|t| resolve_trusted_header(t, errors)),
        },
        key_policies,
        grants: grants
            .map(|g| resolve_grants(g, errors))
            .unwrap_or_default(),
        quota: quota
            .map(|q| resolve_quota("quota", q, errors))
            .unwrap_or_default(),
        masking: MaskingSettings {
            hash_key: masking
                .and_then(|m| m.hash_key_file)
                .map(SecretSource::File),
        },
    }
}

fn resolve_jwt(j: FileJwt, errors: &mut Vec<String>) -> Option<JwtSettings> {
    let refresh = Duration::from_secs(j.jwks_refresh_secs.unwrap_or(300).clamp(10, 86_400));
    let jwks = match (j.jwks_file, j.jwks_url) {
        (Some(f), None) => {
            if j.jwks_ca_file.is_some() {
                errors.push("auth.jwt.jwks_ca_file: only with jwks_url".into());
            }
            JwksSource::File(f)
        }
        (None, Some(url)) => {
            let ok = url
                .parse::<http::Uri>()
                .is_ok_and(|u| u.scheme_str() == Some("https") && u.host().is_some());
            if !ok {
                errors.push(format!(
                    "auth.jwt.jwks_url: {url:?} must be an https:// URL (keys fetched in clear could be replaced)"
                ));
                return None;
            }
            JwksSource::Url {
                url,
                ca_file: j.jwks_ca_file,
                refresh,
            }
        }
        _ => {
            errors.push("auth.jwt: set exactly one of jwks_file, jwks_url".into());
            return None;
        }
    };
    if j.issuer.is_empty() || j.audience.is_empty() {
        errors.push("auth.jwt: issuer and audience must not be empty".into());
    }
    let leeway = j.leeway_secs.unwrap_or(60);
    if leeway > 300 {
        errors.push("auth.jwt.leeway_secs: at most 300".into());
    }
    let mut algorithms = Vec::new();
    for a in j
        .algorithms
        .unwrap_or_else(|| vec!["RS256".into(), "ES256".into(), "EdDSA".into()])
    {
        match a.as_str() {
            "RS256" => algorithms.push(JwtAlgorithm::Rs256),
            "ES256" => algorithms.push(JwtAlgorithm::Es256),
            "EdDSA" => algorithms.push(JwtAlgorithm::EdDsa),
            other => errors.push(format!(
                "auth.jwt.algorithms: {other:?} is not one of \"RS256\", \"ES256\", \"EdDSA\""
            )),
        }
    }
    if algorithms.is_empty() {
        errors.push("auth.jwt.algorithms: list at least one".into());
    }
    for (attr, claim) in &j.attributes {
        if attr.is_empty() || claim.is_empty() {
            errors.push("auth.jwt.attributes: names must not be empty".into());
        }
    }
    Some(JwtSettings {
        jwks,
        issuer: j.issuer,
        audience: j.audience,
        identity_claim: j.identity_claim.unwrap_or_else(|| "sub".into()),
        leeway: Duration::from_secs(leeway.min(300)),
        algorithms,
        attributes: j.attributes,
    })
}

fn cert_identity(place: &str, s: Option<&str>, errors: &mut Vec<String>) -> CertIdentity {
    match s {
        None | Some("uri-san") => CertIdentity::UriSan,
        Some("subject-cn") => CertIdentity::SubjectCn,
        Some(other) => {
            errors.push(format!(
                "{place}: {other:?} is not one of \"uri-san\", \"subject-cn\""
            ));
            CertIdentity::UriSan
        }
    }
}

pub const CERT_FIELDS: [&str; 11] = [
    "subject.CN",
    "subject.O",
    "subject.OU",
    "subject.C",
    "subject.L",
    "subject.ST",
    "san.uri",
    "san.dns",
    "san.email",
    "spiffe.trust_domain",
    "spiffe.path",
];

fn cert_fields(
    place: &str,
    attrs: BTreeMap<String, String>,
    errors: &mut Vec<String>,
) -> BTreeMap<String, CertField> {
    for (name, field) in &attrs {
        if !CERT_FIELDS.contains(&field.as_str()) {
            errors.push(format!(
                "{place}.{name}: {field:?} is not one of {}",
                CERT_FIELDS.join(", ")
            ));
        }
    }
    attrs
}

fn resolve_trusted_header(
    t: FileTrustedHeader,
    errors: &mut Vec<String>,
) -> Option<TrustedHeaderSettings> {
    let header = t
        .header
        .unwrap_or_else(|| "x-forwarded-client-cert".into())
        .to_ascii_lowercase();
    let Ok(header) = http::HeaderName::from_bytes(header.as_bytes()) else {
        errors.push(format!(
            "auth.trusted_header.header: {header:?} is not a header name"
        ));
        return None;
    };
    if t.trusted_peers.is_empty() {
        errors.push(
            "auth.trusted_header.trusted_peers: list the proxies (addresses or CIDR blocks) whose header is believed".into(),
        );
    }
    let mut peers = Vec::new();
    for (i, p) in t.trusted_peers.iter().enumerate() {
        match parse_cidr(p) {
            Some(c) => peers.push(c),
            None => errors.push(format!(
                "auth.trusted_header.trusted_peers[{i}]: {p:?} is not an address or CIDR block"
            )),
        }
    }
    Some(TrustedHeaderSettings {
        header,
        trusted_peers: peers,
        identity: cert_identity(
            "auth.trusted_header.identity",
            t.identity.as_deref(),
            errors,
        ),
        attributes: cert_fields("auth.trusted_header.attributes", t.attributes, errors),
    })
}

/// `10.0.0.0/8`, `::1`, `192.168.1.7` (a single address is a /32 or /128).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, Some(len.parse::<u8>().ok()?)),
        None => (s.parse::<IpAddr>().ok()?, None),
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    (len <= max).then_some((ip, len))
}

/// Whether `addr` is inside the block.
pub fn cidr_contains((net, len): (IpAddr, u8), addr: IpAddr) -> bool {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    };
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn resolve_policy(
    place: &str,
    mut p: FileKeyPolicy,
    backends: &[&str],
    errors: &mut Vec<String>,
) -> Option<KeyPolicy> {
    if let Some(file) = &p.file {
        if !p.statement.is_empty() {
            errors.push(format!(
                "{place}: statements go in the file or here, not both"
            ));
            return None;
        }
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{place}.file: {}: {e}", file.display()));
                return None;
            }
        };
        match toml::from_str::<FilePolicyFile>(&text) {
            Ok(f) => p.statement = f.statement,
            Err(e) => {
                errors.push(format!("{place}.file: {}: {}", file.display(), e.message()));
                return None;
            }
        }
    }
    let key = match KeyRef::parse(&p.key) {
        Some(k)
            if k.backend == KeyRef::DEFAULT_BACKEND || backends.contains(&k.backend.as_str()) =>
        {
            k
        }
        Some(k) => {
            errors.push(format!("{place}.key: unknown backend {:?}", k.backend));
            return None;
        }
        None => {
            errors.push(format!(
                "{place}.key: {:?} is not a key reference like \"name\" or \"backend:key\"",
                p.key
            ));
            return None;
        }
    };
    if p.statement.is_empty() {
        errors.push(format!(
            "{place}: a policy without statements denies everything; add [[key_policy.statement]]"
        ));
    }
    let mut statements = Vec::new();
    for (i, s) in p.statement.into_iter().enumerate() {
        let at = format!("{place}.statement[{i}]");
        let effect = match s.effect.as_str() {
            "allow" => Effect::Allow,
            "deny" => Effect::Deny,
            other => {
                errors.push(format!(
                    "{at}.effect: {other:?} is not \"allow\" or \"deny\""
                ));
                continue;
            }
        };
        if s.principals.is_empty() || s.principals.iter().any(|p| p.is_empty()) {
            errors.push(format!(
                "{at}.principals: list names or patterns (\"*\" for anyone)"
            ));
        }
        let mut actions = Vec::new();
        for a in &s.actions {
            if a == "*" {
                actions.extend(Action::ALL);
                continue;
            }
            match Action::parse(a) {
                Some(a) => actions.push(a),
                None => errors.push(format!(
                    "{at}.actions: {a:?} is not one of \"*\", {}",
                    Action::ALL.map(|a| format!("{:?}", a.name())).join(", ")
                )),
            }
        }
        if s.actions.is_empty() {
            errors.push(format!("{at}.actions: list at least one"));
        }
        actions.sort();
        actions.dedup();
        let mut conditions = Vec::new();
        for (name, c) in s.conditions {
            let cplace = format!("{at}.conditions.{name:?}");
            let Some(subject) = parse_subject(&name) else {
                errors.push(format!(
                    "{cplace}: conditions look at context.NAME, principal.NAME, claim.NAME or identity"
                ));
                continue;
            };
            let op = match c {
                FileCondition::Equals(t) => {
                    principal_template(&cplace, &t, errors).map(ConditionOp::Equals)
                }
                FileCondition::Op(op) => match (op.equals, op.like, op.present, op.any_of) {
                    (Some(t), None, None, None) => {
                        principal_template(&cplace, &t, errors).map(ConditionOp::Equals)
                    }
                    (None, Some(g), None, None) => Some(ConditionOp::Like(g)),
                    (None, None, Some(p), None) => Some(ConditionOp::Present(p)),
                    (None, None, None, Some(list)) => {
                        let ts: Vec<_> = list
                            .iter()
                            .filter_map(|t| principal_template(&cplace, t, errors))
                            .collect();
                        (ts.len() == list.len()).then_some(ConditionOp::AnyOf(ts))
                    }
                    _ => {
                        errors.push(format!(
                            "{cplace}: set exactly one of equals, like, present, any_of"
                        ));
                        None
                    }
                },
            };
            if let Some(op) = op {
                conditions.push(Condition { subject, op });
            }
        }
        statements.push(Statement {
            sid: s.sid.unwrap_or_else(|| format!("statement[{i}]")),
            effect,
            principals: s.principals,
            actions,
            conditions,
        });
    }
    Some(KeyPolicy { key, statements })
}

fn parse_subject(s: &str) -> Option<Subject> {
    if s == "identity" {
        return Some(Subject::Identity);
    }
    let (kind, name) = s.split_once('.')?;
    if name.is_empty() {
        return None;
    }
    Some(match kind {
        "context" => Subject::Context(name.to_string()),
        "principal" => Subject::Principal(name.to_string()),
        "claim" => Subject::Claim(name.to_string()),
        _ => return None,
    })
}

/// A template on the principal only (policies are judged apart from any one request).
fn principal_template(place: &str, s: &str, errors: &mut Vec<String>) -> Option<Template> {
    let t = Template::parse(s)
        .map_err(|e| errors.push(format!("{place}: {e}")))
        .ok()?;
    for src in t.sources() {
        if !src.is_principal() {
            errors.push(format!(
                "{place}: {src} is a request value; conditions compare with {{identity}}, {{claim.NAME}} or {{principal.NAME}}"
            ));
            return None;
        }
    }
    Some(t)
}

fn resolve_grants(g: FileGrants, errors: &mut Vec<String>) -> GrantSettings {
    let d = GrantSettings::default();
    let lifetime = g.token_lifetime_secs.unwrap_or(300);
    if lifetime == 0 || lifetime > 3600 {
        errors.push("grants.token_lifetime_secs: between 1 and 3600".into());
    }
    GrantSettings {
        path: g.path,
        token_key: g.token_key_file.map(SecretSource::File),
        token_lifetime: Duration::from_secs(lifetime.clamp(1, 3600)),
        reload: g
            .reload_secs
            .map(|s| Duration::from_secs(s.clamp(1, 3600)))
            .unwrap_or(d.reload),
    }
}

pub(super) fn resolve_quota(place: &str, q: FileQuota, errors: &mut Vec<String>) -> Quota {
    if q.burst == Some(0) {
        errors.push(format!("{place}.burst: must be greater than 0"));
    }
    let seal = q.seal_per_second.unwrap_or(0);
    let open = q.open_per_second.unwrap_or(0);
    Quota {
        seal_per_second: seal,
        open_per_second: open,
        burst: q.burst.unwrap_or(0),
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum FileMask {
    Named(String),
    Fixed { fixed: String },
}

pub(super) fn parse_mask(place: &str, m: FileMask, errors: &mut Vec<String>) -> Option<Mask> {
    match m {
        FileMask::Fixed { fixed } => Some(Mask::Fixed(fixed)),
        FileMask::Named(n) => match n.as_str() {
            "last4" => Some(Mask::Last4),
            "first1" => Some(Mask::First1),
            "hash" => Some(Mask::Hash),
            "null" => Some(Mask::Null),
            other => {
                errors.push(format!(
                    "{place}: {other:?} is not one of \"last4\", \"first1\", \"hash\", \"null\", {{ fixed = \"...\" }}"
                ));
                None
            }
        },
    }
}

pub(super) fn parse_requirements(
    place: &str,
    require: BTreeMap<String, String>,
    errors: &mut Vec<String>,
) -> Vec<Requirement> {
    let mut out = Vec::new();
    for (subject, value) in require {
        let at = format!("{place}.require.{subject:?}");
        let subject = match Template::parse(&format!("{{{subject}}}")) {
            Ok(t) => match t.sources().collect::<Vec<_>>().as_slice() {
                [s] if !s.is_principal() => (*s).clone(),
                _ => {
                    errors.push(format!(
                        "{at}: the left side names one request value (path.NAME, header.NAME, s3.bucket)"
                    ));
                    continue;
                }
            },
            Err(e) => {
                errors.push(format!("{at}: {e}"));
                continue;
            }
        };
        if let Some(equals) = principal_template(&at, &value, errors) {
            out.push(Requirement { subject, equals });
        }
    }
    out
}

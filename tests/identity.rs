//! Client identities against real peers: JWTs signed here with ring (RSA from a committed test
//! key, P-256 and Ed25519 generated) verified against a JWKS file and an https JWKS endpoint
//! this test serves (hyper + tokio-rustls, rcgen CA); client certificates in real TLS
//! handshakes with the proxy's listener; certificate reload.
//!
//! The authenticators are driven directly (`Authenticators::build` + `authenticate`), apart
//! from the request pipeline that calls them.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::JsonServer;
use envelope_proxy::auth::{AuthError, Authenticators, Peer, Principal};
use envelope_proxy::config::RouteAuth;
use envelope_proxy::config::auth::{
    AuthSettings, CertIdentity, JwksSource, JwtAlgorithm, JwtSettings, MtlsSettings,
};
use http::HeaderMap;
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ISS: &str = "https://issuer.test";
const AUD: &str = "envelope-proxy";

// ---------------------------------------------------------------------------------------------
// Signing keys and tokens.

use common::jwt::{TestKey, b64, jwks, now};

/// Good claims, with `extra` merged over them (`null` removes one).
fn claims(extra: Value) -> Value {
    let mut c = json!({"iss": ISS, "aud": AUD, "sub": "alice", "exp": now() + 300,
                       "iat": now(), "tenant": "acme"});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    h
}

fn peer() -> Peer {
    Peer {
        addr: "127.0.0.1:5555".parse().unwrap(),
        certs: None,
        unix: false,
    }
}

fn jwt_settings(jwks: JwksSource) -> JwtSettings {
    JwtSettings {
        jwks,
        issuer: ISS.into(),
        audience: AUD.into(),
        identity_claim: "sub".into(),
        leeway: Duration::from_secs(5),
        algorithms: vec![
            JwtAlgorithm::Rs256,
            JwtAlgorithm::Es256,
            JwtAlgorithm::EdDsa,
        ],
        attributes: BTreeMap::from([("org".to_string(), "tenant".to_string())]),
    }
}

async fn build(jwt: JwtSettings) -> Authenticators {
    Authenticators::build(&AuthSettings {
        jwt: Some(jwt),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn jwt(a: &Authenticators, token: &str) -> Result<Principal, AuthError> {
    a.authenticate(RouteAuth::Jwt, &bearer(token), &peer())
        .await
}

#[track_caller]
fn refused(r: Result<Principal, AuthError>, why: &str) {
    match r {
        Err(AuthError::Invalid(m)) => assert!(m.contains(why), "refused for {m:?}, not {why:?}"),
        other => panic!("expected a refusal ({why}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// JWT with a JWKS file.

#[tokio::test]
async fn jwt_from_a_jwks_file_accepts_good_tokens_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa, ec, ed) = (TestKey::rsa("r1"), TestKey::ec("e1"), TestKey::ed("d1"));
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[&rsa, &ec, &ed])).unwrap();
    let a = build(jwt_settings(JwksSource::File(file.clone()))).await;

    // Each algorithm; identity, scalar claims as written, attributes.
    for key in [&rsa, &ec, &ed] {
        let c = claims(
            json!({"level": 3, "admin": true, "ratio": serde_json::from_str::<Value>("1.50").unwrap(),
                              "big": 123456789012345678901234567890u128,
                              "groups": ["a"], "obj": {"x": 1}}),
        );
        let p = jwt(&a, &key.token(&c)).await.unwrap();
        assert_eq!(p.name, "alice", "{}", key.alg());
        assert_eq!(p.method, RouteAuth::Jwt);
        assert_eq!(p.claims["tenant"], "acme");
        assert_eq!(p.claims["level"], "3");
        assert_eq!(p.claims["admin"], "true");
        assert_eq!(p.claims["ratio"], "1.50");
        assert_eq!(p.claims["big"], "123456789012345678901234567890");
        assert!(!p.claims.contains_key("groups") && !p.claims.contains_key("obj"));
        assert_eq!(
            p.attributes,
            BTreeMap::from([("org".into(), "acme".into())])
        );
    }
    // `aud` as an array holding ours; leeway covers a just-expired token.
    assert!(
        jwt(&a, &ec.token(&claims(json!({"aud": ["other", AUD]}))))
            .await
            .is_ok()
    );
    assert!(
        jwt(&a, &ec.token(&claims(json!({"exp": now() - 2}))))
            .await
            .is_ok()
    );

    // Claims.
    refused(
        jwt(&a, &ec.token(&claims(json!({"exp": now() - 100})))).await,
        "expired",
    );
    refused(
        jwt(&a, &ec.token(&claims(json!({"exp": null})))).await,
        "\"exp\"",
    );
    refused(
        jwt(&a, &ec.token(&claims(json!({"exp": "never"})))).await,
        "exp",
    );
    refused(
        jwt(&a, &ec.token(&claims(json!({"nbf": now() + 100})))).await,
        "not yet valid",
    );
    // GHSA-h395-gr6q-cpjc: a string `nbf` must not skip the check.
    refused(
        jwt(&a, &ec.token(&claims(json!({"nbf": "99999999999"})))).await,
        "nbf",
    );
    assert!(
        jwt(&a, &ec.token(&claims(json!({"nbf": now() - 10}))))
            .await
            .is_ok()
    );
    refused(
        jwt(&a, &ec.token(&claims(json!({"iss": "https://evil.test"})))).await,
        "issuer",
    );
    refused(
        jwt(&a, &ec.token(&claims(json!({"iss": null})))).await,
        "\"iss\"",
    );
    refused(
        jwt(&a, &ec.token(&claims(json!({"aud": "other"})))).await,
        "audience",
    );
    refused(
        jwt(&a, &ec.token(&claims(json!({"aud": ["x", "y"]})))).await,
        "audience",
    );
    refused(
        jwt(&a, &ec.token(&claims(json!({"aud": null})))).await,
        "\"aud\"",
    );
    refused(
        jwt(&a, &ec.token(&claims(json!({"sub": null})))).await,
        "\"sub\"",
    );
    refused(
        jwt(&a, &ec.token(&claims(json!({"sub": ""})))).await,
        "\"sub\"",
    );
    refused(
        jwt(&a, &ec.token(&claims(json!({"sub": 42})))).await,
        "\"sub\"",
    );

    // Signatures and algorithms.
    let good = ec.token(&claims(json!({})));
    let (head, rest) = good.split_once('.').unwrap();
    let sig_part = rest.rsplit_once('.').unwrap().1;
    let forged_claims = b64(claims(json!({"sub": "mallory"})).to_string().as_bytes());
    refused(
        jwt(&a, &format!("{head}.{forged_claims}.{sig_part}")).await,
        "signature",
    );
    // Same kid, another key.
    refused(
        jwt(&a, &TestKey::ec("e1").token(&claims(json!({})))).await,
        "signature",
    );
    // `alg: none`, HS256 (keyed with the public key, the classic confusion), an unknown alg.
    let c = claims(json!({}));
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "kid": "e1"}).to_string().as_bytes()),
        b64(c.to_string().as_bytes())
    );
    refused(jwt(&a, &none).await, "");
    let hs_header = b64(json!({"alg": "HS256", "kid": "r1"}).to_string().as_bytes());
    let hs_body = b64(c.to_string().as_bytes());
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, rsa.jwk().to_string().as_bytes()),
        format!("{hs_header}.{hs_body}").as_bytes(),
    );
    refused(
        jwt(&a, &format!("{hs_header}.{hs_body}.{}", b64(mac.as_ref()))).await,
        "not accepted",
    );
    // A header whose alg does not fit the key its kid names (RS256 on the EC key).
    let mismatched = ec.sign_raw(&json!({"alg": "RS256", "kid": "e1"}), &c);
    refused(jwt(&a, &mismatched).await, "no RS256 key");
    refused(
        jwt(&a, &TestKey::ec("nope").token(&c)).await,
        "unknown key id",
    );
    // Without kid: the keys of the token's algorithm are tried.
    assert!(
        jwt(&a, &ed.sign_raw(&json!({"alg": "EdDSA"}), &c))
            .await
            .is_ok()
    );
    // An embedded `jwk` header is never believed.
    let intruder = TestKey::ed("d1");
    let embedded = intruder.sign_raw(
        &json!({"alg": "EdDSA", "kid": "d1", "jwk": intruder.jwk()}),
        &c,
    );
    refused(jwt(&a, &embedded).await, "signature");

    // Header forms.
    assert_eq!(
        a.authenticate(RouteAuth::Jwt, &HeaderMap::new(), &peer())
            .await,
        Err(AuthError::Missing("bearer token"))
    );
    refused(jwt(&a, "not-a-jwt").await, "");
    refused(jwt(&a, &"a".repeat(20_000)).await, "longer");

    // An authenticator configured for ES256 only refuses RS256 and EdDSA tokens.
    let mut only_es = jwt_settings(JwksSource::File(file.clone()));
    only_es.algorithms = vec![JwtAlgorithm::Es256];
    let es = build(only_es).await;
    assert!(jwt(&es, &ec.token(&c)).await.is_ok());
    refused(jwt(&es, &rsa.token(&c)).await, "not accepted");
    refused(jwt(&es, &ed.token(&c)).await, "not accepted");

    // The identity claim is configurable.
    let mut by_email = jwt_settings(JwksSource::File(file));
    by_email.identity_claim = "email".into();
    let by_email = build(by_email).await;
    let p = jwt(
        &by_email,
        &ed.token(&claims(json!({"email": "a@acme.test"}))),
    )
    .await
    .unwrap();
    assert_eq!(p.name, "a@acme.test");
    assert_eq!(p.claims["sub"], "alice");

    // The 401 challenge (RFC 6750).
    assert_eq!(
        Authenticators::challenge(RouteAuth::Jwt, &AuthError::Missing("bearer token")),
        Some("Bearer realm=\"envelope-proxy\"".to_string())
    );
    assert_eq!(
        Authenticators::challenge(RouteAuth::Jwt, &AuthError::Invalid("x".into())),
        Some("Bearer realm=\"envelope-proxy\", error=\"invalid_token\"".to_string())
    );
    assert_eq!(
        Authenticators::challenge(RouteAuth::Mtls, &AuthError::Invalid("x".into())),
        None
    );
}

#[tokio::test]
async fn jwks_file_is_read_again_when_it_changes_and_bad_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (TestKey::ec("k1"), TestKey::ed("k2"));
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[&k1])).unwrap();
    let a = build(jwt_settings(JwksSource::File(file.clone()))).await;
    let c = claims(json!({}));
    assert!(jwt(&a, &k1.token(&c)).await.is_ok());
    refused(jwt(&a, &k2.token(&c)).await, "unknown key id");

    std::fs::write(&file, jwks(&[&k1, &k2])).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(jwt(&a, &k2.token(&c)).await.is_ok());

    // A broken new file keeps the keys we have.
    std::fs::write(&file, "{not json").unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(jwt(&a, &k2.token(&c)).await.is_ok());

    // At start, a JWKS file that does not load stops the start.
    for (name, content) in [("bad.json", "{not json"), ("empty.json", r#"{"keys": []}"#)] {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        let r = Authenticators::build(&AuthSettings {
            jwt: Some(jwt_settings(JwksSource::File(p))),
            ..Default::default()
        })
        .await;
        assert!(r.is_err(), "{name}");
    }
    let missing = Authenticators::build(&AuthSettings {
        jwt: Some(jwt_settings(JwksSource::File(
            dir.path().join("missing.json"),
        ))),
        ..Default::default()
    })
    .await;
    assert!(missing.is_err());
}

// ---------------------------------------------------------------------------------------------
// A PKI made with rcgen.

use common::pki::{Pki, client_config, tls_connect, write_leaf};

/// GET `path` over a new TLS connection: the status line, or the I/O error.
async fn https_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<String, String> {
    let mut s = tls_connect(addr, config).await.map_err(|e| e.to_string())?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out).into_owned();
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// The certificate the server presents to a new connection.
async fn presented(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> CertificateDer<'static> {
    let s = tls_connect(addr, config).await.unwrap();
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

// ---------------------------------------------------------------------------------------------
// JWT with a JWKS URL.

use common::jwt::JwksServer;

#[tokio::test(flavor = "multi_thread")]
async fn jwks_url_is_fetched_on_use_cached_and_follows_key_rotation() {
    let (k1, k2) = (TestKey::rsa("k1"), TestKey::ec("k2"));
    let server = JwksServer::start(jwks(&[&k1])).await;
    let a = build(jwt_settings(server.source(Duration::from_secs(3600)))).await;
    assert_eq!(server.hits(), 0, "fetched on first use, not at start");
    let c = claims(json!({}));
    assert_eq!(jwt(&a, &k1.token(&c)).await.unwrap().name, "alice");
    assert!(jwt(&a, &k1.token(&c)).await.is_ok());
    assert_eq!(server.hits(), 1, "cached");

    // The issuer rotates: a token with the new kid triggers one fetch.
    server.serve(jwks(&[&k1, &k2]));
    assert!(jwt(&a, &k2.token(&c)).await.is_ok());
    assert_eq!(server.hits(), 2);
    // Unknown kids do not make us fetch again within 10 s.
    for i in 0..5 {
        refused(
            jwt(&a, &TestKey::ed(&format!("x{i}")).token(&c)).await,
            "unknown key id",
        );
    }
    assert_eq!(server.hits(), 2);
    assert!(jwt(&a, &k1.token(&c)).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn jwks_url_refreshes_keeps_cached_keys_when_down_and_is_503_when_never_reached() {
    let (k1, k2) = (TestKey::ed("k1"), TestKey::ec("k2"));
    let server = JwksServer::start(jwks(&[&k1, &k2])).await;
    let a = build(jwt_settings(server.source(Duration::from_millis(300)))).await;
    let c = claims(json!({}));
    assert!(jwt(&a, &k1.token(&c)).await.is_ok());
    assert_eq!(server.hits(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(jwt(&a, &k1.token(&c)).await.is_ok());
    assert_eq!(server.hits(), 2, "refreshed after `refresh`");

    // The endpoint fails: the keys we have keep working.
    server.set_failing(true);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(jwt(&a, &k1.token(&c)).await.is_ok());
    assert_eq!(server.hits(), 3, "a refresh was attempted");

    // Back, without k1: after the next refresh k1's tokens stop working.
    server.set_failing(false);
    server.serve(jwks(&[&k2]));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(jwt(&a, &k2.token(&c)).await.is_ok());
    refused(jwt(&a, &k1.token(&c)).await, "unknown key id");

    // Never reached: 503 (Unavailable), not the client's fault.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let down = build(jwt_settings(JwksSource::Url {
        url: format!("https://127.0.0.1:{closed}/jwks"),
        ca_file: Some(server.ca_file.clone()),
        refresh: Duration::from_secs(60),
    }))
    .await;
    assert!(matches!(
        jwt(&down, &k1.token(&c)).await,
        Err(AuthError::Unavailable(_))
    ));
    // A server whose certificate we do not trust is unreachable too.
    let untrusted = build(jwt_settings(JwksSource::Url {
        url: format!("https://127.0.0.1:{}/jwks", server.addr.port()),
        ca_file: None,
        refresh: Duration::from_secs(60),
    }))
    .await;
    assert!(matches!(
        jwt(&untrusted, &k1.token(&c)).await,
        Err(AuthError::Unavailable(_))
    ));

    // A CA file that does not load stops the start.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad-ca.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let r = Authenticators::build(&AuthSettings {
        jwt: Some(jwt_settings(JwksSource::Url {
            url: "https://127.0.0.1:1/jwks".into(),
            ca_file: Some(bad),
            refresh: Duration::from_secs(60),
        })),
        ..Default::default()
    })
    .await;
    assert!(r.is_err());
}

// ---------------------------------------------------------------------------------------------
// mTLS.

/// The proxy's TLS acceptor with a client CA: the verified chain reaches `ClientInfo`, and
/// `auth = "mtls"` names the caller from it.
#[tokio::test(flavor = "multi_thread")]
async fn mtls_verified_chain_reaches_the_authenticator() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "clients");
    let server_leaf = pki.server();
    let (cert, key) = write_leaf(dir.path(), "server", &server_leaf);
    let tls =
        envelope_proxy::server::tls::Tls::load(&cert, &key, Some(&pki.ca_file("clients"))).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = listener.accept().await.unwrap();
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(tcp).await {
                    let info = envelope_proxy::server::client_info(peer, &s);
                    let _ = s.write_all(b"ok").await;
                    let _ = s.shutdown().await;
                    let _ = tx.send(info).await;
                }
            });
        }
    });
    let auth = Authenticators::build(&AuthSettings {
        mtls: Some(MtlsSettings {
            identity: CertIdentity::UriSan,
            attributes: BTreeMap::from([
                ("team".to_string(), "subject.OU".to_string()),
                ("td".to_string(), "spiffe.trust_domain".to_string()),
            ]),
        }),
        ..Default::default()
    })
    .await
    .unwrap();

    let alice = pki.client("alice", "spiffe://acme.test/ns/billing/sa/api");
    let mut s = tls_connect(addr, client_config(&pki.ca_file("clients"), Some(&alice)))
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let info = rx.recv().await.unwrap();
    assert!(info.tls);
    let chain = info.peer_certs.clone().expect("verified chain");
    assert_eq!(chain[0], alice.der);
    let p = auth
        .authenticate(RouteAuth::Mtls, &HeaderMap::new(), &info.peer())
        .await
        .unwrap();
    assert_eq!(p.name, "spiffe://acme.test/ns/billing/sa/api");
    assert_eq!(p.method, RouteAuth::Mtls);
    assert_eq!(p.attributes["team"], "billing");
    assert_eq!(p.attributes["td"], "acme.test");

    // No certificate: the handshake succeeds (other routes), `auth = "mtls"` refuses.
    let mut s = tls_connect(addr, client_config(&pki.ca_file("clients"), None))
        .await
        .unwrap();
    s.read_to_end(&mut Vec::new()).await.unwrap();
    let info = rx.recv().await.unwrap();
    assert!(info.peer_certs.is_none());
    assert_eq!(
        auth.authenticate(RouteAuth::Mtls, &HeaderMap::new(), &info.peer())
            .await,
        Err(AuthError::Missing("client certificate"))
    );
    // SigV4 is never decided here; an unconfigured authenticator is not a pass.
    assert!(matches!(
        auth.authenticate(RouteAuth::SigV4, &HeaderMap::new(), &info.peer())
            .await,
        Err(AuthError::Invalid(_))
    ));
    assert!(
        auth.authenticate(RouteAuth::Jwt, &HeaderMap::new(), &info.peer())
            .await
            .is_err()
    );
    assert!(
        auth.authenticate(RouteAuth::TrustedHeader, &HeaderMap::new(), &info.peer())
            .await
            .is_err()
    );
    assert_eq!(
        auth.authenticate(RouteAuth::None, &HeaderMap::new(), &info.peer())
            .await,
        Ok(Principal::anonymous())
    );
}

/// Through the running proxy: clients without a certificate and with a good one pass the
/// handshake; one from another CA does not; the server certificate is reloaded when its files
/// change, and a broken replacement keeps the old one.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_listener_verifies_client_certs_and_reloads_its_certificate() {
    let js = JsonServer::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "proxy");
    let first = pki.server();
    let (cert, key) = write_leaf(dir.path(), "server", &first);
    let routes = format!(
        "[[route]]\nname = \"db\"\npath = \"/users\"\nupstream = \"{}\"\npassthrough = true\n",
        js.url()
    );
    let server = format!(
        "tls = {{ cert_file = \"{}\", key_file = \"{}\", client_ca_file = \"{}\" }}",
        cert.display(),
        key.display(),
        pki.ca_file("proxy").display()
    );
    let proxy = common::Proxy::start(&routes, &server).await;
    let ca = pki.ca_file("proxy");

    let good = pki.client("alice", "spiffe://acme.test/alice");
    assert_eq!(
        https_get(proxy.addr, client_config(&ca, None), "/users")
            .await
            .unwrap(),
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        https_get(proxy.addr, client_config(&ca, Some(&good)), "/users")
            .await
            .unwrap(),
        "HTTP/1.1 200 OK"
    );
    let other = Pki::new(dir.path(), "other");
    let stranger = other.client("mallory", "spiffe://evil.test/mallory");
    let r = https_get(proxy.addr, client_config(&ca, Some(&stranger)), "/users").await;
    assert!(
        r.as_ref().is_err() || r.as_ref().is_ok_and(|l| l.is_empty()),
        "a certificate from another CA got through: {r:?}"
    );

    assert_eq!(
        presented(proxy.addr, client_config(&ca, None)).await,
        first.der
    );

    // A broken replacement (a key that does not fit) keeps the old certificate.
    let second = pki.server();
    std::fs::write(&cert, &second.cert_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        presented(proxy.addr, client_config(&ca, None)).await,
        first.der
    );

    // The matching key arrives: new connections get the new certificate.
    write_leaf(dir.path(), "server", &second);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if presented(proxy.addr, client_config(&ca, None)).await == second.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Client certificates are still verified with the rebuilt config.
    assert_eq!(
        https_get(proxy.addr, client_config(&ca, Some(&good)), "/users")
            .await
            .unwrap(),
        "HTTP/1.1 200 OK"
    );
}

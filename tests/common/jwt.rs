//! JWTs signed in the tests (RS256 with a committed test key, ES256 and EdDSA keys made by
//! ring) and the JWKS documents that publish them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use envelope_proxy::config::auth::JwksSource;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

pub enum Signer {
    Rsa(sig::RsaKeyPair),
    Ec(sig::EcdsaKeyPair),
    Ed(sig::Ed25519KeyPair),
}

pub struct TestKey {
    pub kid: String,
    pub signer: Signer,
}

impl TestKey {
    pub fn rsa(kid: &str) -> TestKey {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/jwt-test-rsa.pem");
        let der = match PrivateKeyDer::from_pem_file(path).unwrap() {
            PrivateKeyDer::Pkcs8(k) => k,
            _ => panic!("test RSA key is not PKCS#8"),
        };
        let key = sig::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
        TestKey {
            kid: kid.into(),
            signer: Signer::Rsa(key),
        }
    }

    pub fn ec(kid: &str) -> TestKey {
        let rng = SystemRandom::new();
        let alg = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = sig::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        TestKey {
            kid: kid.into(),
            signer: Signer::Ec(sig::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap()),
        }
    }

    pub fn ed(kid: &str) -> TestKey {
        let pkcs8 = sig::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        TestKey {
            kid: kid.into(),
            signer: Signer::Ed(sig::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()),
        }
    }

    pub fn alg(&self) -> &'static str {
        match self.signer {
            Signer::Rsa(_) => "RS256",
            Signer::Ec(_) => "ES256",
            Signer::Ed(_) => "EdDSA",
        }
    }

    pub fn jwk(&self) -> Value {
        match &self.signer {
            Signer::Rsa(k) => {
                let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(k.public());
                json!({"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                       "n": b64(&c.n), "e": b64(&c.e)})
            }
            Signer::Ec(k) => {
                let p = k.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": self.kid,
                       "x": b64(&p[1..33]), "y": b64(&p[33..65])})
            }
            Signer::Ed(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "kid": self.kid,
                       "x": b64(k.public_key().as_ref())})
            }
        }
    }

    pub fn sign_raw(&self, header: &Value, claims: &Value) -> String {
        let msg = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let s = match &self.signer {
            Signer::Rsa(k) => {
                let mut out = vec![0; k.public().modulus_len()];
                k.sign(&sig::RSA_PKCS1_SHA256, &rng, msg.as_bytes(), &mut out)
                    .unwrap();
                out
            }
            Signer::Ec(k) => k.sign(&rng, msg.as_bytes()).unwrap().as_ref().to_vec(),
            Signer::Ed(k) => k.sign(msg.as_bytes()).as_ref().to_vec(),
        };
        format!("{msg}.{}", b64(&s))
    }

    pub fn token(&self, claims: &Value) -> String {
        self.sign_raw(
            &json!({"alg": self.alg(), "kid": self.kid, "typ": "JWT"}),
            claims,
        )
    }
}

pub fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

pub fn jwks(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An https JWKS endpoint (`/jwks`) with a CA of its own; it counts requests and can fail.
pub struct JwksServer {
    pub addr: SocketAddr,
    doc: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    fail: Arc<AtomicBool>,
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl JwksServer {
    pub async fn start(doc: String) -> JwksServer {
        let dir = tempfile::tempdir().unwrap();
        let pki = super::pki::Pki::new(dir.path(), "jwks");
        let leaf = pki.server();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der.clone()],
            PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = Arc::new(Mutex::new(doc));
        let hits = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(AtomicBool::new(false));
        let (d, h, f) = (doc.clone(), hits.clone(), fail.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    break;
                };
                let acceptor = acceptor.clone();
                let (d, h, f) = (d.clone(), h.clone(), f.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (d, h, f) = (d.clone(), h.clone(), f.clone());
                            async move {
                                h.fetch_add(1, Ordering::SeqCst);
                                let (status, body) = if f.load(Ordering::SeqCst) {
                                    (500, "down".to_string())
                                } else if req.uri().path() != "/jwks" {
                                    (404, String::new())
                                } else {
                                    (200, d.lock().unwrap().clone())
                                };
                                let mut resp = http::Response::new(http_body_util::Full::new(
                                    Bytes::from(body),
                                ));
                                *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        JwksServer {
            addr,
            doc,
            hits,
            fail,
            ca_file: pki.ca_file("jwks"),
            _dir: dir,
        }
    }

    pub fn source(&self, refresh: Duration) -> JwksSource {
        JwksSource::Url {
            url: format!("https://127.0.0.1:{}/jwks", self.addr.port()),
            ca_file: Some(self.ca_file.clone()),
            refresh,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/jwks", self.addr.port())
    }

    /// Answer 500 to everything (or stop).
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn serve(&self, doc: String) {
        *self.doc.lock().unwrap() = doc;
    }
}

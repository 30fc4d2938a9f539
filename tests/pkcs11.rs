//! The PKCS#11 backend against a real SoftHSM2 token (no mocks). SoftHSM2 is installed by
//! `scripts/softhsm-setup.sh`; tests that need it fail, naming that script, when it is missing.
//!
//! How SoftHSM2 is configured without touching this process's environment: SoftHSM2 reads
//! SOFTHSM2_CONF (which says where its tokens live) in C_Initialize, and only through the
//! environment. Setting it here would take `unsafe { std::env::set_var }` in a multi-threaded
//! process (racing every thread that reads the environment, C code included) and would force one
//! token directory, one library state and one login state on every test in the binary. So each
//! SoftHSM test runs itself again in a child process instead ([`softhsm_test`]):
//!
//! 1. the parent makes a temp dir with its own `softhsm2.conf` and initializes a token there with
//!    `softhsm2-util --init-token` (SOFTHSM2_CONF set on that `Command` only);
//! 2. it runs this test binary again, filtered to exactly that test, with SOFTHSM2_CONF and
//!    [`CHILD`] set on the child's `Command`, and requires it to pass exactly one test;
//! 3. the child sees [`CHILD`] and runs the test body against its private token.
//!
//! Nothing ever modifies the environment in-process, and every test has its own tokens, PKCS#11
//! library state and login state (so resetting the "device" in one test cannot disturb another).
#![cfg(feature = "pkcs11")]

mod conformance;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11 as Module};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use envelope_proxy::config::{Pkcs11Settings, RouteKind, SecretSource};
use envelope_proxy::envelope::token::{ParsedToken, seal};
use envelope_proxy::envelope::{Context, Header};
use envelope_proxy::keys::pkcs11::Pkcs11;
use envelope_proxy::keys::resilience::{ResilienceSettings, Resilient};
use envelope_proxy::keys::{
    BackendError, CacheLimits, DataKey, KeyRef, KeyService, RootKeyProvider,
};
use envelope_proxy::metrics::Metrics;

/// Set (to the test's temp dir) in the environment of the child process that runs a test body.
const CHILD: &str = "ENVELOPE_PROXY_PKCS11_TEST_DIR";
/// Holds the user PIN in every child, for `SecretSource::Env`.
const PIN_ENV: &str = "ENVELOPE_PROXY_PKCS11_TEST_PIN";
const TOKEN: &str = "envelope";
const PIN: &str = "1234";
const SO_PIN: &str = "5678";
const SETUP: &str = "run scripts/softhsm-setup.sh to install SoftHSM2";

/// SoftHSM2's PKCS#11 module: $SOFTHSM2_MODULE, or the usual install locations.
fn module_path() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("SOFTHSM2_MODULE")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.extend(
        [
            "/usr/lib/softhsm/libsofthsm2.so",
            "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
            "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
            "/usr/local/lib/softhsm/libsofthsm2.so",
            "/usr/lib64/pkcs11/libsofthsm2.so",
            "/usr/lib/pkcs11/libsofthsm2.so",
            "/opt/homebrew/lib/softhsm/libsofthsm2.so",
        ]
        .map(PathBuf::from),
    );
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "SoftHSM2's PKCS#11 module (libsofthsm2.so) is not installed (looked at {candidates:?}): \
                 {SETUP}, or set SOFTHSM2_MODULE"
            )
        })
}

fn softhsm2_util(conf: &Path, args: &[&str]) {
    let out = Command::new("softhsm2-util")
        .args(args)
        .env("SOFTHSM2_CONF", conf)
        .output()
        .unwrap_or_else(|e| panic!("cannot run softhsm2-util ({e}): {SETUP}"));
    assert!(
        out.status.success(),
        "softhsm2-util {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Run `body` against a fresh SoftHSM2 token (label [`TOKEN`], user PIN [`PIN`]) in a child
/// process; see the module docs. `name` must be the calling test's name.
fn softhsm_test<F, Fut>(name: &str, body: F)
where
    F: FnOnce(Hsm) -> Fut,
    Fut: Future<Output = ()>,
{
    let module = module_path();
    if let Some(dir) = std::env::var_os(CHILD) {
        let hsm = Hsm {
            dir: PathBuf::from(dir),
            module,
            ctx: OnceLock::new(),
        };
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(body(hsm));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        ),
    )
    .unwrap();
    softhsm2_util(
        &conf,
        &[
            "--init-token",
            "--free",
            "--label",
            TOKEN,
            "--pin",
            PIN,
            "--so-pin",
            SO_PIN,
        ],
    );
    write_private(&dir.path().join("pin"), &format!("{PIN}\n"));
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(CHILD, dir.path())
        .env(PIN_ENV, PIN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "test {name} failed in its SoftHSM2 child process (its output is above)"
    );
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the child process did not run test {name} (is the name passed to softhsm_test right?)"
    );
}

/// The child's view: its temp dir (token directory, PIN file) and the test's own PKCS#11 handle
/// for creating keys. That handle stays open for the whole child, so the library is loaded and
/// initialized once and the backend under test shares it (as two backends in the proxy would).
struct Hsm {
    dir: PathBuf,
    module: PathBuf,
    ctx: OnceLock<Module>,
}

impl Hsm {
    fn pin_file(&self) -> PathBuf {
        self.dir.join("pin")
    }

    fn settings(&self, sessions: usize) -> Pkcs11Settings {
        Pkcs11Settings {
            module: self.module.clone(),
            token_label: TOKEN.into(),
            pin: SecretSource::File(self.pin_file()),
            sessions,
        }
    }

    fn connect(&self, sessions: usize) -> Pkcs11 {
        Pkcs11::connect("hsm", &self.settings(sessions)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ctx(&self) -> &Module {
        self.ctx.get_or_init(|| {
            let m = Module::new(&self.module).unwrap();
            init(&m);
            m
        })
    }

    fn slot(&self) -> Slot {
        let ctx = self.ctx();
        ctx.get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label().trim() == TOKEN)
            .expect("the test token")
    }

    /// An AES-256 root key generated in the token (never extractable).
    fn create_root_key(&self, label: &str, wrap: bool, unwrap: bool) {
        let session = self.ctx().open_rw_session(self.slot()).unwrap();
        match session.login(UserType::User, Some(&AuthPin::from(PIN))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("login: {e}"),
        }
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Wrap(wrap),
                    Attribute::Unwrap(unwrap),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                ],
            )
            .unwrap();
    }

    /// What a device reset does to an application: C_Finalize closes every session and logs
    /// out; the library comes back (C_Initialize) with none of them.
    fn reset(&self) {
        self.ctx().clone().finalize().unwrap();
        init(self.ctx());
    }
}

fn init(m: &Module) {
    match m.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
}

fn ctx(tenant: &str) -> Context {
    [("tenant", tenant), ("table", "users")]
        .into_iter()
        .collect()
}

fn connect_err(settings: &Pkcs11Settings) -> String {
    match Pkcs11::connect("hsm", settings) {
        Ok(_) => panic!("connect must fail"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------
// Against SoftHSM2.

#[test]
fn pkcs11_conforms() {
    softhsm_test("pkcs11_conforms", |hsm| async move {
        hsm.create_root_key("root1", true, true);
        hsm.create_root_key("off", false, false);
        conformance::run(
            Arc::new(hsm.connect(2)),
            conformance::Keys {
                key: "root1",
                disabled: Some("off"),
            },
        )
        .await;
    });
}

#[test]
fn generate_then_unwrap_round_trips() {
    softhsm_test("generate_then_unwrap_round_trips", |hsm| async move {
        hsm.create_root_key("root1", true, true);
        // The PIN from an environment variable this time (set on the child's Command).
        let mut settings = hsm.settings(2);
        settings.pin = SecretSource::Env(PIN_ENV.into());
        let p = Pkcs11::connect("hsm", &settings).unwrap();
        let g = p.generate_data_key("root1", &ctx("acme")).await.unwrap();
        assert_eq!(g.wrapped.backend, "hsm");
        assert_eq!(g.wrapped.key_id, "root1");
        assert_eq!(g.wrapped.key_version, 0);
        assert_eq!(g.wrapped.blob.len(), 72, "RFC 5649 wrap of 64 bytes");
        let k = p.unwrap_data_key(&g.wrapped, &ctx("acme")).await.unwrap();
        assert_eq!(k.expose(), g.plaintext.expose());
        let g2 = p.generate_data_key("root1", &ctx("acme")).await.unwrap();
        assert_ne!(g2.plaintext.expose(), g.plaintext.expose());
        assert_ne!(g2.wrapped.blob, g.wrapped.blob);
        let d = p.describe_key("root1").await.unwrap();
        assert!(d.enabled);
        assert_eq!((d.key_id.as_str(), d.current_version), ("root1", 0));
    });
}

#[test]
fn wrapping_an_existing_key_gives_it_back() {
    softhsm_test("wrapping_an_existing_key_gives_it_back", |hsm| async move {
        hsm.create_root_key("root1", true, true);
        let p = hsm.connect(1);
        let dk = DataKey::from_bytes(*b"an existing 32-byte data key!!!!");
        let w = p.wrap_data_key("root1", &dk, &ctx("acme")).await.unwrap();
        assert_eq!(w.blob.len(), 72);
        assert!(
            !w.blob
                .windows(8)
                .any(|win| dk.expose().windows(8).any(|k| k == win))
        );
        let k = p.unwrap_data_key(&w, &ctx("acme")).await.unwrap();
        assert_eq!(k.expose(), dk.expose());
    });
}

#[test]
fn another_key_context_or_key_is_invalid_ciphertext() {
    softhsm_test(
        "another_key_context_or_key_is_invalid_ciphertext",
        |hsm| async move {
            hsm.create_root_key("root1", true, true);
            hsm.create_root_key("root2", true, true);
            let p = hsm.connect(2);
            let g = p.generate_data_key("root1", &ctx("acme")).await.unwrap();
            for other in [
                ctx("globex"),
                Context::new(),
                ctx("acme").merged(&ctx("acme2")),
            ] {
                let e = p.unwrap_data_key(&g.wrapped, &other).await.unwrap_err();
                assert!(matches!(e, BackendError::InvalidCiphertext), "{e:?}");
            }
            // The same blob claimed under another root key, or another label for the same binding.
            let mut moved = g.wrapped.clone();
            moved.key_id = "root2".into();
            let e = p.unwrap_data_key(&moved, &ctx("acme")).await.unwrap_err();
            assert!(matches!(e, BackendError::InvalidCiphertext), "{e:?}");
            // The real one still opens.
            assert!(p.unwrap_data_key(&g.wrapped, &ctx("acme")).await.is_ok());
        },
    );
}

#[test]
fn tampered_blobs_are_invalid_ciphertext() {
    softhsm_test("tampered_blobs_are_invalid_ciphertext", |hsm| async move {
        hsm.create_root_key("root1", true, true);
        let p = hsm.connect(2);
        let good = p
            .generate_data_key("root1", &ctx("acme"))
            .await
            .unwrap()
            .wrapped;
        let mut bad_blobs = Vec::new();
        for i in 0..good.blob.len() {
            for bit in [0x01, 0x80] {
                let mut b = good.blob.clone();
                b[i] ^= bit;
                bad_blobs.push(b);
            }
        }
        for len in [0, 1, 8, 16, 40, 64, 71] {
            bad_blobs.push(good.blob[..len].to_vec());
        }
        for extra in [1, 8, 56, 4096] {
            let mut b = good.blob.clone();
            b.extend(std::iter::repeat_n(0xa5, extra));
            bad_blobs.push(b);
        }
        bad_blobs.push(vec![0; 72]);
        bad_blobs.push(vec![0xff; 72]);
        for blob in bad_blobs {
            let mut w = good.clone();
            w.blob = blob;
            let len = w.blob.len();
            let e = p.unwrap_data_key(&w, &ctx("acme")).await.unwrap_err();
            assert!(
                matches!(e, BackendError::InvalidCiphertext),
                "{len} bytes: {e:?}"
            );
        }
        let mut w = good.clone();
        w.key_version = 1;
        let e = p.unwrap_data_key(&w, &ctx("acme")).await.unwrap_err();
        assert!(matches!(e, BackendError::InvalidCiphertext), "{e:?}");
        // The token still answers normally afterwards.
        assert!(p.unwrap_data_key(&good, &ctx("acme")).await.is_ok());
    });
}

#[test]
fn unknown_key_label_is_key_not_found() {
    softhsm_test("unknown_key_label_is_key_not_found", |hsm| async move {
        hsm.create_root_key("root1", true, true);
        let p = hsm.connect(1);
        let is_not_found = |r: Result<(), BackendError>| {
            let e = r.unwrap_err();
            assert!(
                matches!(&e, BackendError::KeyNotFound(k) if k == "nope"),
                "{e:?}"
            );
        };
        is_not_found(p.generate_data_key("nope", &ctx("acme")).await.map(drop));
        is_not_found(
            p.wrap_data_key("nope", &DataKey::generate(), &ctx("acme"))
                .await
                .map(drop),
        );
        is_not_found(p.describe_key("nope").await.map(drop));
        let mut w = p
            .generate_data_key("root1", &ctx("acme"))
            .await
            .unwrap()
            .wrapped;
        w.key_id = "nope".into();
        is_not_found(p.unwrap_data_key(&w, &ctx("acme")).await.map(drop));
    });
}

#[test]
fn key_without_wrap_permission_is_disabled() {
    softhsm_test(
        "key_without_wrap_permission_is_disabled",
        |hsm| async move {
            hsm.create_root_key("wrap-only", true, false);
            let p = hsm.connect(1);
            assert!(!p.describe_key("wrap-only").await.unwrap().enabled);
            let g = p
                .generate_data_key("wrap-only", &ctx("acme"))
                .await
                .unwrap();
            let e = p
                .unwrap_data_key(&g.wrapped, &ctx("acme"))
                .await
                .unwrap_err();
            assert!(matches!(e, BackendError::KeyDisabled(_)), "{e:?}");
        },
    );
}

#[test]
fn concurrent_calls_share_the_session_pool() {
    softhsm_test(
        "concurrent_calls_share_the_session_pool",
        |hsm| async move {
            hsm.create_root_key("root1", true, true);
            let p = Arc::new(hsm.connect(2));
            let tasks: Vec<_> = (0..32)
                .map(|i| {
                    let p = p.clone();
                    tokio::spawn(async move {
                        let c = ctx(&format!("tenant-{i}"));
                        let g = p.generate_data_key("root1", &c).await.unwrap();
                        let k = p.unwrap_data_key(&g.wrapped, &c).await.unwrap();
                        assert_eq!(k.expose(), g.plaintext.expose());
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        },
    );
}

#[test]
fn recovers_by_itself_after_a_device_reset() {
    softhsm_test(
        "recovers_by_itself_after_a_device_reset",
        |hsm| async move {
            hsm.create_root_key("root1", true, true);
            let p = hsm.connect(1);
            let g = p.generate_data_key("root1", &ctx("acme")).await.unwrap();
            hsm.reset();
            // The pooled session is gone: a retryable error, and the session is dropped ...
            let e = p
                .unwrap_data_key(&g.wrapped, &ctx("acme"))
                .await
                .unwrap_err();
            assert!(matches!(e, BackendError::Unavailable(_)), "{e:?}");
            // ... so the next call opens a new one and logs in again.
            let k = p.unwrap_data_key(&g.wrapped, &ctx("acme")).await.unwrap();
            assert_eq!(k.expose(), g.plaintext.expose());

            // Behind the resilience layer (as the proxy runs it) callers see no error at all.
            let r = Resilient::new(
                hsm.connect(2),
                ResilienceSettings {
                    retries: 4,
                    backoff: Duration::from_millis(1),
                    ..ResilienceSettings::default()
                },
            );
            assert!(r.generate_data_key("root1", &ctx("acme")).await.is_ok());
            hsm.reset();
            let k = r.unwrap_data_key(&g.wrapped, &ctx("acme")).await.unwrap();
            assert_eq!(k.expose(), g.plaintext.expose());
            assert!(r.generate_data_key("root1", &ctx("acme")).await.is_ok());
        },
    );
}

#[test]
fn wrong_pin_is_a_clear_startup_error() {
    softhsm_test("wrong_pin_is_a_clear_startup_error", |hsm| async move {
        let bad = hsm.dir.join("bad-pin");
        write_private(&bad, "9876\n");
        let mut settings = hsm.settings(1);
        settings.pin = SecretSource::File(bad);
        let e = connect_err(&settings);
        assert!(e.contains("wrong PIN for token \"envelope\""), "{e}");
        assert!(e.contains("backend hsm"), "{e}");
        assert!(!e.contains("9876"), "the PIN must never appear: {e}");
        // The right PIN still works.
        hsm.connect(1);
    });
}

#[test]
fn missing_token_label_lists_the_tokens_found() {
    softhsm_test(
        "missing_token_label_lists_the_tokens_found",
        |hsm| async move {
            let mut settings = hsm.settings(1);
            settings.token_label = "no-such-token".into();
            let e = connect_err(&settings);
            assert!(
                e.contains("no PKCS#11 token labelled \"no-such-token\""),
                "{e}"
            );
            assert!(e.contains("tokens found: \"envelope\""), "{e}");
        },
    );
}

#[test]
fn seals_and_opens_a_token_end_to_end() {
    softhsm_test("seals_and_opens_a_token_end_to_end", |hsm| async move {
        hsm.create_root_key("root1", true, true);
        // Through the config file and the proxy's own backend wiring.
        let d = hsm.dir.display();
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
auth = "none"

[keyring]
path = "{d}/keyring.json"
master_key_file = "{d}/master.key"

[backend.hsm]
kind = "pkcs11"
module = "{module}"
token_label = "envelope"
pin_file = "{d}/pin"
sessions = 2

[[route]]
name = "users"
path = "/users/{{id?}}"
upstream = "http://127.0.0.1:9"
keys = ["hsm:root1", "users"]
fields = ["$.ssn"]
"#,
            module = hsm.module.display()
        );
        let config = envelope_proxy::config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        let keys = match &config.routes[0].kind {
            RouteKind::JsonFields(r) => r.keys.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(keys[0], KeyRef::parse("hsm:root1").unwrap());
        let (keyring, backends) = envelope_proxy::keys::connect_backends(&config)
            .await
            .unwrap();
        keyring.unwrap().create_key("users").unwrap();
        let sealer = KeyService::new(
            backends.clone(),
            CacheLimits::default(),
            Arc::new(Metrics::new()),
        );
        let key_ctx = ctx("acme");
        let msg_ctx: Context = [("id", "u1")].into_iter().collect();
        let sk = sealer.sealing_key(&keys, &key_ctx, 1, 11).await.unwrap();
        assert_eq!(sk.header.edks.len(), 2);
        assert_eq!(sk.header.edks[0].backend, "hsm");
        let token = seal(&sk.header, sk.data_key.expose(), &msg_ctx, b"\"123-45-67\"").unwrap();

        // A fresh service (empty cache) that can only use the HSM's EDK.
        let opener = KeyService::new(backends, CacheLimits::default(), Arc::new(Metrics::new()));
        let parsed = ParsedToken::parse(&token).unwrap();
        let hsm_only = Header {
            edks: vec![parsed.header.edks[0].clone()],
        };
        let dk = opener.opening_key(&hsm_only, &key_ctx).await.unwrap();
        assert_eq!(
            parsed.open(dk.expose(), &msg_ctx).unwrap(),
            b"\"123-45-67\""
        );
        let e = opener
            .opening_key(&hsm_only, &ctx("globex"))
            .await
            .unwrap_err();
        assert!(matches!(e, BackendError::InvalidCiphertext), "{e:?}");
    });
}

// ---------------------------------------------------------------------------------------------
// Startup errors caught before any module is loaded (no SoftHSM2 needed).

#[test]
fn missing_module_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("pin");
    write_private(&pin, "1234\n");
    let settings = Pkcs11Settings {
        module: dir.path().join("no-such-libpkcs11.so"),
        token_label: TOKEN.into(),
        pin: SecretSource::File(pin.clone()),
        sessions: 1,
    };
    let e = connect_err(&settings);
    assert!(e.contains("PKCS#11 module"), "{e}");
    assert!(e.contains("no-such-libpkcs11.so"), "{e}");
    assert!(e.contains("does not exist"), "{e}");
    // A file that is not a shared library at all.
    let junk = dir.path().join("junk.so");
    std::fs::write(&junk, b"not a library").unwrap();
    let e = connect_err(&Pkcs11Settings {
        module: junk,
        ..settings
    });
    assert!(e.contains("cannot load PKCS#11 module"), "{e}");
}

#[test]
fn group_or_world_readable_pin_file_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("pin");
    std::fs::write(&pin, "1234\n").unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let settings = Pkcs11Settings {
        module: PathBuf::from("/nonexistent/libsofthsm2.so"),
        token_label: TOKEN.into(),
        pin: SecretSource::File(pin.clone()),
        sessions: 1,
    };
    let e = connect_err(&settings);
    assert!(e.contains("chmod 0400"), "{e}");
    assert!(e.contains("644"), "{e}");
    assert!(!e.contains("1234"), "the PIN must never appear: {e}");
    let e = connect_err(&Pkcs11Settings {
        pin: SecretSource::Env("ENVELOPE_PROXY_PKCS11_TEST_UNSET_VARIABLE".into()),
        ..settings
    });
    assert!(
        e.contains("ENVELOPE_PROXY_PKCS11_TEST_UNSET_VARIABLE"),
        "{e}"
    );
}

#[test]
fn a_logged_out_or_reset_token_is_an_outage_never_invalid() {
    softhsm_test(
        "a_logged_out_or_reset_token_is_an_outage_never_invalid",
        |hsm| async move {
            hsm.create_root_key("root1", true, true);
            let p = hsm.connect(1);
            let g = p.generate_data_key("root1", &ctx("acme")).await.unwrap();
            // Another part of the application logs out: login state is per application, so
            // the backend's pooled session drops to the public state and finds no private key.
            let other = hsm.ctx().open_ro_session(hsm.slot()).unwrap();
            other.logout().unwrap();
            let e = p
                .unwrap_data_key(&g.wrapped, &ctx("acme"))
                .await
                .unwrap_err();
            assert!(
                matches!(e, BackendError::Unavailable(_)) && e.retryable(),
                "a lost login is an outage, not a missing key or a bad blob: {e:?}"
            );
            // The broken session was discarded: the next call logs in again and opens it.
            let k = p.unwrap_data_key(&g.wrapped, &ctx("acme")).await.unwrap();
            assert_eq!(k.expose(), g.plaintext.expose());

            // A finalized library (device reset): also an outage.
            hsm.reset();
            let e = p
                .unwrap_data_key(&g.wrapped, &ctx("acme"))
                .await
                .unwrap_err();
            assert!(!e.proves_invalid() && e.retryable(), "{e:?}");
        },
    );
}

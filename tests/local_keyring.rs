//! The conformance suite against the embedded keyring.

mod conformance;

#[tokio::test]
async fn local_keyring_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let kr = envelope_proxy::keys::keyring::Keyring::open(
        "local",
        &dir.path().join("keyring.json"),
        &envelope_proxy::keys::keyring::MasterKeySource::File(dir.path().join("master.key")),
    )
    .unwrap();
    kr.create_key("users").unwrap();
    kr.create_key("off").unwrap();
    kr.set_enabled("off", false).unwrap();
    conformance::run(
        kr,
        conformance::Keys {
            key: "users",
            disabled: Some("off"),
        },
    )
    .await;
}

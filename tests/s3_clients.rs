//! rclone and s3cmd, unmodified, through the encrypting S3 gateway (moto as the upstream).
//! Both treat 32-hex ETags as MD5s of the content: the gateway marks ETags (`-0`) so they do
//! not compare them with what they downloaded, and listings carry plaintext sizes so
//! `rclone sync` can tell nothing changed.

mod common;

use std::path::Path;

use common::s3::{CLIENT_KEY, CLIENT_SECRET, gateway, run};
use common::{Moto, Proxy};

const KEYS: [&str; 5] = [
    "plain.bin",
    "with space.bin",
    "plus+sign.bin",
    "per%cent.bin",
    "unicodé/ключ.bin",
];

fn write_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, key) in KEYS.iter().enumerate() {
        let len = [0usize, 1, 16384, 16385, 300_000][i];
        let body: Vec<u8> = (0..len).map(|j| (j * 31 + i * 7) as u8).collect();
        let path = dir.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &body).unwrap();
        out.push((key.to_string(), body));
    }
    out
}

/// A 12 MiB file: above the 5 MiB part size the tests give the clients, so it goes up in three
/// parts (5 + 5 + 2 MiB).
fn write_big(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let body: Vec<u8> = (0..12usize << 20)
        .map(|j| (j * 13 + j / 4099) as u8)
        .collect();
    let path = dir.join("big.bin");
    std::fs::write(&path, &body).unwrap();
    (path, body)
}

/// What moto holds for a multipart `key` of `parts` parts: each part a sealed message, the
/// whole without the plaintext.
async fn assert_stored_multipart(moto: &Moto, bucket: &str, key: &str, body: &[u8], parts: u64) {
    let (status, stored) = common::s3::raw_get(moto, bucket, key).await;
    assert_eq!(status, 200, "{key}");
    let p = body.len() as u64;
    assert_eq!(
        stored.len() as u64,
        p + 16 * (p / 16384) + 72 * parts,
        "{key}"
    );
    assert!(
        !stored.windows(32).any(|w| w == &body[1000..1032]),
        "{key} stored in clear"
    );
}

/// What moto holds for `key`: ciphertext of the predicted size, without the plaintext.
async fn assert_stored_encrypted(proxy: &Proxy, moto: &Moto, bucket: &str, key: &str, body: &[u8]) {
    let _ = proxy;
    let enc_key: String = key
        .split('/')
        .map(|s| {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/");
    let (status, stored) = common::s3::raw_get(moto, bucket, &enc_key).await;
    assert_eq!(status, 200, "{key}");
    let p = body.len() as u64;
    assert_eq!(stored.len() as u64, p + 16 * (p / 16384) + 72, "{key}");
    if body.len() >= 32 {
        assert!(
            !stored.windows(32).any(|w| w == &body[..32]),
            "{key} stored in clear"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rclone_copy_sync_cat_ranges_and_server_side_copy() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), "").await;
    let endpoint = format!("http://{}", proxy.addr);
    let env = [
        ("RCLONE_CONFIG_EP_TYPE", "s3"),
        ("RCLONE_CONFIG_EP_PROVIDER", "Other"),
        ("RCLONE_CONFIG_EP_ACCESS_KEY_ID", CLIENT_KEY),
        ("RCLONE_CONFIG_EP_SECRET_ACCESS_KEY", CLIENT_SECRET),
        ("RCLONE_CONFIG_EP_ENDPOINT", endpoint.as_str()),
        ("RCLONE_CONFIG_EP_REGION", "us-east-1"),
        ("RCLONE_CONFIG_EP_FORCE_PATH_STYLE", "true"),
        ("RCLONE_CONFIG", "/dev/null"),
    ];
    let src = dir.path().join("src");
    let files = write_files(&src);
    run("rclone", &["mkdir", "ep:rclone-bucket"], &env).await;
    let src_arg = src.to_str().unwrap();
    run("rclone", &["sync", src_arg, "ep:rclone-bucket"], &env).await;
    // A second sync finds nothing to do: sizes (and mtimes) from the listing match.
    let mut verbose_env = env.to_vec();
    verbose_env.push(("CAPTURE_STDERR", "1"));
    let second = run(
        "rclone",
        &["sync", "-v", src_arg, "ep:rclone-bucket"],
        &verbose_env,
    )
    .await;
    assert!(
        second.contains("There was nothing to transfer") || !second.contains("Copied"),
        "{second}"
    );
    assert!(
        !second.contains("Copied"),
        "the second sync uploaded again:\n{second}"
    );
    let listing = run(
        "rclone",
        &["lsjson", "-R", "--files-only", "ep:rclone-bucket"],
        &env,
    )
    .await;
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    for (key, body) in &files {
        let entry = listing
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["Path"] == key.as_str())
            .unwrap_or_else(|| panic!("{key} not listed: {listing}"));
        assert_eq!(entry["Size"], body.len(), "{key}");
        let got = run("rclone", &["cat", &format!("ep:rclone-bucket/{key}")], &env).await;
        assert_eq!(
            got.as_bytes(),
            String::from_utf8_lossy(body).as_bytes(),
            "{key}"
        );
        assert_stored_encrypted(&proxy, &moto, "rclone-bucket", key, body).await;
    }
    // Ranged reads (rclone cat --offset/--count sends Range).
    let (key, body) = &files[4];
    let remote = format!("ep:rclone-bucket/{key}");
    let got = run(
        "rclone",
        &["cat", "--offset", "16380", "--count", "40", &remote],
        &env,
    )
    .await;
    assert_eq!(
        got.as_bytes(),
        String::from_utf8_lossy(&body[16380..16420]).as_bytes()
    );
    // Server-side copy, then check and delete.
    run(
        "rclone",
        &["copyto", &remote, "ep:rclone-bucket/copied.bin"],
        &env,
    )
    .await;
    let copied = run("rclone", &["cat", "ep:rclone-bucket/copied.bin"], &env).await;
    assert_eq!(copied.as_bytes(), String::from_utf8_lossy(body).as_bytes());
    run(
        "rclone",
        &[
            "check",
            "--size-only",
            src_arg,
            "ep:rclone-bucket",
            "--exclude",
            "copied.bin",
        ],
        &env,
    )
    .await;
    run(
        "rclone",
        &["deletefile", "ep:rclone-bucket/copied.bin"],
        &env,
    )
    .await;
    // Multipart: rclone uploads in 5 MiB parts above its (lowered) cutoff.
    let (big_path, big) = write_big(dir.path());
    run(
        "rclone",
        &[
            "copyto",
            "--s3-upload-cutoff",
            "5M",
            "--s3-chunk-size",
            "5M",
            big_path.to_str().unwrap(),
            "ep:rclone-bucket/big.bin",
        ],
        &env,
    )
    .await;
    assert_stored_multipart(&moto, "rclone-bucket", "big.bin", &big, 3).await;
    let back = dir.path().join("big.back");
    run(
        "rclone",
        &["copyto", "ep:rclone-bucket/big.bin", back.to_str().unwrap()],
        &env,
    )
    .await;
    assert!(
        std::fs::read(&back).unwrap() == big,
        "rclone multipart round trip"
    );
    // A range across the boundary of parts 1 and 2.
    let got = run(
        "rclone",
        &[
            "cat",
            "--offset",
            &((5 << 20) - 10).to_string(),
            "--count",
            "20",
            "ep:rclone-bucket/big.bin",
        ],
        &env,
    )
    .await;
    assert_eq!(
        got.as_bytes(),
        String::from_utf8_lossy(&big[(5 << 20) - 10..(5 << 20) + 10]).as_bytes()
    );
    // Server-side copy to another bucket (another key context): re-encrypted by the gateway.
    run("rclone", &["mkdir", "ep:rclone-other"], &env).await;
    run(
        "rclone",
        &["copyto", &remote, "ep:rclone-other/copied.bin"],
        &env,
    )
    .await;
    let copied = run("rclone", &["cat", "ep:rclone-other/copied.bin"], &env).await;
    assert_eq!(copied.as_bytes(), String::from_utf8_lossy(body).as_bytes());
    assert_stored_encrypted(&proxy, &moto, "rclone-other", "copied.bin", body).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3cmd_put_get_ls_cp_del() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), "").await;
    let cfg = dir.path().join("s3cfg");
    std::fs::write(
        &cfg,
        format!(
            "[default]\naccess_key = {CLIENT_KEY}\nsecret_key = {CLIENT_SECRET}\nhost_base = {addr}\nhost_bucket = {addr}\n\
             use_https = False\nsignature_v2 = False\nbucket_location = us-east-1\ncheck_ssl_certificate = False\n",
            addr = proxy.addr
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let src = dir.path().join("src");
    let files = write_files(&src);
    run("s3cmd", &["-c", c, "mb", "s3://s3cmd-bucket"], &[]).await;
    for (key, body) in &files {
        let local = src.join(key);
        let remote = format!("s3://s3cmd-bucket/{key}");
        run(
            "s3cmd",
            &["-c", c, "put", local.to_str().unwrap(), &remote],
            &[],
        )
        .await;
        let out = dir.path().join("download.bin");
        run(
            "s3cmd",
            &["-c", c, "get", "--force", &remote, out.to_str().unwrap()],
            &[],
        )
        .await;
        assert_eq!(&std::fs::read(&out).unwrap(), body, "{key}");
        assert_stored_encrypted(&proxy, &moto, "s3cmd-bucket", key, body).await;
    }
    let ls = run(
        "s3cmd",
        &["-c", c, "ls", "--recursive", "s3://s3cmd-bucket"],
        &[],
    )
    .await;
    for (key, body) in &files {
        let line = ls
            .lines()
            .find(|l| l.ends_with(&format!("s3://s3cmd-bucket/{key}")));
        let line = line.unwrap_or_else(|| panic!("{key} not in listing:\n{ls}"));
        assert!(
            line.split_whitespace().any(|w| w == body.len().to_string()),
            "{key}: {line}"
        );
    }
    run(
        "s3cmd",
        &[
            "-c",
            c,
            "cp",
            "s3://s3cmd-bucket/plain.bin",
            "s3://s3cmd-bucket/plain-copy.bin",
        ],
        &[],
    )
    .await;
    run(
        "s3cmd",
        &["-c", c, "del", "s3://s3cmd-bucket/plain-copy.bin"],
        &[],
    )
    .await;
    // Multipart: s3cmd uploads in 5 MiB parts.
    let (big_path, big) = write_big(dir.path());
    run(
        "s3cmd",
        &[
            "-c",
            c,
            "put",
            "--multipart-chunk-size-mb=5",
            big_path.to_str().unwrap(),
            "s3://s3cmd-bucket/big.bin",
        ],
        &[],
    )
    .await;
    assert_stored_multipart(&moto, "s3cmd-bucket", "big.bin", &big, 3).await;
    let back = dir.path().join("big.back");
    run(
        "s3cmd",
        &[
            "-c",
            c,
            "get",
            "--force",
            "s3://s3cmd-bucket/big.bin",
            back.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(
        std::fs::read(&back).unwrap() == big,
        "s3cmd multipart round trip"
    );
    // A copy to another bucket (another key context): re-encrypted by the gateway.
    let (key, body) = files.iter().max_by_key(|(_, b)| b.len()).expect("files");
    run("s3cmd", &["-c", c, "mb", "s3://s3cmd-other"], &[]).await;
    run(
        "s3cmd",
        &[
            "-c",
            c,
            "cp",
            &format!("s3://s3cmd-bucket/{key}"),
            "s3://s3cmd-other/copied.bin",
        ],
        &[],
    )
    .await;
    let out = dir.path().join("copied.bin");
    run(
        "s3cmd",
        &[
            "-c",
            c,
            "get",
            "--force",
            "s3://s3cmd-other/copied.bin",
            out.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(&std::fs::read(&out).unwrap(), body);
    assert_stored_encrypted(&proxy, &moto, "s3cmd-other", "copied.bin", body).await;
}

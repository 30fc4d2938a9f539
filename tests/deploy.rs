//! The Kubernetes manifests in deploy/, offline: each kustomize overlay renders
//! (`kubectl kustomize`), every object validates against the Kubernetes schema
//! (kubernetes-validate from tests/peers/venv, strict), the Prometheus Operator objects are
//! checked structurally and the PrometheusRule carries exactly the rules of
//! deploy/prometheus/envelope-proxy.rules.yaml, every envelope-proxy container is hardened and
//! probed on /healthz and /readyz (tests/deploy/check_manifests.py), and every ConfigMap's
//! config is one the proxy accepts (`envelope-proxy check-config`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn kubectl() -> PathBuf {
    let ok = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "kubectl is not installed: the manifest tests need it (`kubectl kustomize` renders the overlays)"
    );
    PathBuf::from("kubectl")
}

fn python() -> PathBuf {
    let py = repo().join("tests/peers/venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/test.sh (it installs tests/peers/requirements.txt, with kubernetes-validate)",
        py.display()
    );
    py
}

/// Render one overlay and check it; returns the checker's summary.
fn check_overlay(overlay: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(kubectl())
        .args(["kustomize"])
        .arg(repo().join("deploy").join(overlay))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/{overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = dir.path().join("rendered.yaml");
    std::fs::write(&rendered, &out.stdout).unwrap();
    let out = Command::new(python())
        .arg(repo().join("tests/deploy/check_manifests.py"))
        .arg(&rendered)
        .arg(repo().join("deploy/prometheus/envelope-proxy.rules.yaml"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/{overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let configs = summary["configs"].as_array().unwrap();
    assert!(
        !configs.is_empty(),
        "deploy/{overlay}: no ConfigMap with config.toml"
    );
    for c in configs {
        let path = c.as_str().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
            .args(["check-config", path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "deploy/{overlay}: the proxy refuses its config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    summary
}

fn objects(summary: &Value) -> Vec<String> {
    summary["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap().split('/').next().unwrap().to_string())
        .collect()
}

#[test]
fn gateway_renders_validates_and_its_config_is_accepted() {
    let summary = check_overlay("gateway");
    let kinds = objects(&summary);
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "gateway lacks a {kind}");
    }
    assert_eq!(summary["proxies"].as_array().unwrap().len(), 1);
}

#[test]
fn sidecar_renders_validates_and_its_config_is_accepted() {
    let summary = check_overlay("sidecar");
    assert!(objects(&summary).iter().any(|k| k == "Deployment"));
    assert_eq!(summary["proxies"].as_array().unwrap().len(), 1);
}

#[test]
fn demo_renders_validates_and_its_config_is_accepted() {
    let summary = check_overlay("demo");
    assert_eq!(summary["proxies"].as_array().unwrap().len(), 1);
}

/// The sidecar's app reaches the proxy over the unix socket in a volume both containers mount.
#[test]
fn sidecar_shares_the_socket_volume_with_the_app() {
    let text = std::fs::read_to_string(repo().join("deploy/sidecar/envelope-proxy.toml")).unwrap();
    assert!(text.contains("unix_socket = \"/run/envelope/proxy.sock\""));
    let deployment =
        std::fs::read_to_string(repo().join("deploy/sidecar/deployment.yaml")).unwrap();
    let mounts = deployment
        .matches("{name: envelope-socket, mountPath: /run/envelope}")
        .count();
    assert_eq!(mounts, 2, "app and proxy both mount /run/envelope");
}

/// The checker itself refuses what it should: a PrometheusRule that drifted from the rules
/// file, a proxy container that may write its root filesystem, and a NetworkPolicy whose
/// client selector needs the proxy's own labels (kustomize's label transformer did that).
#[test]
fn the_checker_refuses_drift_a_writable_root_and_a_self_selecting_policy() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(kubectl())
        .args(["kustomize"])
        .arg(repo().join("deploy/gateway"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let rendered = String::from_utf8(out.stdout).unwrap();
    for (what, bad, needle) in [
        (
            "drift",
            rendered.replacen("severity: page", "severity: info", 1),
            "differ from",
        ),
        (
            "writable root",
            rendered.replacen(
                "readOnlyRootFilesystem: true",
                "readOnlyRootFilesystem: false",
                1,
            ),
            "readOnlyRootFilesystem",
        ),
        (
            "a client selector carrying the proxy's labels",
            rendered.replacen(
                "envelope-proxy/client: \"true\"",
                "app.kubernetes.io/instance: envelope-proxy-gateway",
                1,
            ),
            "own labels",
        ),
    ] {
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, bad).unwrap();
        let out = Command::new(python())
            .arg(repo().join("tests/deploy/check_manifests.py"))
            .arg(&path)
            .arg(repo().join("deploy/prometheus/envelope-proxy.rules.yaml"))
            .arg(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} passed");
        assert!(stderr.contains(needle), "{what}: {stderr}");
    }
}

/// Every metric an alert rule reads is one the proxy exports (a renamed metric would leave an
/// alert that never fires): names from the rules file against the `# TYPE` lines of
/// `Metrics::encode` (counters are sampled as NAME_total, histograms as NAME_bucket/_sum/_count).
#[test]
fn alert_rules_read_metrics_the_proxy_exports() {
    // A labelled family is exported once it has a child: record one sample of each.
    let metrics = envelope_proxy::metrics::Metrics::new();
    metrics.denial("r", "k", "no-allow");
    metrics.request("r", 200, 0.001);
    metrics.record_cache(true);
    metrics.record_cache(false);
    metrics.backend_call("b", "unwrap");
    metrics.backend_error("b", "unwrap", "unavailable");
    metrics.keyring_rollback_refused();
    metrics.fields("r", 1, 1);
    metrics.plaintext_read("r");
    metrics.unbound_read("r");
    metrics.decrypt_failure("r");
    metrics.key_state_refused("k", "pending_deletion");
    metrics.circuit_state("b", 1);
    metrics.request_shed("data");
    let exported: std::collections::HashSet<String> = metrics
        .encode()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(exported.contains("envelope_proxy_requests"), "{exported:?}");
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/envelope-proxy.rules.yaml"))
        .unwrap();
    let mut used = Vec::new();
    for (i, _) in rules.match_indices("envelope_proxy_") {
        let name: String = rules[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        used.push(name);
    }
    assert!(!used.is_empty());
    for name in used {
        let base = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            exported.contains(base),
            "the rules read {name}, which the proxy does not export (exported: {exported:?})"
        );
    }
}

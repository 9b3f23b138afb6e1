#!/usr/bin/env python3
"""Cross-object consistency checks of the rendered manifests, which a schema
cannot see. Usage: check.py RENDERED.yaml [...]; exits 1 listing every problem.

- the StatefulSet's selector matches its pod labels; its serviceName is a
  headless Service that publishes not-ready addresses
- every Service, the PDB and the NetworkPolicy select the pods; every named
  port they use exists on the container
- every probe's port exists on the container
- terminationGracePeriodSeconds > preStop sleep + TICKSHARD_DRAIN_MS + 5 s margin
  (the WebSocket lingering close, at most 2 s, and the final flush)
- replicas == TICKSHARD_SHARDS (the manifests describe the cluster at rest; the
  running count changes with `tickshard admin rebalance`, README "Scaling")
- TICKSHARD_PEERS is a template on the headless Service with the gRPC port
- the pod runs as non-root with a read-only root filesystem, without a
  service account token
- peers are https:// exactly when peer TLS is configured; the prod overlay
  runs TLS, peer mTLS and token verification without anonymous publishing
"""
import re
import sys

import yaml


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check(docs, name):
    problems = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    sts_list = by_kind.get("StatefulSet", [])
    if len(sts_list) != 1:
        return [f"{name}: expected one StatefulSet, found {len(sts_list)}"]
    sts = sts_list[0]
    spec = sts["spec"]
    tmpl = spec["template"]
    labels = tmpl["metadata"].get("labels", {})
    pod = tmpl["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    env = {e["name"]: e.get("value") for e in c.get("env", [])}

    def port_ok(p):
        return p in ports if isinstance(p, str) else p in ports.values()

    if not matches(spec["selector"]["matchLabels"], labels):
        problems.append("StatefulSet selector does not match its pod labels")
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    headless = services.get(spec.get("serviceName"))
    if headless is None:
        problems.append(f"serviceName {spec.get('serviceName')!r} is not a Service here")
    else:
        if headless["spec"].get("clusterIP") != "None":
            problems.append("serviceName is not a headless Service (clusterIP: None)")
        if not headless["spec"].get("publishNotReadyAddresses"):
            problems.append("the headless Service must publish not-ready addresses (peers find restarting shards)")
    for s in services.values():
        n = s["metadata"]["name"]
        if not matches(s["spec"].get("selector", {}), labels):
            problems.append(f"Service {n} does not select the pods")
        for p in s["spec"]["ports"]:
            if not port_ok(p.get("targetPort", p["port"])):
                problems.append(f"Service {n} targets port {p.get('targetPort')!r}, not on the container")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not matches(pdb["spec"]["selector"]["matchLabels"], labels):
            problems.append("PodDisruptionBudget does not select the pods")
    for np in by_kind.get("NetworkPolicy", []):
        if not matches(np["spec"]["podSelector"]["matchLabels"], labels):
            problems.append("NetworkPolicy does not select the pods")
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                if not port_ok(p["port"]):
                    problems.append(f"NetworkPolicy allows port {p['port']!r}, not on the container")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        pr = c.get(probe)
        if pr is None:
            problems.append(f"no {probe}")
        elif not port_ok(pr["httpGet"]["port"]):
            problems.append(f"{probe} port {pr['httpGet']['port']!r} is not on the container")
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        problems.append("readinessProbe must be /readyz")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        problems.append("livenessProbe must be /healthz (never depends on peers)")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    drain = int(env.get("TICKSHARD_DRAIN_MS") or 5000) / 1000
    # (the server's own deadline is the drain + 15 s: closes, final commit, flush)
    if grace <= pre + drain + 15:
        problems.append(
            f"terminationGracePeriodSeconds {grace} <= preStop {pre} + drain {drain} + the server's 15 s past the drain"
        )
    shards = env.get("TICKSHARD_SHARDS")
    if str(spec.get("replicas")) != str(shards):
        problems.append(f"replicas {spec.get('replicas')} != TICKSHARD_SHARDS {shards}")
    peers = env.get("TICKSHARD_PEERS") or ""
    svc = spec.get("serviceName")
    on_headless = f".{svc}:" in peers or f".{svc}." in peers
    if "{}" not in peers or not on_headless or f":{ports.get('peer')}" not in peers:
        problems.append(f"TICKSHARD_PEERS {peers!r} must be a {{}} template on the headless Service and the peer port")
    if ports.get("peer") == ports.get("grpc"):
        problems.append("the peer port (the internal Cluster service) must not be the public gRPC port")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken must be false (tickshard never calls the API server)")
    tls_peer = all(env.get(k) for k in ("TICKSHARD_PEER_TLS_CERT", "TICKSHARD_PEER_TLS_KEY", "TICKSHARD_PEER_TLS_CA"))
    if tls_peer != peers.startswith("https://"):
        problems.append("TICKSHARD_PEERS must be https:// exactly when peer TLS is configured")
    host = peers.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    if tls_peer and len(host.split(".")) < 4:
        # *.<rest> matches only if <rest> has two labels or more (rustls, NSS)
        problems.append(
            f"TICKSHARD_PEERS host {host!r}: with peer TLS, dial the full name "
            "(tickshard-{}.<headless>.<namespace>.svc.cluster.local) that a wildcard certificate can match"
        )
    names = [e["name"] for e in c.get("env", [])]
    for e in c.get("env", []):
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value") or ""):
            if ref not in names[: names.index(e["name"])]:
                problems.append(f"{e['name']} names $({ref}), which is not defined before it")
    if env.get("TICKSHARD_TLS_CERT"):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if c.get(probe, {}).get("httpGet", {}).get("scheme") != "HTTPS":
                problems.append(f"{probe} must use scheme HTTPS: the HTTP port serves TLS only")
        if tmpl["metadata"].get("annotations", {}).get("prometheus.io/scheme") != "https":
            problems.append("prometheus.io/scheme must be https: the HTTP port serves TLS only")
    if "prod" in name:
        if not tls_peer or not env.get("TICKSHARD_TLS_CERT"):
            problems.append("prod must run TLS for clients and mutual TLS between pods")
        if env.get("TICKSHARD_ANONYMOUS") not in ("none", "subscribe") or not (
            env.get("TICKSHARD_AUTH_JWKS") or env.get("TICKSHARD_AUTH_HS256_SECRET_FILE")
        ):
            problems.append("prod must verify tokens and not let anonymous callers publish")
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"] for v in pod.get("volumes", [])}
        if not mounts - {"data"} <= volumes:
            problems.append(f"volumeMounts {sorted(mounts - volumes - {'data'})} have no volume")
    psc = pod.get("securityContext", {})
    csc = c.get("securityContext", {})
    if not psc.get("runAsNonRoot") or not csc.get("readOnlyRootFilesystem"):
        problems.append("the pod must run as non-root with a read-only root filesystem")
    if csc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("the container must drop ALL capabilities")
    return [f"{name}: {p}" for p in problems]


def main():
    problems = []
    for path in sys.argv[1:]:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        problems += check(docs, path)
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"consistent: {', '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()

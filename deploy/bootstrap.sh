#!/usr/bin/env bash
# Bootstrap a Jetson (JetPack 5.1 or 6.x) for edge-tl: run it ON the device, as the user `edge-tl deploy` will
# log in as (it calls sudo for the system parts). See docs/device-setup.md.
#
#   ./bootstrap.sh [--from WHEEL_OR_SOURCE_DIR] [--prefix /opt/edge-tl] [--with-service] [--ort-index URL]
#                  [--python python3.10] [--trust-key edge-tl.pub] [--dry-run] [--nv-tegra-release FILE]
#
# What it installs:
#   - TensorRT's Python bindings from the JetPack apt packages (python3-libnvinfer; trtexec from libnvinfer-bin).
#     They are built for the system Python only, so the venv is created with --system-site-packages.
#   - ONNX Runtime GPU from the Jetson wheels: JetPack 6 from the Jetson AI Lab pip index (by JetPack/CUDA:
#     https://pypi.jetson-ai-lab.io/jp6/cu126 for 6.1/6.2, .../jp6/cu122 for 6.0); JetPack 5 wheels are listed
#     on the Jetson Zoo (https://elinux.org/Jetson_Zoo#ONNX_Runtime), per Python version.
#   - jetson-stats (the jtop service, system-wide, as its docs say) and its client library in the venv.
#   - edge-tl itself ([jetson,serve] extras) into <prefix>/venv, linked as /usr/local/bin/edge-tl so that
#     non-interactive SSH sessions (edge-tl deploy) find it on PATH.
#   - with --with-service: the edge-tl-serve systemd unit (deploy/systemd/), its system user, and a sudoers rule
#     that lets the deploy user run exactly `systemctl restart edge-tl-serve` without a password.
#   - with --trust-key PUB: the workstation's public signing key (~/.config/edge-tl/signing/edge-tl.pub, made by
#     its first `edge-tl build`) in /etc/edge-tl/trusted-keys (root's): the device installs and serves only bundles
#     a trusted key signed, and refuses every bundle until one is trusted (docs/signing.md).
#
# JetPack 5 (L4T R35, Ubuntu 20.04) ships Python 3.8; edge-tl needs Python >= 3.10. Install one beside the
# system Python (e.g. sudo add-apt-repository ppa:deadsnakes/ppa && sudo apt install python3.10 python3.10-venv
# python3.10-dev) and pass --python python3.10. TensorRT's Python bindings on JetPack 5 exist for the system
# Python 3.8 only, so on JetPack 5 engines are built through trtexec (`edge-tl engine build --via trtexec`,
# `edge-tl deploy --build-via trtexec`) and the parity gate and inference run on ONNX Runtime.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="$(cd "$HERE/.." && pwd)"
PREFIX="/opt/edge-tl"
WITH_SERVICE=0
ORT_INDEX=""
PYTHON=""
PKGS_PY=()
TRUST_KEY=""
DRY_RUN=0
RELEASE_FILE="/etc/nv_tegra_release"
DEPLOY_USER="${SUDO_USER:-$(id -un)}"

usage() { sed -n '2,8p' "$0"; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --from) SRC="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --with-service) WITH_SERVICE=1; shift ;;
    --ort-index) ORT_INDEX="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --trust-key) TRUST_KEY="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --nv-tegra-release) RELEASE_FILE="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "bootstrap.sh: unknown option $1" >&2; usage 2 ;;
  esac
done

say() { printf '\n== %s\n' "$*"; }
run() {  # print, then run (unless --dry-run)
  printf '+ %s\n' "$*"
  if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ -n "$TRUST_KEY" ]; then  # checked before anything is installed
  if [ ! -f "$TRUST_KEY" ] || ! grep -q '^edge-tl-ed25519 ' "$TRUST_KEY"; then
    echo "bootstrap.sh: --trust-key $TRUST_KEY is not an edge-tl public key (copy the .pub beside your signing key," \
         "~/.config/edge-tl/signing/edge-tl.pub, to this device)" >&2
    exit 2
  fi
  TRUST_KEY="$(cd "$(dirname "$TRUST_KEY")" && pwd)/$(basename "$TRUST_KEY")"
fi

# -- which JetPack -----------------------------------------------------------------------------------------
if [ ! -r "$RELEASE_FILE" ]; then
  echo "bootstrap.sh: $RELEASE_FILE not found: this is not a Jetson (flash JetPack first, docs/device-setup.md)" >&2
  exit 2
fi
LINE="$(head -n 1 "$RELEASE_FILE")"
L4T_MAJOR="$(sed -n 's/^# R\([0-9]*\) (release).*/\1/p' <<<"$LINE")"
L4T_REV="$(sed -n 's/.*REVISION: \([0-9.]*\).*/\1/p' <<<"$LINE")"
case "$L4T_MAJOR" in
  36) JETPACK=6 ;;
  35) JETPACK=5 ;;
  *) echo "bootstrap.sh: L4T R$L4T_MAJOR is not supported (JetPack 5.1 = R35, JetPack 6.x = R36)" >&2; exit 2 ;;
esac
say "L4T R$L4T_MAJOR.$L4T_REV: JetPack $JETPACK"

if [ -z "$PYTHON" ]; then
  if [ "$JETPACK" -eq 6 ]; then PYTHON=python3; else PYTHON=python3.10; fi
fi
if [ "$DRY_RUN" -eq 0 ] && ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "bootstrap.sh: $PYTHON is missing or older than 3.10 (edge-tl needs >= 3.10)." >&2
  [ "$JETPACK" -eq 5 ] && echo "  JetPack 5: sudo add-apt-repository ppa:deadsnakes/ppa && sudo apt install" \
    "python3.10 python3.10-venv python3.10-dev, then re-run with --python python3.10" >&2
  exit 2
fi

if [ -z "$ORT_INDEX" ] && [ "$JETPACK" -eq 6 ]; then
  # R36.2 = JetPack 6.0 DP and R36.3 = JetPack 6.0 both ship CUDA 12.2; R36.4 (JetPack 6.1 / 6.2) ships 12.6.
  case "$L4T_REV" in
    0.*|1.*|2.*|3.*) ORT_INDEX="https://pypi.jetson-ai-lab.io/jp6/cu122" ;;  # JetPack 6.0 (DP), CUDA 12.2
    *)               ORT_INDEX="https://pypi.jetson-ai-lab.io/jp6/cu126" ;;  # JetPack 6.1 / 6.2, CUDA 12.6
  esac
fi

# -- system packages (JetPack's apt repository) ----------------------------------------------------------------
say "system packages: TensorRT (Python bindings, trtexec), Python venv and headers, C++ compiler, rsync"
run $SUDO apt-get update
# pycuda (the [jetson] extra) compiles from source: it needs a C++ compiler and the headers of the venv's Python.
PY_DEV="$(basename "$PYTHON")-dev"; [ "$PY_DEV" = "python3-dev" ] || PKGS_PY=("$PY_DEV")
PKGS=(python3-pip python3-venv rsync libnvinfer-bin build-essential python3-dev "${PKGS_PY[@]}")
if [ "$JETPACK" -eq 6 ]; then PKGS+=(python3-libnvinfer python3-libnvinfer-dev); fi
run $SUDO apt-get install -y "${PKGS[@]}"

say "jetson-stats (jtop service, system-wide)"
run $SUDO pip3 install -U jetson-stats

# -- the deploy root and the venv ----------------------------------------------------------------------------------
say "deploy root $PREFIX (owned by $DEPLOY_USER) and venv $PREFIX/venv"
run $SUDO install -d -o "$DEPLOY_USER" -m 0755 "$PREFIX"
VENV_FLAGS=()
[ "$JETPACK" -eq 6 ] && VENV_FLAGS=(--system-site-packages)  # TensorRT's bindings live in the system Python
run "$PYTHON" -m venv "${VENV_FLAGS[@]}" "$PREFIX/venv"
PIP="$PREFIX/venv/bin/pip"
run "$PIP" install -U pip wheel

say "ONNX Runtime GPU (Jetson wheels)"
if [ -n "$ORT_INDEX" ]; then
  run "$PIP" install onnxruntime-gpu --index-url "$ORT_INDEX"
else
  echo "JetPack 5: no default index. Pick the onnxruntime-gpu wheel for JetPack 5 and your Python from"
  echo "https://elinux.org/Jetson_Zoo#ONNX_Runtime and install it with $PIP install <wheel>; until then the"
  echo "CPU package from PyPI is installed."
  run "$PIP" install onnxruntime
fi

say "edge-tl from $SRC"
# pycuda (in the jetson extra) compiles against CUDA: nvcc must be on PATH
export PATH="/usr/local/cuda/bin:$PATH" CUDA_ROOT=/usr/local/cuda
if [ -n "$ORT_INDEX" ]; then
  # the jetson extra and serve; not [gpu]: onnxruntime-gpu is already installed from the Jetson index
  run "$PIP" install "${SRC}[jetson,serve]"
else
  run "$PIP" install "${SRC}[serve]" jetson-stats
fi
run $SUDO ln -sf "$PREFIX/venv/bin/edge-tl" /usr/local/bin/edge-tl

# -- the field service -------------------------------------------------------------------------------------------
if [ "$WITH_SERVICE" -eq 1 ]; then
  say "edge-tl-serve systemd unit"
  UNIT="$HERE/systemd/edge-tl-serve.service"
  if [ ! -f "$UNIT" ]; then echo "bootstrap.sh: $UNIT not found" >&2; exit 2; fi
  if ! id edge-tl >/dev/null 2>&1; then
    run $SUDO useradd --system --no-create-home --groups video,render edge-tl
  fi
  run $SUDO install -d -o "$DEPLOY_USER" -g edge-tl -m 2775 "$PREFIX/versions"
  run $SUDO install -m 0644 "$UNIT" /etc/systemd/system/edge-tl-serve.service
  # 0755: the deploy user reads the trusted keys below it; the token file's own mode (0640) keeps it secret
  run $SUDO install -d -m 0755 -g edge-tl /etc/edge-tl
  RULE="$DEPLOY_USER ALL=(root) NOPASSWD: /usr/bin/systemctl restart edge-tl-serve, /bin/systemctl restart edge-tl-serve"
  printf '+ write /etc/sudoers.d/edge-tl-deploy: %s\n' "$RULE"
  if [ "$DRY_RUN" -eq 0 ]; then
    printf '%s\n' "$RULE" | $SUDO tee /etc/sudoers.d/edge-tl-deploy.tmp >/dev/null
    $SUDO visudo -cf /etc/sudoers.d/edge-tl-deploy.tmp
    $SUDO chmod 0440 /etc/sudoers.d/edge-tl-deploy.tmp
    $SUDO mv /etc/sudoers.d/edge-tl-deploy.tmp /etc/sudoers.d/edge-tl-deploy
  fi
  run $SUDO systemctl daemon-reload
  run $SUDO systemctl enable edge-tl-serve
  echo "The service starts once a model is deployed: edge-tl deploy BUNDLE --to $DEPLOY_USER@<this device>"
fi

if [ -n "$TRUST_KEY" ]; then
  say "trusted signing key $TRUST_KEY (/etc/edge-tl/trusted-keys, root's)"
  run $SUDO install -d -m 0755 /etc/edge-tl/trusted-keys
  run $SUDO "$PREFIX/venv/bin/edge-tl" keys trust "$TRUST_KEY" --dir /etc/edge-tl/trusted-keys
else
  echo "No signing key trusted yet: every bundle is refused until one is (--trust-key edge-tl.pub, or"
  echo "sudo edge-tl keys trust edge-tl.pub; docs/signing.md)."
fi

say "done. Check the device:"
echo "  edge-tl doctor            # JetPack, TensorRT, ONNX Runtime providers, power mode, blockers"
echo "  sudo nvpmodel -q          # power mode (docs/device-setup.md)"

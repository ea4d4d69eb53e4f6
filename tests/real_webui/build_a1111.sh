#!/usr/bin/env bash
# Build a real AUTOMATIC1111 1.10.1 install, offline and CPU-only, for the extension's tests.
#
#   tests/real_webui/build_a1111.sh [DEST]        (DEST defaults to /work/webuis/a1111)
#
# Source comes from bare git mirrors made by the `fetch` tool (env MIRRORS, default /work/.mirror).
# Idempotent: each step leaves a stamp under DEST/.build and is skipped when its stamp is there
# (FORCE=1 redoes everything; remove DEST/.build/<step> to redo one step).
# Afterwards: `source DEST/env.sh` and launch (see tests/real_webui/NOTES-a1111.md).
set -euo pipefail

DEST=${1:-/work/webuis/a1111}
MIRRORS=${MIRRORS:-/work/.mirror}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")

# name in repositories/ | mirror dir | commit | top-level path to leave out (blobs missing from the snapshots)
WEBUI_MIRROR=kklouzal+stable-diffusion-webui
WEBUI_COMMIT=82a973c04367123ae98bd9abdf80d9eda9b910e2 # v1.10.1
REPOS=(
  "stable-diffusion-stability-ai|Stability-AI+stablediffusion|cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf|assets"
  "generative-models|Stability-AI+generative-models|45c443b316737a4ab6e40413d7794a7f5657c19f|assets"
  "k-diffusion|crowsonkb+k-diffusion|ab527a9a6d347f364e3d185ba6d714e22d80cb3c|"
  "BLIP|salesforce+BLIP|48211a1594f1321b00f14c9f7a5b4813144b2fb9|BLIP.gif"
  "stable-diffusion-webui-assets|AUTOMATIC1111+stable-diffusion-webui-assets|6f7db241d2f8ba7457bac5ca9753331f0c266917|"
)

say() { echo "[build_a1111] $*" >&2; }
die() { echo "[build_a1111] ERROR: $*" >&2; exit 1; }
STAMPS=$DEST/.build
done_() { [[ -z "${FORCE:-}" && -f "$STAMPS/$1" ]]; }
stamp() { mkdir -p "$STAMPS"; date -u +%FT%TZ >"$STAMPS/$1"; }
T0=$SECONDS

# --- 0. mirrors -------------------------------------------------------------------------------------
mirror_git() { # the git dir of a mirror (bare "repo", or "repo/.git" for snapshots with a work tree)
  local d=$MIRRORS/$1/repo
  [[ -d $d/.git ]] && d=$d/.git
  echo "$d"
}
missing=()
for m in "$WEBUI_MIRROR" "${REPOS[@]}"; do
  IFS='|' read -r _ mir commit _ <<<"$m"
  [[ $m == "$WEBUI_MIRROR" ]] && mir=$m commit=$WEBUI_COMMIT
  g=$(mirror_git "$mir")
  git --git-dir="$g" cat-file -e "$commit^{commit}" 2>/dev/null || missing+=("github:${mir/+//}")
done
((${#missing[@]} == 0)) ||
  die "mirror(s) missing under $MIRRORS (or lacking the pinned commit): call the fetch tool with ${missing[*]}"

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd) # env.sh and the stamps hold absolute paths
STAMPS=$DEST/.build

extract() { # git dir, commit, destination, [excluded top-level path]
  # git 2.39 prints "error: invalid object ..." for an excluded missing blob yet writes the rest and exits 0,
  # so its messages are kept aside and the files written are counted against the commit's tree instead.
  local g=$1 commit=$2 into=$3 excl=${4:-} log want got
  log=$(mktemp)
  mkdir -p "$into"
  git --git-dir="$g" archive "$commit" -- . ${excl:+":!$excl"} 2>"$log" | tar -x -C "$into" || true
  want=$(git --git-dir="$g" ls-tree -r "$commit" | awk -F'\t' -v x="$excl" \
    '$1 !~ / commit / && (x == "" || ($2 != x && index($2, x "/") != 1))' | wc -l)
  got=$(find "$into" ! -type d | wc -l)
  if ((got < want)); then
    cat "$log" >&2
    rm -f "$log"
    die "$into: $got files written, $want expected (a blob missing from the mirror $g?)"
  fi
  rm -f "$log"
}

# --- 1. source --------------------------------------------------------------------------------------
if ! done_ source; then
  say "extracting stable-diffusion-webui ${WEBUI_COMMIT:0:7} and repositories/ into $DEST"
  mkdir -p "$DEST"
  git --git-dir="$(mirror_git "$WEBUI_MIRROR")" archive "$WEBUI_COMMIT" | tar -x -C "$DEST"
  for r in "${REPOS[@]}"; do
    IFS='|' read -r name mir commit excl <<<"$r"
    rm -rf "$DEST/repositories/$name"
    extract "$(mirror_git "$mir")" "$commit" "$DEST/repositories/$name" "$excl"
  done
  stamp source
fi
if ! done_ git; then
  # The WebUI runs `git rev-parse HEAD` and `git describe --tags` at start. Make DEST a work tree whose HEAD is
  # the real v1.10.1 commit, borrowing the mirror's objects (alternates): no commit made, nothing copied.
  [[ -d $DEST/.git ]] || git init -q "$DEST"
  g=$(mirror_git "$WEBUI_MIRROR")
  echo "$(cd "$g" && pwd)/objects" >"$DEST/.git/objects/info/alternates"
  git -C "$DEST" update-ref HEAD "$WEBUI_COMMIT"
  tag=$(git --git-dir="$g" rev-parse -q --verify refs/tags/v1.10.1 || true)
  [[ -n $tag ]] && git -C "$DEST" update-ref refs/tags/v1.10.1 "$tag"
  git -C "$DEST" read-tree HEAD
  for p in /venv/ /hf_home/ /env.sh /.build/ "/models/Stable-diffusion/tiny-sd1.*"; do
    grep -qxF "$p" "$DEST/.git/info/exclude" 2>/dev/null || echo "$p" >>"$DEST/.git/info/exclude"
  done
  stamp git
fi

# --- 2. venv ----------------------------------------------------------------------------------------
VPY=$DEST/venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_() { # the venv's pip, without the warnings about this machine's absent file:// index folders
  "$VPY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if ! done_ venv; then
  [[ -x $VPY ]] || { say "creating venv with $($PYTHON --version)"; "$PYTHON" -m venv "$DEST/venv"; }
  printf '%s\n' "${TORCH_PINS[@]}" >"$DEST/venv/constraints-torch.txt"
  say "installing ${TORCH_PINS[*]}"
  pip_ install -q "${TORCH_PINS[@]}"
  # torch 2.14.1 refuses setuptools 69.5.1; pytorch_lightning 1.9.4 and clip still import pkg_resources.
  sed -E 's/^setuptools==69\.5\.1.*/setuptools>=77.0.3,<81/' "$DEST/requirements_versions.txt" \
    >"$DEST/venv/requirements-build.txt"
  say "installing requirements_versions.txt (constrained to the torch pins)"
  pip_ install -q -r "$DEST/venv/requirements-build.txt" -c "$DEST/venv/constraints-torch.txt"
  say "installing openai-clip (k-diffusion imports clip at start)"
  pip_ install -q openai-clip -c "$DEST/venv/constraints-torch.txt"
  "$VPY" - <<'EOF'
import torch, torchvision, transformers, gradio, clip, open_clip, pytorch_lightning  # noqa: F401
print("[build_a1111] venv ok: torch", torch.__version__, "gradio", gradio.__version__,
      "transformers", transformers.__version__)
EOF
  stamp venv
fi

# --- 3. env.sh --------------------------------------------------------------------------------------
cat >"$DEST/env.sh" <<EOF
# source this before launching the WebUI in $DEST
export HF_HOME="$DEST/hf_home"
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export DO_NOT_TRACK=1
export GRADIO_ANALYTICS_ENABLED=False
export OMP_NUM_THREADS=\${OMP_NUM_THREADS:-1}
export MKL_NUM_THREADS=\${MKL_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1
export A1111_DIR="$DEST"
export A1111_PYTHON="$DEST/venv/bin/python"
EOF
# shellcheck disable=SC1091
source "$DEST/env.sh"

# --- 4. tiny SD1 checkpoint + fake Hugging Face cache for openai/clip-vit-large-patch14 -------------
CKPT=$DEST/models/Stable-diffusion/tiny-sd1.safetensors
if ! done_ checkpoint || [[ ! -f $CKPT || ! -f ${CKPT%.safetensors}.yaml ]]; then
  say "building the tiny SD1 checkpoint and the HF cache"
  (cd "$DEST" && PYTHONPATH="$REPO_ROOT" "$VPY" "$HERE/make_a1111_checkpoint.py" "$CKPT" \
    --webui "$DEST" --hf-home "$HF_HOME")
  stamp checkpoint
fi

say "done in $((SECONDS - T0)) s: $DEST (source $DEST/env.sh before launching)"

#!/usr/bin/env bash
# Build a real, offline, CPU-only Stable Diffusion WebUI Forge install for tests.
#
#   tests/real_webui/build_forge.sh [DEST]        (DEST defaults to /work/webuis/forge)
#
# Forge = lllyasviel/stable-diffusion-webui-forge dfdcbab6 (2.0.1v1.10.1, gradio 4.40), with its
# repositories/ at the commits its modules/launch_utils.py names. Sources come from bare git mirrors
# under $MIRRORS (default /work/.mirror/<owner>+<name>/repo), as the session tool `fetch` leaves them.
# Idempotent: each finished step leaves a stamp in DEST/.build/ and is skipped on the next run.
# Env: MIRRORS, PYTHON (default python3, 3.10/3.11), FORGE_CKPT_DTYPE (fp16|fp32, default fp16), FORCE=1 (redo all).
set -euo pipefail

DEST=${1:-/work/webuis/forge}
MIRRORS=${MIRRORS:-/work/.mirror}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

FORGE_SHORT=dfdcbab6 # full hash resolved from the mirror below
HFGUESS_COMMIT=84826248b49bb7ca754c73293299c4d4e23a548d
BLIP_COMMIT=48211a1594f1321b00f14c9f7a5b4813144b2fb9
ASSETS_COMMIT=6f7db241d2f8ba7457bac5ca9753331f0c266917
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")

log() { echo "[build_forge] $*" >&2; }
mirror() { echo "$MIRRORS/${1/\//+}/repo"; }

# ---- 0. mirrors present? ----------------------------------------------------------------------
missing=()
for spec in "lllyasviel/stable-diffusion-webui-forge:$FORGE_SHORT" "lllyasviel/huggingface_guess:$HFGUESS_COMMIT" \
  "salesforce/BLIP:$BLIP_COMMIT" "AUTOMATIC1111/stable-diffusion-webui-assets:$ASSETS_COMMIT"; do
  repo=${spec%%:*} commit=${spec#*:}
  if ! git --git-dir="$(mirror "$repo")" cat-file -e "$commit^{commit}" 2>/dev/null; then
    missing+=("github:$repo")
  fi
done
if ((${#missing[@]})); then
  echo "build_forge.sh: missing git mirror(s) under $MIRRORS; fetch these sources first: ${missing[*]}" >&2
  exit 1
fi
FORGE_COMMIT=$(git --git-dir="$(mirror lllyasviel/stable-diffusion-webui-forge)" rev-parse "$FORGE_SHORT^{commit}")

mkdir -p "$DEST/.build"
DEST=$(cd "$DEST" && pwd)
STAMPS=$DEST/.build
if [[ ${FORCE:-0} == 1 ]]; then # redo every step (the venv is reused, pip then only checks it)
  rm -f "$STAMPS"/src.* "$STAMPS"/venv.* "$DEST/models/Stable-diffusion/tiny-sd1.safetensors"
fi

# extract MIRROR COMMIT DIR [EXCLUDED_PATH...]: git archive; if a blob is missing from the snapshot,
# fall back to writing blobs one by one, skipping the missing ones.
extract() {
  local gd=$1 commit=$2 dir=$3
  shift 3
  local specs=(-- .)
  for x in "$@"; do specs+=(":!$x"); done
  mkdir -p "$dir"
  local err
  err=$(mktemp)
  # (git archive may print "error: invalid object ... for 'BLIP.gif'" for an excluded missing blob, yet succeed)
  if git --git-dir="$gd" archive "$commit" "${specs[@]}" 2>"$err" | tar -x -C "$dir"; then
    rm -f "$err"
    return 0
  fi
  cat "$err" >&2
  rm -f "$err"
  log "git archive failed for $gd; extracting blob by blob"
  git --git-dir="$gd" ls-tree -r "$commit" "${specs[@]:1}" | while read -r mode type sha path; do
    [[ $type == blob ]] || continue
    if ! git --git-dir="$gd" cat-file -e "$sha" 2>/dev/null; then
      log "skipping missing blob: $path"
      continue
    fi
    mkdir -p "$dir/$(dirname "$path")"
    if [[ $mode == 120000 ]]; then
      ln -sfn "$(git --git-dir="$gd" cat-file blob "$sha")" "$dir/$path"
    else
      git --git-dir="$gd" cat-file blob "$sha" >"$dir/$path"
      [[ $mode != 100755 ]] || chmod +x "$dir/$path"
    fi
  done
}

t0=$SECONDS

# ---- 1. sources ------------------------------------------------------------------------------
if [[ ! -f $STAMPS/src.$FORGE_COMMIT ]]; then
  log "extracting Forge $FORGE_SHORT and repositories/"
  extract "$(mirror lllyasviel/stable-diffusion-webui-forge)" "$FORGE_COMMIT" "$DEST"
  rm -rf "$DEST/repositories"
  extract "$(mirror AUTOMATIC1111/stable-diffusion-webui-assets)" "$ASSETS_COMMIT" "$DEST/repositories/stable-diffusion-webui-assets"
  extract "$(mirror lllyasviel/huggingface_guess)" "$HFGUESS_COMMIT" "$DEST/repositories/huggingface_guess"
  extract "$(mirror salesforce/BLIP)" "$BLIP_COMMIT" "$DEST/repositories/BLIP" BLIP.gif
  # A git repository avoids "not a git repository" noise at start. HEAD = the real commit (a depth-1 fetch
  # from the mirror, ~8 MB), so Forge's "Commit hash:" is right and `git rev-parse HEAD` does not fail.
  if [[ ! -d $DEST/.git ]]; then
    git -C "$DEST" init -q
    printf '%s\n' venv/ .build/ models/ outputs/ extensions/ repositories/ config.json ui-config.json \
      cache.json params.txt styles.csv tmp/ log/ env.sh >>"$DEST/.git/info/exclude"
  fi
  if git -C "$DEST" fetch -q --depth 1 "file://$(mirror lllyasviel/stable-diffusion-webui-forge)" "$FORGE_COMMIT" 2>/dev/null; then
    git -C "$DEST" update-ref HEAD FETCH_HEAD
    git -C "$DEST" read-tree HEAD
  else
    log "note: could not give $DEST/.git a HEAD (Forge will print 'fatal: ambiguous argument HEAD' at start)"
  fi
  touch "$STAMPS/src.$FORGE_COMMIT"
fi

# ---- 2. venv -----------------------------------------------------------------------------------
VPY=$DEST/venv/bin/python
REQ_HASH=$( (cat "$DEST/requirements_versions.txt"; echo "${TORCH_PINS[*]} joblib") | sha1sum | cut -c1-12)
if [[ ! -f $STAMPS/venv.$REQ_HASH ]]; then
  [[ -x $VPY ]] || "$PYTHON" -m venv "$DEST/venv"
  log "venv: $("$VPY" --version)"
  printf '%s\n' "${TORCH_PINS[@]}" >"$STAMPS/constraints.txt"
  # torch 2.14.1 needs setuptools >= 77; pytorch_lightning 1.9.4 and clip still import pkg_resources (< 81).
  sed -E 's/^setuptools==69\.5\.1.*/setuptools>=77.0.3,<81/' "$DEST/requirements_versions.txt" >"$STAMPS/requirements.txt"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "${TORCH_PINS[@]}"
  "$VPY" -m pip install -q -r "$STAMPS/requirements.txt" -c "$STAMPS/constraints.txt"
  # joblib: extensions-builtin/soft-inpainting imports it at start.
  "$VPY" -m pip install -q joblib -c "$STAMPS/constraints.txt"
  "$VPY" -c 'import torch, torchvision, gradio, transformers, diffusers, joblib; print("torch", torch.__version__, "gradio", gradio.__version__)'
  touch "$STAMPS/venv.$REQ_HASH"
fi

# ---- 3. env.sh -------------------------------------------------------------------------------
cat >"$DEST/env.sh" <<EOF
# source me before launching Forge at $DEST
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export DO_NOT_TRACK=1
export GRADIO_ANALYTICS_ENABLED=False
export OMP_NUM_THREADS=1
export MKL_NUM_THREADS=1
export TOKENIZERS_PARALLELISM=false
export PYTHONDONTWRITEBYTECODE=1
export FORGE_DIR="$DEST"
export FORGE_PYTHON="$DEST/venv/bin/python"
export FORGE_ARGS="--skip-prepare-environment --skip-install --skip-torch-cuda-test --skip-version-check --no-download-sd-model --always-cpu"
EOF

# ---- 4. test checkpoint ------------------------------------------------------------------------
CKPT=$DEST/models/Stable-diffusion/tiny-sd1.safetensors
if [[ ! -f $CKPT ]]; then
  mkdir -p "$(dirname "$CKPT")"
  log "building $CKPT"
  (
    # shellcheck disable=SC1091
    source "$DEST/env.sh"
    cd "$DEST"
    "$VPY" "$HERE/make_forge_checkpoint.py" --forge "$DEST" --dtype "${FORGE_CKPT_DTYPE:-fp16}" "$CKPT.part"
  )
  mv "$CKPT.part" "$CKPT"
fi

# ---- 5. a Flux.1-dev checkpoint Forge loads as Flux (blocks share weights: 3.4 GB; kept outside models/, the suite
#         starts one Forge with --ckpt on it) -----------------------------------------------------------------
FLUX=$DEST/flux/tiny-flux.ckpt
if [[ ! -f $FLUX ]]; then
  mkdir -p "$(dirname "$FLUX")"
  log "building $FLUX"
  (
    # shellcheck disable=SC1091
    source "$DEST/env.sh"
    cd "$DEST"
    "$VPY" "$HERE/make_forge_flux_checkpoint.py" --forge "$DEST" "$FLUX.part"
  )
  mv "$FLUX.part" "$FLUX"
fi

log "done in $((SECONDS - t0)) s: $DEST"
log "launch: cd $DEST && source env.sh && venv/bin/python launch.py \$FORGE_ARGS --api --nowebui --server-name 127.0.0.1 --port 7862"

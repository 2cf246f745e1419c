#!/usr/bin/env bash
# Prove the sparsemeta-edge runtime on a Raspberry Pi Zero's CPU (ARM1176JZF-S, ARMv6, 512 MB)
# under qemu-user emulation, with Debian's own armel python3-numpy / python3-pil.
#
#   sudo benchmarks/arm.sh                     # armel (Pi Zero / Pi 1), QEMU_CPU=arm1176
#   sudo benchmarks/arm.sh --arch arm64        # arm64 (Pi 4), cortex-a72
#   sudo benchmarks/arm.sh --model m.smz --images DIR   # your ticket and class folders
#
# Stages (each one cached; a marker file per stage, re-running skips what is finished):
#   1. a Debian bookworm root (debootstrap --foreign, then --second-stage under qemu) with
#      python3-numpy, python3-pil, python3-pip, in ${SPARSEMETA_ARM_ROOT:-~/.cache/sparsemeta/arm/ARCH-bookworm}
#   2. the sparsemeta_edge wheel (pip wheel edge/), installed in the root with its pip
#      (--no-deps --no-index; reinstalled only when the wheel's contents change)
#   3. on this machine (x86): an exported ticket (default: a 30-iteration `sparsemeta train`
#      + `sparsemeta export`, cached) and glyph images; reference info/finetune/predict
#   4. in the root, under qemu with the emulated CPU and a memory limit: info, finetune
#      (early stopping), predict; probabilities compared with x86 (max |diff| <= 1e-4; also
#      one fine-tuning step's gradients, relative error <= 1e-4 vs x86 float64), peak
#      RSS (GNU time on the qemu process; qemu's own baseline measured with `python3 -c pass`),
#      time per epoch. Prints PASS or FAIL; writes results.json and results.md.
#
# Exit status: 0 PASS, 1 FAIL, 77 a prerequisite is missing (one line says which and what to do).
# Needs root (debootstrap, chroot, mount, cgroups), qemu-user-static, debootstrap, GNU time,
# binfmt_misc (only to build the root), and a Python with sparsemeta installed (PYTHON=...).
# Environment: SPARSEMETA_ARM_ROOT, SPARSEMETA_ARM_CACHE, SPARSEMETA_ARM_MIRROR,
#              SPARSEMETA_ARM_MEM_MB (default 512), PYTHON.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ARCH=armel
MODEL=""
IMAGES=""
OUTDIR=""
EPOCHS=10
PATIENCE=2
TOL=1e-4        # inference, and one fine-tuning step's gradients (relative)
TUNED_TOL=1e-2  # whole float32 fine-tuning runs, ARM vs x86 (see below)
MEM_MB=${SPARSEMETA_ARM_MEM_MB:-512}

usage() { sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=$2; shift 2 ;;
    --model) MODEL=$(realpath "$2"); shift 2 ;;
    --images) IMAGES=$(realpath "$2"); shift 2 ;;
    --out) OUTDIR=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    --patience) PATIENCE=$2; shift 2 ;;
    --tuned-tol) TUNED_TOL=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "arm.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

case "$ARCH" in
  armel) QEMU_BIN=qemu-arm-static; QEMU_CPU=arm1176; BINFMT=qemu-arm; BOARD="Raspberry Pi Zero (ARM1176, ARMv6)" ;;
  arm64) QEMU_BIN=qemu-aarch64-static; QEMU_CPU=cortex-a72; BINFMT=qemu-aarch64; BOARD="Raspberry Pi 4 (Cortex-A72, ARMv8)" ;;
  *) echo "arm.sh: --arch must be armel or arm64" >&2; exit 2 ;;
esac
CACHE=${SPARSEMETA_ARM_CACHE:-$HOME/.cache/sparsemeta/arm}
ROOT=${SPARSEMETA_ARM_ROOT:-$CACHE/$ARCH-bookworm}
OUTDIR=$(realpath -m "${OUTDIR:-$CACHE/results-$ARCH}")
PKGS=python3-numpy,python3-pil,python3-pip
GUEST_DIR=/srv/sparsemeta-arm            # inside the root
GDIR=$ROOT$GUEST_DIR                     # the same, seen from the host
# a clean environment for the emulated commands (QEMU_CPU too, should anything exec via binfmt)
GUEST_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
           LANG=C.UTF-8 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "QEMU_CPU=$QEMU_CPU")
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

say() { printf '%s\n' "$*"; }
missing() { say "arm.sh: MISSING PREREQUISITE: $*" >&2; exit 77; }
die() { say "arm.sh: error: $*" >&2; exit 1; }
declare -A STAGE_SECONDS=()
stage_start() { STAGE_T0=$(date +%s); say ""; say "== $1"; }
stage_end() { STAGE_SECONDS[$1]=$(( $(date +%s) - STAGE_T0 )); say "   ($1: ${STAGE_SECONDS[$1]} s)"; }

# ---------------------------------------------------------------- prerequisites (all up front)
find_python() {
  if [ -n "${PYTHON:-}" ]; then say "$PYTHON"; return; fi
  for p in "$REPO/.venv/bin/python" "$(git -C "$REPO" rev-parse --path-format=absolute --git-common-dir 2>/dev/null | sed 's#/\.git$##')/.venv/bin/python" python3; do
    if command -v "$p" >/dev/null 2>&1; then say "$p"; return; fi
  done
}
find_mirror() {
  if [ -n "${SPARSEMETA_ARM_MIRROR:-}" ]; then say "$SPARSEMETA_ARM_MIRROR"; return; fi
  local m
  m=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
         grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'; } \
       | grep -v -e security -e '^cdrom' | grep '/debian/\?$' | head -1 )
  say "${m:-http://deb.debian.org/debian}"
}

[ "$(id -u)" = 0 ] || missing "not root: debootstrap, chroot, mounts and cgroups need it; run: sudo $0 $*"
for c in debootstrap chroot mount "$QEMU_BIN"; do
  command -v "$c" >/dev/null 2>&1 || missing "'$c' not found; install: apt-get install -y qemu-user-static debootstrap binfmt-support time"
done
[ -x /usr/bin/time ] && /usr/bin/time -v true >/dev/null 2>&1 \
  || missing "GNU time (/usr/bin/time -v) not found; install: apt-get install -y time"
QEMU_PATH=$(command -v "$QEMU_BIN")
PYTHON=$(find_python)
[ -n "$PYTHON" ] || missing "no host Python; set PYTHON=/path/to/python with sparsemeta installed"
NEED_SPARSEMETA=$([ -z "$MODEL" ] || [ -z "$IMAGES" ] && echo 1 || echo 0)  # ticket / glyph images
LACKS=$("$PYTHON" - "$NEED_SPARSEMETA" 2>/dev/null <<'EOF' || echo "a working interpreter"
import sys, importlib.util
mods = ["numpy", "PIL", "pip"] + (["sparsemeta", "torch"] if sys.argv[1] == "1" else [])
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)
[ -z "$LACKS" ] || missing "host Python '$PYTHON' lacks $LACKS (sparsemeta and torch make the ticket and images without --model/--images); set PYTHON= to the project's venv (pip install -e . -e edge/)"
[ -z "$MODEL" ] || [ -f "$MODEL" ] || missing "--model '$MODEL' does not exist"
[ -z "$IMAGES" ] || [ -d "$IMAGES" ] || missing "--images '$IMAGES' is not a directory (expected IMAGES/CLASS/*.png)"
if [ ! -e "$ROOT/.stage-second" ]; then   # building the root runs the target's /bin/sh via binfmt
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
      || missing "binfmt_misc is not mounted and cannot be mounted here (unprivileged container?); run on a host or a --privileged container, or: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc"
  fi
  if ! head -1 "/proc/sys/fs/binfmt_misc/$BINFMT" 2>/dev/null | grep -q enabled; then
    command -v update-binfmts >/dev/null 2>&1 && update-binfmts --enable "$BINFMT" >/dev/null 2>&1 || true
    head -1 "/proc/sys/fs/binfmt_misc/$BINFMT" 2>/dev/null | grep -q enabled \
      || missing "binfmt handler $BINFMT not registered; run: apt-get install -y binfmt-support qemu-user-static && update-binfmts --enable $BINFMT"
  fi
fi

# memory limit: a cgroup (v2 memory.max or v1 memory.limit_in_bytes) per emulated command.
# Not ulimit -v / prlimit --as: qemu-arm reserves the guest's whole 4 GiB address space at start
# ("Unable to reserve 0xfffff000 bytes"), and guest allocations land inside that reservation, so
# RLIMIT_AS can neither admit qemu nor limit the guest. Not qemu -R 512M: qemu 7.2 aborts for
# 32-bit ARM (page_set_flags assertion; the commpage sits at 0xffff0000). Without a writable
# cgroup there is no hard limit; in every case each command's peak RSS (qemu included) must stay
# under the limit for a PASS.
CG_KIND="" CG_PARENT=""
cg_probe() {
  local own d
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    own=$(awk -F: '$1=="0"{print $3}' /proc/self/cgroup)
    d=/sys/fs/cgroup${own%/}
    if mkdir "$d/sparsemeta-arm-probe-$$" 2>/dev/null; then
      if [ -f "$d/sparsemeta-arm-probe-$$/memory.max" ]; then CG_KIND=v2; CG_PARENT=$d; fi
      rmdir "$d/sparsemeta-arm-probe-$$"
    fi
  elif [ -d /sys/fs/cgroup/memory ]; then
    own=$(awk -F: '$2=="memory"{print $3}' /proc/self/cgroup)
    d=/sys/fs/cgroup/memory${own%/}
    if mkdir "$d/sparsemeta-arm-probe-$$" 2>/dev/null; then
      if echo $((MEM_MB * 1048576)) > "$d/sparsemeta-arm-probe-$$/memory.limit_in_bytes" 2>/dev/null; then
        CG_KIND=v1; CG_PARENT=$d
      fi
      rmdir "$d/sparsemeta-arm-probe-$$"
    fi
  fi
}
cg_probe
if [ -n "$CG_KIND" ]; then
  MEMLIMIT="cgroup $CG_KIND memory limit ${MEM_MB} MiB on the qemu process (guest + emulator: anon + page cache), OOM-kill on excess"
else
  MEMLIMIT="no writable cgroup here: no hard limit, only the check peak RSS <= ${MEM_MB} MiB after each command"
fi

CLEANUP_CG=()
cleanup() {
  for g in "${CLEANUP_CG[@]}"; do rmdir "$g" 2>/dev/null || true; done
  if mountpoint -q "$ROOT/proc" 2>/dev/null; then umount "$ROOT/proc" 2>/dev/null || umount -l "$ROOT/proc" || true; fi
}
trap cleanup EXIT

say "arm.sh: $BOARD under $QEMU_BIN -cpu $QEMU_CPU; root $ROOT; results $OUTDIR"
say "memory limit: $MEMLIMIT"

# ---------------------------------------------------------------- 1. the Debian root
stage_start "root: Debian bookworm $ARCH with $PKGS"
MIRROR=$(find_mirror)
if [ -e "$ROOT/.stage-first" ]; then
  say "   first stage: cached"
else
  if [ -d "$ROOT" ] && [ -n "$(ls -A "$ROOT")" ]; then
    [ -d "$ROOT/debootstrap" ] || die "'$ROOT' exists, is not empty and is not an unfinished root of this script; remove it or set SPARSEMETA_ARM_ROOT"
    say "   removing an unfinished first stage"; rm -rf --one-file-system "$ROOT"
  fi
  mkdir -p "$ROOT"
  say "   debootstrap --foreign from $MIRROR (log: $ROOT.first.log)"
  nice -n 10 debootstrap --arch="$ARCH" --variant=minbase --foreign --include="$PKGS" \
    bookworm "$ROOT" "$MIRROR" > "$ROOT.first.log" 2>&1 \
    || { tail -5 "$ROOT.first.log" >&2; die "debootstrap first stage failed (mirror $MIRROR reachable? see $ROOT.first.log)"; }
  touch "$ROOT/.stage-first"
fi
install -m 755 "$QEMU_PATH" "$ROOT/usr/bin/$QEMU_BIN"
if [ -e "$ROOT/.stage-second" ]; then
  say "   second stage: cached"
else
  say "   debootstrap --second-stage under qemu (~20 min for armel at nice 10; log: $ROOT/debootstrap/debootstrap.log)"
  QEMU_CPU=$QEMU_CPU nice -n 10 chroot "$ROOT" /debootstrap/debootstrap --second-stage > "$ROOT.second.log" 2>&1 \
    || { tail -5 "$ROOT.second.log" >&2; die "second stage failed; see $ROOT.second.log (rm -rf $ROOT to start over)"; }
  chroot "$ROOT" /usr/bin/"$QEMU_BIN" /usr/bin/apt-get clean >/dev/null 2>&1 || true
  touch "$ROOT/.stage-second"
fi
stage_end root

mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"

# run_guest NAME CMD...: CMD inside the root under qemu (-cpu, memory limit, nice 10), wrapped in
# GNU time on the host (peak RSS of the qemu process); output to $WORK/NAME.log and the terminal
run_guest() {
  local name=$1; shift
  local cg="" wrap=() rc=0
  if [ -n "$CG_KIND" ]; then
    cg="$CG_PARENT/sparsemeta-arm-$$-$name"
    mkdir "$cg"; CLEANUP_CG+=("$cg")
    if [ "$CG_KIND" = v2 ]; then
      echo $((MEM_MB * 1048576)) > "$cg/memory.max"
      [ -f "$cg/memory.swap.max" ] && echo 0 > "$cg/memory.swap.max"
    else
      echo $((MEM_MB * 1048576)) > "$cg/memory.limit_in_bytes"
      [ -f "$cg/memory.memsw.limit_in_bytes" ] && echo $((MEM_MB * 1048576)) > "$cg/memory.memsw.limit_in_bytes" 2>/dev/null || true
    fi
    wrap=(sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg")
  fi
  # host: GNU time -> (cgroup) -> nice -> env -i -> chroot -> qemu-*-static -cpu ... PROGRAM ARGS
  /usr/bin/time -v -o "$WORK/$name.time" "${wrap[@]}" nice -n 10 "${GUEST_ENV[@]}" chroot "$ROOT" \
    "/usr/bin/$QEMU_BIN" -cpu "$QEMU_CPU" "$@" > "$WORK/$name.log" 2>&1 || rc=$?
  sed 's/^/   | /' "$WORK/$name.log"
  local peak
  peak=$(awk -F': ' '/Maximum resident set size/{print $2}' "$WORK/$name.time")
  echo "$name $rc $peak $(awk -F': ' '/Elapsed \(wall clock\)/{print $2}' "$WORK/$name.time")" >> "$WORK/guest-runs.txt"
  if [ -n "$cg" ]; then
    local cpeak="" oom=0
    if [ "$CG_KIND" = v2 ]; then
      cpeak=$(cat "$cg/memory.peak" 2>/dev/null || true)
      oom=$(awk '$1=="oom_kill"{print $2}' "$cg/memory.events" 2>/dev/null || echo 0)
    else
      cpeak=$(cat "$cg/memory.max_usage_in_bytes" 2>/dev/null || true)
      oom=$(awk '$1=="oom_kill"{print $2}' "$cg/memory.oom_control" 2>/dev/null || echo 0)
    fi
    echo "$name ${cpeak:-NA} ${oom:-0}" >> "$WORK/guest-cgroup.txt"
    [ "${oom:-0}" = 0 ] || say "   !! $name was OOM-killed by the ${MEM_MB} MiB limit"
  fi
  say "   -> $name: exit $rc, peak RSS of the qemu process $((peak / 1024)) MiB"
  return $rc
}

# ---------------------------------------------------------------- 2. the wheel, installed in the root
stage_start "wheel: sparsemeta_edge from $REPO/edge, installed in the root"
WORK=$OUTDIR/work; rm -rf "$WORK"; rm -f "$OUTDIR/results.json" "$OUTDIR/results.md"; mkdir -p "$WORK"
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/wheel" "$REPO/edge" > "$WORK/wheel.log" 2>&1 \
  || "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheel" "$REPO/edge" >> "$WORK/wheel.log" 2>&1 \
  || { cat "$WORK/wheel.log" >&2; die "pip wheel edge/ failed"; }
WHEEL=$(ls "$WORK"/wheel/sparsemeta_edge-*.whl)
WHEEL_ID=$("$PYTHON" -c 'import sys, zipfile, hashlib; z = zipfile.ZipFile(sys.argv[1]); rec = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")][0]; print(hashlib.sha256(z.read(rec)).hexdigest()[:16])' "$WHEEL")
say "   built $(basename "$WHEEL") (contents $WHEEL_ID)"
"$PYTHON" -m pip install -q --no-deps --no-index --target "$WORK/host-site" "$WHEEL" > /dev/null
rm -rf "$GDIR"; mkdir -p "$GDIR"
if [ "$(cat "$ROOT/.stage-wheel" 2>/dev/null)" = "$WHEEL_ID" ]; then
  say "   same wheel already installed in the root: skipped"
  INSTALL_HOW="cached (pip install --no-deps, earlier run)"
else
  cp "$WHEEL" "$GDIR/"
  if [ -e "$ROOT/usr/lib/python3/dist-packages/pip/__init__.py" ]; then
    INSTALL_HOW="Debian python3-pip in the root: pip install --no-deps --no-index --break-system-packages (PEP 668) into /usr/local"
    run_guest pip-install /usr/bin/python3 -m pip install -q --no-deps --no-index --no-cache-dir --force-reinstall \
      --break-system-packages --root-user-action=ignore "$GUEST_DIR/$(basename "$WHEEL")" \
      || die "pip install in the root failed (see above)"
  else
    INSTALL_HOW="no pip in the root: wheel unzipped into /usr/local/lib/python3/dist-packages"
    "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
      "$WHEEL" "$ROOT/usr/local/lib/python3/dist-packages"
  fi
  echo "$WHEEL_ID" > "$ROOT/.stage-wheel"
fi
say "   install: $INSTALL_HOW"
stage_end wheel

# ---------------------------------------------------------------- 3. x86 reference
stage_start "x86 reference: ticket, images, info/finetune/predict on $(uname -m)"
if [ -z "$MODEL" ]; then
  MODEL=$CACHE/host-ticket/model.smz
  if [ -e "$CACHE/host-ticket/.done" ]; then
    say "   ticket: cached $MODEL"
  else
    say "   ticket: sparsemeta train --set train.iterations=30 (glyphs-quick) + sparsemeta export (log: $CACHE/host-ticket/train.log)"
    rm -rf "$CACHE/host-ticket"; mkdir -p "$CACHE/host-ticket"
    ( cd "$CACHE/host-ticket" && PYTHONPATH="$REPO/src:$WORK/host-site" "$PYTHON" -m sparsemeta train \
        --set train.iterations=30 --set eval.tasks=20 --set train.val_tasks=20 --out run \
      && PYTHONPATH="$REPO/src:$WORK/host-site" "$PYTHON" -m sparsemeta export run --out model.smz ) \
      > "$CACHE/host-ticket/train.log" 2>&1 || { tail -5 "$CACHE/host-ticket/train.log" >&2; die "training/exporting the ticket failed"; }
    touch "$CACHE/host-ticket/.done"
  fi
fi
cp "$MODEL" "$GDIR/model.smz"
if [ -n "$IMAGES" ]; then
  cp -r "$IMAGES" "$GDIR/train"
  mkdir -p "$GDIR/query"
  for d in "$GDIR"/train/*/; do  # one image per class held back as the prediction set
    f=$(ls "$d" | head -1); mkdir -p "$GDIR/query/$(basename "$d")"; mv "$d$f" "$GDIR/query/$(basename "$d")/"
  done
else  # 5 novel glyph characters (generator seed 7, not the training alphabets), 12 drawers each
  PYTHONPATH="$REPO/src" "$PYTHON" - "$GDIR" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
from sparsemeta.data.glyphs import GlyphSpec, generate
images, _ = generate(GlyphSpec(seed=7, alphabets=1, characters=5, drawers=12))
for c in range(5):
    for i in range(12):
        d = Path(sys.argv[1]) / ("query" if i >= 10 else "train") / f"glyph_{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[c, i], mode="L").save(d / f"{i:02d}.png")
EOF
fi
( cd "$GDIR" && find query -name '*.png' -o -name '*.jpg' -o -name '*.jpeg' | sort ) > "$GDIR/query.txt"
say "   $(find "$GDIR/train" -type f | wc -l) fine-tuning images, $(wc -l < "$GDIR/query.txt") to predict"
cat > "$GDIR/probe.py" <<'EOF'
"""Full-precision probabilities of `sparsemeta-edge predict` (same load/decode/predict calls)."""
import hashlib, json, platform, sys
import numpy as np
import sparsemeta_edge
from sparsemeta_edge.data import decode_many
from sparsemeta_edge.runtime import predict
from sparsemeta_edge.smz import load
model_path, out, *images = sys.argv[1:]
model = load(model_path, np.float32)
a = model.manifest.architecture
x = decode_many(images, a.image_size, a.in_channels, model.manifest.input.invert)
probs, note = predict(model, x, "auto")
json.dump({"machine": platform.machine(), "numpy": np.__version__, "note": note,
           "module": sparsemeta_edge.__file__, "decoded_sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(),
           "images": images, "probs": probs.tolist()}, open(out, "w"))
EOF
cat > "$GDIR/gradprobe.py" <<'EOF'
"""Gradients of one fine-tuning step (first 25 images, the model's own batch norm) per dtype."""
import sys
import numpy as np
from sparsemeta_edge.data import load_folder
from sparsemeta_edge.nn import cross_entropy
from sparsemeta_edge.runtime import network, to_float
from sparsemeta_edge.smz import load
model_path, data, out, dtypes = sys.argv[1:]
res = {}
for name in dtypes.split(","):
    dt = np.dtype(name).type
    model = load(model_path, dt)
    a, inp = model.manifest.architecture, model.manifest.input
    x, y, _ = load_folder(data, a.image_size, a.in_channels, inp.invert)
    mean = inp.mean or [0.0] * a.in_channels
    std = inp.std or [1.0] * a.in_channels
    net = network(model)
    logits = net.forward(to_float(x[:25], mean, std, dt), keep=True)
    _, dlogits = cross_entropy(logits, y[:25])
    res.update({f"{name}/logits": logits, **{f"{name}/{k}": g for k, g in net.backward(dlogits).items()}})
np.savez(out, **res)
EOF
mapfile -t QUERY < "$GDIR/query.txt"               # relative: x86 runs in $GDIR
mapfile -t GQUERY < <(sed "s#^#$GUEST_DIR/#" "$GDIR/query.txt")  # absolute paths in the root
: > "$WORK/host-runs.txt"
host_run() {  # NAME ARGS...: like run_guest, on this machine
  local name=$1; shift; local rc=0
  ( cd "$GDIR" && PYTHONPATH="$WORK/host-site" /usr/bin/time -v -o "$WORK/x86-$name.time" "$PYTHON" "$@" ) > "$WORK/x86-$name.log" 2>&1 || rc=$?
  sed 's/^/   | /' "$WORK/x86-$name.log"
  echo "$name $rc $(awk -F': ' '/Maximum resident set size/{print $2}' "$WORK/x86-$name.time")" >> "$WORK/host-runs.txt"
  [ $rc = 0 ] || die "x86 $name failed (exit $rc)"
}
FT_ARGS=(--data train --epochs "$EPOCHS" --patience "$PATIENCE" --holdout 0.2 --batch 25 --seed 0 --dtype float32)
host_run info -m sparsemeta_edge info model.smz
host_run finetune -m sparsemeta_edge finetune model.smz "${FT_ARGS[@]}" --out x86-tuned.smz
host_run predict -m sparsemeta_edge predict model.smz "${QUERY[@]}"
host_run predict-tuned -m sparsemeta_edge predict x86-tuned.smz "${QUERY[@]}"
host_run probe probe.py model.smz x86-probe-model.json "${QUERY[@]}"
host_run probe-tuned probe.py x86-tuned.smz x86-probe-x86-tuned.json "${QUERY[@]}"
host_run grad gradprobe.py model.smz train x86-grad.npz float32,float64
stage_end x86

# ---------------------------------------------------------------- 4. emulated ARM
stage_start "$ARCH under $QEMU_BIN -cpu $QEMU_CPU, $MEMLIMIT"
GUEST_OK=1
run_guest baseline /usr/bin/python3 -c pass || GUEST_OK=0
run_guest baseline-numpy /usr/bin/python3 -c 'import numpy' || GUEST_OK=0
run_guest uname /bin/uname -m || GUEST_OK=0
run_guest versions /usr/bin/python3 -c 'import platform, numpy, PIL, sparsemeta_edge; print("python", platform.python_version(), "machine", platform.machine(), "numpy", numpy.__version__, "pillow", PIL.__version__, "sparsemeta_edge", sparsemeta_edge.__file__)' || GUEST_OK=0
# the installed console script, run by the emulated python3 directly (no guest exec: a child
# would go through binfmt, not this qemu); absolute paths since chroot starts in /
G=(/usr/bin/python3 /usr/local/bin/sparsemeta-edge)
[ -e "$ROOT/usr/local/bin/sparsemeta-edge" ] || G=(/usr/bin/python3 -m sparsemeta_edge)
D=$GUEST_DIR
GFT_ARGS=(--data "$D/train" "${FT_ARGS[@]:2}")
run_guest info "${G[@]}" info "$D/model.smz" || GUEST_OK=0
run_guest finetune "${G[@]}" finetune "$D/model.smz" "${GFT_ARGS[@]}" --out "$D/arm-tuned.smz" || GUEST_OK=0
run_guest predict "${G[@]}" predict "$D/model.smz" "${GQUERY[@]}" || GUEST_OK=0
run_guest predict-tuned "${G[@]}" predict "$D/arm-tuned.smz" "${GQUERY[@]}" || GUEST_OK=0
run_guest probe /usr/bin/python3 "$D/probe.py" "$D/model.smz" "$D/arm-probe-model.json" "${GQUERY[@]}" || GUEST_OK=0
run_guest probe-x86-tuned /usr/bin/python3 "$D/probe.py" "$D/x86-tuned.smz" "$D/arm-probe-x86-tuned.json" "${GQUERY[@]}" || GUEST_OK=0
run_guest probe-tuned /usr/bin/python3 "$D/probe.py" "$D/arm-tuned.smz" "$D/arm-probe-arm-tuned.json" "${GQUERY[@]}" || GUEST_OK=0
run_guest grad /usr/bin/python3 "$D/gradprobe.py" "$D/model.smz" "$D/train" "$D/arm-grad.npz" float32 || GUEST_OK=0
stage_end emulated

# ---------------------------------------------------------------- compare, record
stage_start "compare and record"
STAGES=""; for k in "${!STAGE_SECONDS[@]}"; do STAGES+="$k=${STAGE_SECONDS[$k]} "; done
PYTHONPATH="$WORK/host-site" "$PYTHON" - "$GDIR" "$WORK" "$OUTDIR" "$TOL,$TUNED_TOL" "$GUEST_OK" "$ARCH" "$QEMU_CPU" \
  "$MEMLIMIT" "$MEM_MB" "$INSTALL_HOW" "$STAGES" "$($QEMU_PATH --version | head -1)" "$BOARD" <<'EOF'
import json, re, statistics, sys
from pathlib import Path
import numpy as np
from sparsemeta_edge.smz import load

(gdir, work, outdir, tol, guest_ok, arch, cpu, memlimit, mem_mb, install_how, stages, qemu,
 board) = sys.argv[1:]
gdir, work, outdir = Path(gdir), Path(work), Path(outdir)
tol, tuned_tol = map(float, tol.split(","))
problems = [] if guest_ok == "1" else ["an emulated command failed (see its output above)"]

def runs(name):
    out = {}
    p = work / name
    for line in (p.read_text().splitlines() if p.exists() else []):
        f = line.split()
        out[f[0]] = f[1:]
    return out
guest, host, cg = runs("guest-runs.txt"), runs("host-runs.txt"), runs("guest-cgroup.txt")
mib = lambda kb: round(int(kb) / 1024, 1)

def probs(name):
    p = gdir / name
    return json.loads(p.read_text()) if p.exists() else None
checks = {}
# Inference must agree to 1e-4. Whole fine-tuning runs are compared with a looser tolerance:
# float32 rounding differs between builds (arm64's reference BLAS is compiled with fused
# multiply-add, which x86-64's baseline lacks; NumPy's own SIMD loops differ too), and
# over a run's SGD steps a difference of 1e-7 can flip a max-pool or ReLU decision, after
# which the weights differ by ~lr·gradient (arm64: 5.6e-4 after 16 steps at lr 0.4, while the
# same runs in float64 are bitwise equal). The step itself is checked strictly (gradients).
for label, x86_file, arm_file, limit in [
        ("exported ticket", "x86-probe-model.json", "arm-probe-model.json", tol),
        ("x86-fine-tuned model, predicted on ARM", "x86-probe-x86-tuned.json", "arm-probe-x86-tuned.json", tol),
        ("fine-tuned on ARM vs fine-tuned on x86", "x86-probe-x86-tuned.json", "arm-probe-arm-tuned.json", tuned_tol)]:
    a, b = probs(x86_file), probs(arm_file)
    if a is None or b is None:
        checks[label] = {"ok": False, "error": "missing output"}
        problems.append(f"{label}: no probabilities")
        continue
    pa, pb = np.asarray(a["probs"]), np.asarray(b["probs"])
    diff = float(np.abs(pa - pb).max()) if pa.shape == pb.shape else float("inf")
    same_top = pa.shape == pb.shape and bool((pa.argmax(1) == pb.argmax(1)).all())
    same_pixels = a["decoded_sha256"] == b["decoded_sha256"]
    ok = diff <= limit and same_top and same_pixels
    checks[label] = {"max_abs_diff": diff, "tolerance": limit, "same_argmax": same_top,
                     "same_decoded_pixels": same_pixels, "images": int(pa.shape[0]), "ok": ok}
    if not ok:
        problems.append(f"{label}: max |diff| {diff:.2e} (tol {limit:g}), same argmax {same_top}, "
                        f"same decoded pixels {same_pixels}")

# one fine-tuning step: ARM float32 gradients vs x86 float64, relative to each tensor's max
grad = {}
if (gdir / "arm-grad.npz").exists() and (gdir / "x86-grad.npz").exists():
    ga, gx = np.load(gdir / "arm-grad.npz"), np.load(gdir / "x86-grad.npz")
    def rel(name, f32):
        ref = gx[f"float64/{name}"]
        return float(np.abs(f32.astype(np.float64) - ref).max() / (np.abs(ref).max() or 1.0))
    names = [k.split("/", 1)[1] for k in gx.files if k.startswith("float64/")]
    arm = {n: rel(n, ga[f"float32/{n}"]) for n in names}
    x86 = {n: rel(n, gx[f"float32/{n}"]) for n in names}
    worst = max(arm, key=arm.get)
    grad = {"max_rel_err_arm_f32": arm[worst], "worst": worst,
            "max_rel_err_x86_f32": max(x86.values()), "tolerance": tol, "ok": arm[worst] <= tol}
    if not grad["ok"]:
        problems.append(f"gradients of one step: relative error {arm[worst]:.1e} in {worst} (tol {tol:g})")
else:
    problems.append("gradients of one step: no output")

# the fine-tuned weights themselves, and the CLI's printed predictions (4 decimals)
tuned = {}
if (gdir / "arm-tuned.smz").exists():
    ma, mx = load(gdir / "arm-tuned.smz"), load(gdir / "x86-tuned.smz")
    tuned = {"max_abs_param_diff": max(float(np.abs(ma.params[k] - mx.params[k]).max()) for k in mx.params),
             "epochs_arm": ma.manifest.finetuned.epochs, "epochs_x86": mx.manifest.finetuned.epochs,
             "masks_equal": all(np.array_equal(ma.masks[k], mx.masks[k]) for k in mx.masks)}
    if tuned["epochs_arm"] != tuned["epochs_x86"] or not tuned["masks_equal"]:
        problems.append(f"fine-tuning differs: {tuned}")

def printed(path):
    rows = {}
    for line in (path.read_text().splitlines() if path.exists() else []):
        f = line.split("\t")
        if len(f) >= 3 and not line.startswith("#"):
            rows[f[0][f[0].find("query/"):]] = (f[1], float(f[2]))  # x86 relative, ARM absolute
    return rows
cli = {}
for g, h, limit in [("predict", "x86-predict", tol), ("predict-tuned", "x86-predict-tuned", tuned_tol)]:
    ra, rh = printed(work / f"{g}.log"), printed(work / f"{h}.log")  # 4 decimals: +-1e-4 rounding
    same = bool(ra) and ra.keys() == rh.keys() and all(
        ra[k][0] == rh[k][0] and abs(ra[k][1] - rh[k][1]) <= limit + 1e-4 + 1e-9 for k in rh)
    cli[g] = {"images": len(ra), "same_class_and_printed_prob": same}
    if not same:
        problems.append(f"CLI {g}: printed predictions differ from x86")

def epoch_times(log):
    return [float(m) for m in re.findall(r"^epoch\s+\d+/\d+ .* time ([0-9.]+)s", log.read_text(), re.M)] \
        if log.exists() else []
ep_arm, ep_x86 = epoch_times(work / "finetune.log"), epoch_times(work / "x86-finetune.log")
versions = (work / "versions.log").read_text().strip() if (work / "versions.log").exists() else ""
uname = (work / "uname.log").read_text().strip() if (work / "uname.log").exists() else ""
base = int(guest["baseline"][1]) if "baseline" in guest else 0
mem = {}
for name, (rc, kb, *wall) in guest.items():
    mem[name] = {"exit": int(rc), "peak_rss_mib": mib(kb), "minus_qemu_python_baseline_mib": None if name == "uname" else mib(int(kb) - base),
                 "wall": wall[0] if wall else None,
                 "cgroup_peak_mib": (round(int(cg[name][0]) / 2**20, 1) if name in cg and cg[name][0].isdigit() else None),
                 "oom_kills": int(cg[name][1]) if name in cg else None}
over = [k for k, v in mem.items() if v["peak_rss_mib"] > int(mem_mb) or v["oom_kills"]]
if over:
    problems.append(f"over the {mem_mb} MiB limit (peak RSS incl. qemu, or OOM-killed): {', '.join(over)}")
result = {
    "status": "PASS" if not problems else "FAIL", "problems": problems, "board": board, "arch": arch,
    "qemu": qemu, "qemu_cpu": cpu, "uname_m": uname, "guest_versions": versions,
    "memory_limit": memlimit, "memory_limit_mib": int(mem_mb), "install": install_how,
    "tolerance": tol, "checks": checks, "gradients": grad, "finetune": {**tuned, "epoch_seconds_arm": ep_arm,
    "epoch_seconds_x86": ep_x86}, "cli_predict": cli, "memory": mem,
    "x86_peak_rss_mib": {k: mib(v[1]) for k, v in host.items()},
    "stage_seconds": dict(kv.split("=") for kv in stages.split()),
}
(outdir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
med = lambda xs: statistics.median(xs) if xs else float("nan")
lines = [f"# sparsemeta-edge on {board} (emulated)", "",
         f"- status: **{result['status']}**" + ("" if not problems else " — " + "; ".join(problems)),
         f"- {qemu}, `-cpu {cpu}`; `uname -m` in the root: `{uname}`; {versions}",
         f"- memory limit: {memlimit}",
         f"- wheel install: {install_how}", "",
         "| check | max abs diff | same argmax | same pixels | ok |", "|---|---|---|---|---|"]
for k, v in checks.items():
    lines.append(f"| {k} | {v.get('max_abs_diff', float('nan')):.2e} (tol {v.get('tolerance')}) | {v.get('same_argmax')} | "
                 f"{v.get('same_decoded_pixels')} | {v['ok']} |")
if grad:
    lines += ["", f"one fine-tuning step's gradients (25 images), float32 vs x86 float64: max relative "
              f"error ARM {grad['max_rel_err_arm_f32']:.1e} ({grad['worst']}), x86 {grad['max_rel_err_x86_f32']:.1e}"]
lines += ["", f"fine-tuning: {len(ep_arm)} epoch(s) on ARM, median {med(ep_arm):.2f} s/epoch "
          f"(x86 {med(ep_x86):.3f} s/epoch, {med(ep_arm) / med(ep_x86) if ep_x86 else float('nan'):.0f}× slower "
          "under emulation — emulated time, not a Pi's)", "",
          "| emulated command | exit | peak RSS (MiB, qemu process) | minus `python3 -c pass` under qemu | cgroup peak (MiB) | wall |",
          "|---|---|---|---|---|---|"]
for k, v in mem.items():
    lines.append(f"| {k} | {v['exit']} | {v['peak_rss_mib']} | {v['minus_qemu_python_baseline_mib']} | "
                 f"{v['cgroup_peak_mib']} | {v['wall']} |")
lines += ["", "stage seconds: " + ", ".join(f"{k} {v}" for k, v in result["stage_seconds"].items())]
(outdir / "results.md").write_text("\n".join(lines) + "\n")

print(f"   uname -m in the root: {uname}; {versions}")
for k, v in checks.items():
    print(f"   {k}: max |p_arm - p_x86| = {v.get('max_abs_diff', float('nan')):.2e} over "
          f"{v.get('images')} images, same argmax {v.get('same_argmax')}, same decoded pixels "
          f"{v.get('same_decoded_pixels')} -> {'ok' if v['ok'] else 'NOT OK'} (tol {v.get('tolerance')})")
if grad:
    print(f"   one fine-tuning step's gradients, float32 vs x86 float64: max relative error ARM "
          f"{grad['max_rel_err_arm_f32']:.1e} ({grad['worst']}), x86 {grad['max_rel_err_x86_f32']:.1e} "
          f"-> {'ok' if grad['ok'] else 'NOT OK'} (tol {tol:g})")
if tuned:
    print(f"   fine-tuned weights: max |w_arm - w_x86| = {tuned['max_abs_param_diff']:.2e}; epochs "
          f"ARM {tuned['epochs_arm']} / x86 {tuned['epochs_x86']} (early stopping); masks equal {tuned['masks_equal']}")
print(f"   CLI predict (printed): " + ", ".join(f"{k} {'same' if v['same_class_and_printed_prob'] else 'DIFFERENT'}" for k, v in cli.items()))
print(f"   time per epoch: ARM (emulated) {', '.join(f'{t:.2f}' for t in ep_arm)} s (median {med(ep_arm):.2f}); "
      f"x86 median {med(ep_x86):.3f} s")
b = mem.get("baseline", {}).get("peak_rss_mib")
for k in ("baseline", "baseline-numpy", "info", "finetune", "predict", "predict-tuned"):
    if k in mem:
        v = mem[k]
        print(f"   peak RSS {k:<15} {v['peak_rss_mib']:>6} MiB with qemu, {v['minus_qemu_python_baseline_mib']:>6} MiB "
              f"above qemu+`python3 -c pass` ({b} MiB); cgroup peak {v['cgroup_peak_mib']} MiB")
print(f"   x86 peak RSS: " + ", ".join(f"{k} {v} MiB" for k, v in result["x86_peak_rss_mib"].items()))
print(f"   wrote {outdir / 'results.json'} and {outdir / 'results.md'}")
print(f"{result['status']}: sparsemeta-edge on {board}, {arch} under qemu -cpu {cpu}, "
      f"{mem_mb} MiB limit" + ("" if not problems else " — " + "; ".join(problems)))
sys.exit(0 if not problems else 1)
EOF

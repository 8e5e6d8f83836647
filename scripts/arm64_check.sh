#!/usr/bin/env bash
# The device agent on ARM64, emulated: an arm64 Debian bookworm userland (qemu-user-static
# + debootstrap, cached), the checkout's `device` extra installed in it, and its device
# agent answering through mosquitto and a server agent that run natively on this host's
# loopback. Prints each step's time (emulation, not Pi speed), the arm64 agent's answers
# next to the x86 agent's for the same jobs, and the code agreement aarch64 vs x86 for
# the fp32 and int8 graphs of two bundles (the tiny preset and a larger random-weight one).
#
#   sudo bash scripts/arm64_check.sh          # needs root, ~15 min the first time (2 cores)
#
# EDGEQTL_ARM64_CACHE (default ~/.cache/edgeqtl-arm64) keeps the userland between runs;
# EDGEQTL_PYTHON is the host's Python with the project installed (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
PY=${EDGEQTL_PYTHON:-$SRC/.venv/bin/python}
CACHE=${EDGEQTL_ARM64_CACHE:-$HOME/.cache/edgeqtl-arm64}
ROOTFS=$CACHE/bookworm-arm64
WORK=$(mktemp -d /tmp/edgeqtl-arm64.XXXXXX)
LARGE_SCALE=${EDGEQTL_ARM64_LARGE_SCALE:-0.1}
export PIP_DISABLE_PIP_VERSION_CHECK=1

die() { echo "arm64 check: $*" >&2; exit 1; }
T0=$(date +%s)
step() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
timed() { local s=$(date +%s); "$@"; echo "    ($(( $(date +%s) - s )) s)"; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, binfmt_misc); run it with sudo"
[ -x "$PY" ] || die "no Python with edgeqtl at $PY; run scripts/setup.sh first or set EDGEQTL_PYTHON"

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for m in proc dev/pts dev opt/src; do mountpoint -q "$ROOTFS/$m" && umount -l "$ROOTFS/$m" || true; done
}
trap cleanup EXIT

# ---- 1. qemu, binfmt_misc, debootstrap
step "1/6 qemu-user-static, binfmt_misc, debootstrap"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
   || ! command -v update-binfmts >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap binfmt-support >/dev/null
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "binfmt_misc has no qemu-aarch64 entry (update-binfmts failed)"

# ---- 2. the arm64 userland (cached)
step "2/6 arm64 Debian bookworm userland in $ROOTFS"
if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
  rm -rf "$ROOTFS.partial"; mkdir -p "$CACHE"
  timed debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOTFS.partial" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $WORK/debootstrap.log"
  mv "$ROOTFS.partial" "$ROOTFS"
else
  echo "    (cached)"
fi
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"  # the host's CAs, for pip
mountpoint -q "$ROOTFS/proc" || mount -t proc proc "$ROOTFS/proc"
mountpoint -q "$ROOTFS/dev" || mount --bind /dev "$ROOTFS/dev"
# /sys stays unmounted: onnxruntime's cpuinfo segfaults under qemu 7.2 with it, and only warns without
mkdir -p "$ROOTFS/opt/src"
IN() { chroot "$ROOTFS" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
       PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"; }
echo "    $(IN uname -m), $(IN python3 --version)"

# ---- 3. the device extra from this checkout
step "3/6 pip install .[device] inside the arm64 userland (from the checkout's tracked files)"
rm -rf "$ROOTFS/opt/src"/* && git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$ROOTFS/opt/src"
[ -x "$ROOTFS/opt/venv/bin/python" ] || IN python3 -m venv /opt/venv
s=$(date +%s)
IN /opt/venv/bin/pip install -q --only-binary numpy,onnxruntime,pillow,tokenizers "/opt/src[device]" \
  >"$WORK/pip.log" 2>&1 || { tail -20 "$WORK/pip.log"; die "installing the device extra failed (above)"; }
INSTALL_S=$(( $(date +%s) - s ))
echo "    installed in $INSTALL_S s: $(IN /opt/venv/bin/python -c 'import onnxruntime, numpy; print("onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__)')"
IN /opt/venv/bin/python -c "import sys, edgeqtl.device_agent.client; assert 'torch' not in sys.modules" \
  || die "the device agent imported torch on arm64"

# ---- 4. bundles, built natively
step "4/6 bundles on the host: the tiny preset (cut 2) and interleave-0.5b's structure at scale $LARGE_SCALE (cut 0)"
"$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path
from edgeqtl.models.checkpoint import save_checkpoint
from edgeqtl.models.presets import build_tiny
from edgeqtl.models.split import SplitConfig, SplitModel
save_checkpoint(SplitModel(build_tiny(0), SplitConfig(cut=2, levels=4)), Path(sys.argv[1]) / "tiny-model")
EOF
timed "$PY" -m edgeqtl.cli export --model "$WORK/tiny-model" --target arm64 --no-verify --out "$WORK/tiny" >"$WORK/export-tiny.log"
timed "$PY" -m edgeqtl.cli zoo llava-interleave-qwen-0.5b --scale "$LARGE_SCALE" --out "$WORK/large-ckpt" >"$WORK/zoo.log"
timed "$PY" -m edgeqtl.cli export --model "$WORK/large-ckpt" --cut 0 --bits 2 --target arm64 --no-verify \
  --out "$WORK/large" >"$WORK/export-large.log"
for b in tiny large; do cp -r "$WORK/$b" "$ROOTFS/opt/$b"; done
du -sh "$WORK/tiny" "$WORK/large" | sed 's/^/    /'

# ---- 5. codes, aarch64 against x86
step "5/6 client codes, aarch64 (emulated) against x86, same inputs"
declare -A AGREE
for b in tiny large; do
  n=$([ $b = tiny ] && echo 20 || echo 3)
  for v in fp32 int8; do
    "$PY" scripts/arm64_codes.py dump "$WORK/$b" $v $n "$WORK/$b-$v-x86.npz"
    s=$(date +%s)
    IN /opt/venv/bin/python /opt/src/scripts/arm64_codes.py dump /opt/$b $v $n /opt/$b-$v-arm64.npz
    e=$(( $(date +%s) - s ))
    r=$("$PY" scripts/arm64_codes.py compare "$WORK/$b-$v-x86.npz" "$ROOTFS/opt/$b-$v-arm64.npz")
    AGREE[$b-$v]=$r
    echo "    $b $v: $r  ($n questions in $e s emulated)"
  done
done

# ---- 6. the arm64 device agent against a native server agent and mosquitto
step "6/6 device run / device ask on arm64 and on x86 against a native server agent"
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$PY" -m edgeqtl.cli broker --port "$PORT" >"$WORK/broker.log" 2>&1 & PIDS+=($!)
sleep 2
BROKER=mqtt://127.0.0.1:$PORT
"$PY" - "$WORK" "$ROOTFS/opt" <<'EOF'
import json, sys
from pathlib import Path
from PIL import Image
from edgeqtl import shapes
work, opt = Path(sys.argv[1]), Path(sys.argv[2])
jobs = []
for i, s in enumerate(shapes.heldout(1)):
    Image.fromarray(s.image).save(opt / f"q{i}.png")
    jobs.append({"id": f"q{i}", "image": f"/opt/q{i}.png", "prompt": s.question})
(opt / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
(work / "jobs.jsonl").write_text("".join(json.dumps({**j, "image": str(opt / Path(j["image"]).name)}) + "\n"
                                         for j in jobs))
EOF
ANSWERS_SAME=yes
for b in tiny large; do
  # one server agent at a time: every agent on the shared topic would take the other bundle's requests
  "$PY" -m edgeqtl.cli server serve --server-half "$WORK/$b/server" --broker "$BROKER" --server-id srv-$b \
    >"$WORK/server-$b.log" 2>&1 & SERVER=$!; PIDS+=($SERVER)
  sleep 10  # it loads its half
  for v in fp32 int8; do
    s=$(date +%s)
    IN /opt/venv/bin/edgeqtl device run --bundle /opt/$b --variant $v --broker "$BROKER" --device-id arm64-$b \
      --timeout 120 --jobs /opt/jobs.jsonl --out /opt/answers-$b-$v.jsonl
    e=$(( $(date +%s) - s ))
    "$PY" -m edgeqtl.cli device run --bundle "$WORK/$b" --variant $v --broker "$BROKER" --device-id x86-$b \
      --timeout 120 --jobs "$WORK/jobs.jsonl" --out "$WORK/answers-$b-$v-x86.jsonl"
    verdict=$("$PY" scripts/arm64_codes.py answers "$ROOTFS/opt/answers-$b-$v.jsonl" "$WORK/answers-$b-$v-x86.jsonl")
    [[ $verdict == SAME* ]] || ANSWERS_SAME=no
    echo "    $b $v: arm64 device run $e s emulated; ${verdict#* }"
    head -2 "$ROOTFS/opt/answers-$b-$v.jsonl" | cut -c1-160 | sed 's/^/      arm64: /'
  done
  if [ $b = tiny ]; then
    Q=$(head -1 "$ROOTFS/opt/jobs.jsonl" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['prompt'])")
    ASK=$(IN /opt/venv/bin/edgeqtl device ask --bundle /opt/tiny --broker "$BROKER" --device-id arm64-ask \
          --image /opt/q0.png --prompt "$Q" --timeout 120 2>&1 | grep -v cpuinfo | tail -2 | tr "\n" " ")
    echo "    device ask on arm64: $Q -> $ASK"
  fi
  kill $SERVER; wait $SERVER 2>/dev/null || true
done

echo
echo "summary (emulated arm64; times are qemu's, not a Pi's):"
echo "  install of .[device] in the arm64 userland: $INSTALL_S s"
for k in tiny-fp32 tiny-int8 large-fp32 large-int8; do echo "  codes $k aarch64 vs x86: ${AGREE[$k]}"; done
echo "  answers of the arm64 agent equal to the x86 agent's for every job: $ANSWERS_SAME"
echo "  total $(( $(date +%s) - T0 )) s; logs in $WORK"
[ "$ANSWERS_SAME" = yes ] || exit 1

#!/usr/bin/env bash
# GPU check for selma's diffusion core, in one go (~5 min on an H100 once built):
#  1. the tiny model: the same image on CPU and on CUDA (f32), max abs pixel diff;
#  2. an SD 1.5-architecture model with random weights (`selma model init
#     --preset sd15-random`): CPU vs CUDA at 128 px, 4 steps;
#  3. timing: SD 1.5 architecture at 512x512, 20 DDIM steps, CFG, on CUDA in
#     f16 and f32 (the binary prints seconds per step).
# Usage: scripts/gpu-check.sh            (builds target/release/selma with --features cuda if absent)
#        SELMA=/path/to/selma scripts/gpu-check.sh
# Env: SKIP_SD15=1 skips parts 2 and 3; WORK=DIR keeps the files there.
set -euo pipefail
cd "$(dirname "$0")/.."
SELMA=${SELMA:-target/release/selma}
if [ ! -x "$SELMA" ]; then
  echo "== building $SELMA with --features cuda"
  cargo build --release --features cuda -p selma
fi
# candle links the CUDA libraries of the toolkit it was built with (cudarc
# dynamic-linking): a binary built with CUDA 11.8 needs libcublas.so.11 at run time.
if ldd "$SELMA" | grep -q "not found"; then
  echo "error: $SELMA misses shared libraries here (build it with this machine's CUDA toolkit):"
  ldd "$SELMA" | grep "not found"
  exit 1
fi
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
echo "== work dir $WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# max / mean absolute difference of two 8-bit RGB PNGs (pure python: zlib + unfilter)
compare() {
  python3 - "$1" "$2" <<'PY'
import sys, zlib, struct
def read(path):
    data = open(path, 'rb').read()
    assert data[:8] == b'\x89PNG\r\n\x1a\n', path
    pos, idat, w = 8, b'', 0
    while pos < len(data):
        n, kind = struct.unpack('>I4s', data[pos:pos + 8]); body = data[pos + 8:pos + 8 + n]; pos += 12 + n
        if kind == b'IHDR': w, h = struct.unpack('>II', body[:8]); assert body[8] == 8 and body[9] == 2
        elif kind == b'IDAT': idat += body
    raw, stride, out, prev = zlib.decompress(idat), w * 3, [], bytearray(w * 3)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - 3] if i >= 3 else 0; b = prev[i]; c = prev[i - 3] if i >= 3 else 0
            if f == 1: line[i] = (line[i] + a) & 255
            elif f == 2: line[i] = (line[i] + b) & 255
            elif f == 3: line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line; prev = line
    return out
x, y = read(sys.argv[1]), read(sys.argv[2])
d = [abs(p - q) for p, q in zip(x, y)]
print(f"   max abs diff {max(d)} / 255, mean {sum(d) / len(d):.4f}, pixels differing {sum(1 for v in d if v)}/{len(d)}")
PY
}

gen() { # model out device dtype size steps
  "$SELMA" generate --model "$1" --out "$2" --device "$3" --dtype "$4" --size "$5" --steps "$6" \
    --prompt "a red cube on a blue table, photo" --negative "blurry" --seed 1 --scheduler ddim \
    2>&1 | grep -E "image\(s\)|error" || true
}

echo "== 1. tiny model: CPU vs CUDA (f32, 64x64, 10 steps)"
[ -d "$WORK/tiny" ] || "$SELMA" model init --preset tiny --seed 0 --out "$WORK/tiny" >/dev/null
gen "$WORK/tiny" "$WORK/tiny-cpu.png" cpu f32 64x64 10
gen "$WORK/tiny" "$WORK/tiny-cuda.png" cuda:0 f32 64x64 10
compare "$WORK/tiny-cpu.png" "$WORK/tiny-cuda.png"
gen "$WORK/tiny" "$WORK/tiny-cuda-f16.png" cuda:0 f16 64x64 10
echo "   (cuda f16 vs cpu f32)"; compare "$WORK/tiny-cpu.png" "$WORK/tiny-cuda-f16.png"

if [ "${SKIP_SD15:-0}" != 1 ]; then
  echo "== 2. SD 1.5 architecture, random weights: CPU vs CUDA (f32, 128x128, 4 steps)"
  if [ ! -d "$WORK/sd15" ]; then
    t0=$SECONDS
    "$SELMA" model init --preset sd15-random --seed 0 --out "$WORK/sd15" >/dev/null
    echo "   init: $((SECONDS - t0)) s"
  fi
  gen "$WORK/sd15" "$WORK/sd15-cpu.png" cpu f32 128x128 4
  gen "$WORK/sd15" "$WORK/sd15-cuda.png" cuda:0 f32 128x128 4
  compare "$WORK/sd15-cpu.png" "$WORK/sd15-cuda.png"
  echo "== 3. SD 1.5 architecture, 512x512, 20 steps, CFG (batch 2 through the UNet) on CUDA"
  for dt in f16 bf16 f32; do
    echo "   $dt:"; gen "$WORK/sd15" "$WORK/sd15-512-$dt.png" cuda:0 "$dt" 512x512 20
  done
fi
echo "== done"

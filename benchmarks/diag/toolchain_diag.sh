#!/usr/bin/env bash
# One-off diagnosis of the segfault in error messages that format numbers (H200 image, 2026-11-26):
# build the extension three ways and run the same two bad calls (CPU op, CUDA op) against each.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
cat > /tmp/repro.py <<'PY'
import sys, torch, svdq  # noqa: F401
dev = sys.argv[1]
x = torch.randn(4, 128, dtype=torch.bfloat16, device=dev)
s = torch.ones(100, dtype=torch.bfloat16, device=dev)  # wrong K: the message formats numbers
d = torch.randn(128, 32, dtype=torch.bfloat16, device=dev)
try:
    torch.ops.svdq.quantize_act(x, s, d, None)
    print(dev, "NO ERROR")
except RuntimeError as e:
    print(dev, "raised OK:", str(e).splitlines()[0][:160])
PY
try() {  # try NAME ENV...
  local name=$1; shift
  rm -f python/svdq/_C*.so
  local t0=$SECONDS
  env "$@" SVDQ_CUDA_ARCHS=90 cmake -S . -B build/diag-$name -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE=$(command -v python3) -DSVDQ_CUDA_ARCHS=90 >/tmp/cfg-$name.log 2>&1 &&
    env "$@" cmake --build build/diag-$name --target _C -j 16 >/tmp/build-$name.log 2>&1 || { echo "$name: build failed"; tail -5 /tmp/build-$name.log; return; }
  echo "== $name ($* ; built in $((SECONDS - t0)) s): $(grep -m1 'CXX compiler identification' /tmp/cfg-$name.log)"
  for dev in cpu cuda; do timeout 30 python3 /tmp/repro.py $dev 2>&1 | tail -1; echo "   $dev rc=${PIPESTATUS[0]}"; done
  nm -DC python/svdq/_C*.so | grep -c " W std::basic_ostream" | sed 's/^/   weak std::basic_ostream symbols: /'
}
try default
try isa_base SVDQ_CPU_ISAS=base
try gcc12 CXX=/usr/bin/g++-12 CUDAHOSTCXX=/usr/bin/g++-12

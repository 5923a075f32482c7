#!/usr/bin/env bash
# The GPU checks in one run, on a machine with an NVIDIA GPU, its driver and a CUDA torch, but
# no vLLM and no network (tests/gpu/prepare_device.sh fills .device/ beforehand). Run from the
# repository root, as root (the engine drops to uid 65534, as in `make demo`), on a machine or
# environment you can throw away: it installs into the torch environment.
#   1. what the machine is (recon.txt);
#   2. harness's missing dependencies from .device/wheels into this interpreter's environment
#      and harness itself (`pip install -e .`); libseccomp and libcuda made findable by the
#      loader's cache where they are not (as the NVIDIA container toolkit does in a pod);
#   3. `harness profile` records the CUDA stand-in engine (tests/gpu/cuda_engine.py) in the
#      full sandbox under the default workload, merged with the shipped engine-cpu.json and
#      engine-cuda.json -> engine-cuda.json (what it adds to the shipped one is printed); the
#      tests below use it;
#   4. the tests in tests/gpu (JUnit XML), the sandboxed engine in `enforce` mode;
#   5. `harness check --json` of the GPU plan.
# Results go to $OUT (default .device/out): device_run.log, recon.txt, engine-cuda.json,
# junit.xml, check.json, events.jsonl (every harness run's events), harness.log.
# DRY_RUN=1 skips the installs: a rehearsal on a machine without a GPU, where the GPU tests
# skip and the recording runs the stand-in on the CPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/.device/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_run.log") 2>&1
RUN=$(mktemp -d /tmp/harness-gpu-run.XXXXXX) && chmod 755 "$RUN" || exit 1
failed=()
step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }
# `ldconfig -p | grep -q` under pipefail: grep's early exit can fail ldconfig with SIGPIPE.
cached() { grep -q "$1" < <(ldconfig -p); }

step "1 recon"
{
  date -u; uname -a; id; "$PY" -VV
  "$PY" -c 'import sys, sysconfig; print(sys.executable, sys.prefix, sysconfig.get_paths()["purelib"])'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  ls -l /dev/nvidia* 2>&1
  ldconfig -p | grep -E 'libseccomp|libcuda\.|libnvidia-ml' || echo "ldconfig: none of them"
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  echo "max_user_namespaces: $(cat /proc/sys/user/max_user_namespaces 2>&1)"
  nproc; free -g
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|uvloop|httpx|anyio|protobuf|pytest|hypothesis|nvidia-ml-py|setuptools) '
  # The engine's uid must run this interpreter and import torch from it (outside the sandbox).
  setpriv --reuid 65534 --regid 65534 --clear-groups "$PY" -c \
    'import torch; print("uid 65534: torch", torch.__version__, "cuda", torch.cuda.is_available())'
} >"$OUT/recon.txt" 2>&1
cat "$OUT/recon.txt"

step "2 install"
if [ "${DRY_RUN:-0}" != 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    .device/wheels/*.whl || failed+=(install)
  # harness itself, as a package of this environment (stage 2 runs `python -I -m
  # runtime.sandbox.exec`, which sees site-packages but not PYTHONPATH).
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || failed+=(install-harness)
  if ! cached 'libseccomp\.so\.2 '; then
    lib=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
    { rm -rf /tmp/libseccomp && dpkg-deb -x .device/debs/libseccomp2_*.deb /tmp/libseccomp \
      && cp -a /tmp/libseccomp/usr/lib/"$lib"/libseccomp.so.2* /usr/local/lib/ && ldconfig \
      && echo "libseccomp: Debian's, copied into /usr/local/lib"; } || failed+=(libseccomp)
  fi
  if ! cached 'libcuda\.so\.1 '; then
    # The engine's environment has no LD_LIBRARY_PATH: the loader's cache must find libcuda.
    dir=$("$PY" -c 'import ctypes, re; ctypes.CDLL("libcuda.so.1"); print(next(m.group(1) for m in map(re.compile(r"(/\S+)/libcuda\.so").search, open("/proc/self/maps")) if m))')
    { echo "$dir" >/etc/ld.so.conf.d/zz-harness-nvidia.conf && ldconfig \
      && echo "libcuda: $dir added to the loader's cache"; } || failed+=(libcuda)
  fi
  if ! setpriv --reuid 65534 --regid 65534 --clear-groups "$PY" -c 'import torch' 2>/dev/null; then
    # A venv of its own only: opening a system prefix (/usr) to others is not this script's call.
    prefix=$("$PY" -c 'import sys; print(sys.prefix)')
    if [ -f "$prefix/pyvenv.cfg" ]; then
      echo "uid 65534 cannot import torch from $prefix: making that venv readable by others"
      chmod -R o+rX "$prefix"
      d=$(dirname "$prefix"); while [ "$d" != / ]; do chmod o+x "$d"; d=$(dirname "$d"); done
    else
      echo "uid 65534 cannot import torch from $prefix (not a venv): give the engine's uid read access"
      failed+=(engine-uid)
    fi
  fi
fi
(cd /tmp && "$PY" -I -c 'import runtime.sandbox.exec, uvicorn, pydantic, openai, pynvml; print("imports ok:", runtime.__file__)') \
  || failed+=(imports)

step "3 record engine-cuda.json"
mkdir -p "$RUN/keep" && chmod 755 "$RUN/keep"
"$PY" -m runtime demo init --dir "$RUN/demo" >/dev/null || failed+=(demo)
sets() {  # the --set arguments that make harness run the stand-in (tests/gpu/test_gpu_sandbox.py)
  "$PY" - "$@" <<'PY'
import sys
from pathlib import Path
from tests.gpu import cuda_engine
from tests.gpu.test_gpu_sandbox import overrides
folder, extra = Path(sys.argv[1]), sys.argv[2:]
script = folder / "cuda-engine"
if not script.exists():
    cuda_engine.install(folder, script.name)
for item in overrides(script, "cuda", *extra):
    print("--set")
    print(item)
PY
}
mapfile -t SETS < <(sets "$RUN" "engine.ready_timeout_s=180")
printf '%s\n' "${SETS[@]}"
merge=(--merge seccomp/engine-cpu.json)
[ -f seccomp/engine-cuda.json ] && merge+=(--merge seccomp/engine-cuda.json)
if [ ${#SETS[@]} -eq 0 ]; then
  failed+=(profile)
elif timeout 180 "$PY" -m runtime profile --config "$RUN/demo/demo.toml" "${SETS[@]}" \
    "${merge[@]}" --out "$OUT/engine-cuda.json" 2>&1 | tee "$RUN/profile.log"; then
  "$PY" -m runtime seccomp check "$OUT/engine-cuda.json"
  "$PY" - "$OUT/engine-cuda.json" <<'PY'
import sys
from pathlib import Path
from runtime import recorder
new = recorder.from_profile(Path(sys.argv[1]))
for name in ("engine-cpu.json", "engine-cuda.json"):
    if (Path("seccomp") / name).is_file():
        old = recorder.from_profile(Path("seccomp") / name)
        added = sorted(new.names - old.names), sorted(new.sockets - old.sockets)
        print(f"beyond {name}: syscalls {added[0]}, sockets (domain, type) {added[1]}")
PY
  if grep -q '^cuda-engine .*"ok": true' "$RUN/profile.log"; then
    # The tests below run the engine in `enforce` mode with it.
    cp "$OUT/engine-cuda.json" seccomp/engine-cuda.json
  elif [ "${DRY_RUN:-0}" != 1 ]; then
    echo "the recorded engine did not run on CUDA (its cuda-engine line above says why)"
    failed+=(profile-not-on-cuda)
  fi
else
  failed+=(profile)
fi

step "4 tests/gpu"
timeout_opt=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && timeout_opt=(--timeout 200)
HARNESS_GPU_KEEP="$RUN/keep" timeout 300 "$PY" -m pytest tests/gpu -v -rs -p no:cacheprovider \
  "${timeout_opt[@]}" --junitxml="$OUT/junit.xml" || failed+=(pytest)

step "5 harness check"
mapfile -t SETS < <(sets "$RUN" "engine.gpu_memory_limit=0.9")
"$PY" -m runtime check --config "$RUN/demo/demo.toml" "${SETS[@]}" --json >"$OUT/check.json" \
  || failed+=(check)

step "collect"
cat "$RUN"/keep/sandbox/*.events >"$OUT/events.jsonl" 2>/dev/null
for log in "$RUN"/keep/sandbox/*.log; do
  echo "### $log"
  tail -c 1000000 "$log"
done >"$OUT/harness.log" 2>/dev/null
ls -la "$OUT"
echo "failed steps: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]

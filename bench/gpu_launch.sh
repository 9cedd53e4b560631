#!/usr/bin/env bash
# The launch bench (bench/bench_launch.py --loopback) on a machine that runs us as root but has no
# sshd, ssh, pdsh or rsync (e.g. a bare GPU machine: one H200, 16 cores): build .launchpkg/ here first
# (bash bench/launchpkg.sh), carry it, then
#
#   OUT=$OUT bash bench/gpu_launch.sh            # SIZES=1,2,4,8 REPS=3 LIMIT_S=250 BENCH_ARGS=...
#   OUT=$OUT bash bench/gpu_launch.sh scaling    # bench/bench_scaling.py (PARTS=scaling,twonodes
#                                                #   SIZES=1,2,4,8 STEPS=300 LIMIT_S=580)
#   OUT=$OUT bash bench/gpu_launch.sh stage      # bench/bench_stage.py --loopback: staging to 1 and
#                                                #   HOSTS=8 hosts (IMAGES="2000 8000" LIMIT_S=170 each)
#
# The bundle's binaries run through wrappers that set LD_LIBRARY_PATH for them alone (in
# /tmp/launchpkg-bin, first on this PATH; rsync and ssh also in /usr/local/bin for the hosts' sessions
# when missing there). The submitting side's Python packages go to /tmp/site.
set -u
cd "$(dirname "$0")/.."
P=$PWD/.launchpkg
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
[ -d "$P/bin" ] || { echo "no $P: run bench/launchpkg.sh where pip and the Debian packages are, and carry it"; exit 2; }
PY=${PY:-python3}   # CPython 3.12 (the wheels' version); PY=.venv/bin/python SKIP_PIP=1 to try it here
if [ -z "${SKIP_PIP:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site "$P"/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
# bytecode for our modules, as a checkout has after its first run (the image sets
# PYTHONDONTWRITEBYTECODE and this copy of the tree has no __pycache__: without it every
# `python -m cluster ...` compiles its modules again; pip writes the wheels' bytecode above)
$PY -m compileall -q -j 0 cluster bench train >/dev/null
# and for torch and torchvision, where the image was built without it (pip compiles by default;
# without bytecode every interpreter that imports torch compiles it again); staging needs neither
[ "${1:-}" = stage ] || $PY - <<'PYEOF'
import importlib.util, os, subprocess, sys, time
def imp(pkg):
    t = time.time(); subprocess.run([sys.executable, "-c", f"import {pkg}"], check=True); return time.time() - t
for pkg in ("torch", "torchvision"):
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        continue
    d = spec.submodule_search_locations[0]
    before = imp(pkg)
    if os.path.isdir(os.path.join(d, "__pycache__")):
        print(f"{pkg} has bytecode: import {before:.2f} s")
        continue
    t = time.time()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", d], stdout=subprocess.DEVNULL)
    took = time.time() - t
    print(f"{pkg} had no bytecode: import {before:.2f} s; compiled in {took:.0f} s; import now {imp(pkg):.2f} s")
PYEOF
W=/tmp/launchpkg-bin
mkdir -p "$W"
wrap() {   # wrap NAME BINARY [ARGV0]
    printf '#!/bin/bash\nLD_LIBRARY_PATH=%q exec -a %q %q "$@"\n' "$P/lib" "${3:-$1}" "$P/bin/$2" > "$W/$1"
    chmod 755 "$W/$1"
}
wrap ssh ssh; wrap ssh-keygen ssh-keygen; wrap rsync rsync; wrap pdsh pdsh.bin pdsh; wrap sshd sshd "$P/bin/sshd"
export PATH="$W:$PATH" BENCH_SSHD="$W/sshd"
[ -e /usr/local/bin/rsync ] || [ -e /usr/bin/rsync ] || cp "$W/rsync" /usr/local/bin/rsync
# and ssh: a copy between hosts (data.peers) is an rsync over ssh run in a host's session
[ -e /usr/local/bin/ssh ] || [ -e /usr/bin/ssh ] || cp "$W/ssh" /usr/local/bin/ssh
mkdir -p /usr/lib/x86_64-linux-gnu/pdsh && cp -n "$P"/pdsh/*.so /usr/lib/x86_64-linux-gnu/pdsh/
[ -x /usr/lib/openssh/sftp-server ] || { mkdir -p /usr/lib/openssh && cp "$P/bin/sftp-server" /usr/lib/openssh/; }
getent passwd sshd >/dev/null || useradd -r -M -d /run/sshd -s /usr/sbin/nologin sshd 2>/dev/null \
    || echo 'sshd:x:997:65534::/run/sshd:/usr/sbin/nologin' >> /etc/passwd
mkdir -p /run/sshd && chmod 755 /run/sshd
"$W/sshd" -V 2>&1 | head -1; "$W/pdsh" -V 2>&1 | head -1; "$W/rsync" --version | head -1
if [ "${1:-}" = scaling ]; then
    exec timeout "${LIMIT_S:-580}" $PY bench/bench_scaling.py --out "$OUT" --parts "${PARTS:-scaling,twonodes}" \
        --sizes "${SIZES:-1,2,4,8}" --steps "${STEPS:-300}" --budget-s "$(( ${LIMIT_S:-580} - 10 ))" ${BENCH_ARGS:-}
fi
if [ "${1:-}" = stage ]; then
    # one run per set size, each under its own limit (its TERM still writes what it measured)
    rc=0
    { echo "$(nproc) CPUs; /tmp: $(df -h /tmp | tail -1)"
      for n in ${IMAGES:-2000 8000}; do
          timeout -k 20 "${LIMIT_S:-170}" $PY bench/bench_stage.py --loopback "${HOSTS:-8}" --images "$n" \
              --out "$OUT/images-$n" ${BENCH_ARGS:-} || rc=$?
      done; exit $rc; } 2>&1 | tee "$OUT/log.txt"
    exit "${PIPESTATUS[0]}"
fi
shared=""
git rev-parse --git-dir >/dev/null 2>&1 || shared=--shared-fs   # no git checkout here: the hosts use this one
timeout "${LIMIT_S:-250}" $PY bench/bench_launch.py --loopback $shared --sizes "${SIZES:-1,2,4,8}" \
    --reps "${REPS:-3}" --log-seconds "${LOG_S:-10}" --out "$OUT" ${BENCH_ARGS:-}

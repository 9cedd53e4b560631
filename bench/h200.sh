#!/usr/bin/env bash
# Everything for one GPU host, in one command (any GPU box):
#
#   bash bench/h200.sh                 # env + bench (plan "current": verify, naive, train/ +- tune_kernels)
#   PLAN=first bash bench/h200.sh      # the first round's plan
#   PLAN=tune bash bench/h200.sh       # the second round of variants (see bench/bench_train.py)
#   bash bench/h200.sh env bench       # named steps, in order
#   bash bench/h200.sh env data        # real data: seed loop, synthetic, PIL and GPU decode (bench_data.py)
#   bash bench/h200.sh env search final  # step variants (bench/step_variants.py), then the faster
#                                        # of the fast_stem settings through train/, twice, + verify
#
# Results go under $OUT (default ./bench-out): env.txt, results.json, results.md, logs.txt.
# To add a step (e.g. `make submit JOB=resnet50`), write a function step_<name> below and pass
# its name; every step gets the time left in $BUDGET_S and must not write more than 8 files
# in total under $OUT with the others.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET_S=${BUDGET_S:-585}
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

step_env() {
    {
        nvidia-smi
        python3 -c 'import sys, torch, torchvision; print(sys.version); print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
        python3 -c 'import yaml' 2>/dev/null && echo "pyyaml: yes" || echo "pyyaml: no"
        env | grep -E '^(NCCL_|TORCH_SYMM|NVSHMEM_)' | sort
        nproc
    } > "$OUT/env.txt" 2>&1
    tail -n 12 "$OUT/env.txt"
}

step_bench() {
    python3 bench/bench_train.py --out "$OUT" --plan "${PLAN:-current}" --budget-s "$(left)" ${BENCH_ARGS:-}
}

step_search() {
    python3 bench/step_variants.py --out "$OUT" --budget-s "${SEARCH_S:-320}" --limit-s 150 \
        --variants "${VARIANTS:-noddp-ro,stem-both,stem-both-cdt,stem-conv,stem-pool}"
}

step_final() {
    # the train/ variant matching the fastest of step_search's: fast_stem (with tune_kernels if
    # that was over 1% faster), or plain if the stem did not help
    local best
    best=$(python3 - "$OUT/variants.json" <<'PY'
import json, sys
r = {v["name"]: v.get("img_s", 0) for v in json.load(open(sys.argv[1]))}
base, fast, tuned = r.get("noddp-ro", 0), r.get("stem-both", 0), r.get("stem-both-cdt", 0)
print("train-fast-tuned-b512" if tuned > 1.01 * max(fast, base) else
      "train-fast-b512" if fast >= base else "train-plain-b512")
PY
)
    echo "final: $best"
    PLAN="verify,$best,$best@2" step_bench
}

step_round3() {
    # the max-pool backward as a Triton kernel: alone, then in the step against Inductor's, a
    # profile, and train/ itself (torchrun) after the correctness check
    python3 bench/step_variants.py --out "$OUT" --budget-s "${SEARCH_S:-330}" --limit-s 160 \
        --variants "${VARIANTS:-maxpool-micro,stem-both,stem-both-inductor,stem-both-profile}"
    PLAN="${FINAL:-verify,train-fast-b512}" step_bench
}

step_data() {
    # real data against synthetic (bench/bench_data.py): generated JPEGs, pack, GPU-vs-CPU check,
    # the seed article's loop, train/ on synthetic, PIL and nvJPEG paths, at most $CORES cores.
    # MPS=1: under CUDA's multi-process service (its daemon started here and stopped after), so
    # that the input process's kernels and the training's run side by side instead of taking turns
    local rc=0
    if [ "${MPS:-0}" = 1 ]; then
        export CUDA_MPS_PIPE_DIRECTORY=/tmp/bench-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/bench-mps/log
        mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
        nvidia-cuda-mps-control -d || { echo "MPS: nvidia-cuda-mps-control -d failed"; return 1; }
    fi
    python3 bench/bench_data.py --out "$OUT" --cores "${CORES:-8}" --images "${IMAGES:-25600}" \
        --steps "${STEPS:-150}" --budget-s "$(left)" ${BENCH_ARGS:-} || rc=$?
    if [ "${MPS:-0}" = 1 ]; then
        echo quit | nvidia-cuda-mps-control
        tail -n 5 "$CUDA_MPS_LOG_DIRECTORY/control.log" 2>/dev/null
    fi
    return $rc
}

step_probe() {
    # can this machine host the launch bench (network namespaces, sshd, pdsh)?
    {
        id -u; nproc; uname -r
        for t in ip unshare sshd pdsh rsync; do printf '%s: %s\n' "$t" "$(command -v $t || echo missing)"; done
        unshare -n true && echo "unshare -n: ok" || echo "unshare -n: failed"
        ip netns add benchprobe 2>&1 && ip netns exec benchprobe ip link set lo up 2>&1 && echo "netns: ok"
        ip netns del benchprobe 2>/dev/null
        ip link add bprobe0 type veth peer name bprobe1 2>&1 && echo "veth: ok"; ip link del bprobe0 2>/dev/null
    } > "$OUT/probe.txt" 2>&1
    cat "$OUT/probe.txt"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env bench)
rc=0
for s in "${steps[@]}"; do
    echo "=== step $s ($(left) s left)"
    "step_$s" || rc=$?
done
exit $rc

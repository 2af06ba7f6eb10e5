#!/usr/bin/env bash
# One GPU session's checks, in one command: what only an accelerator can show.
#
#  1. benchmarks/paper_round.py: the paper-scale CIFAR-10 / ResNet-18 FedBiF round (10 clients x
#     5 epochs x 5,000 images), vmap vs sequential, TFLOP/s against the card's matmul peak.
#  2. FedAvg and FedBiF-1/4 on real CIFAR-10 with ResNet-18 (configs/cifar10_resnet18.py: the
#     paper's lr 0.1, batch 64, 5 local epochs, 10 IID clients), both at once on the one GPU
#     (each with 40% of its memory), each for RUN_SECONDS of wall time; metrics.jsonl keeps every
#     finished round, so a run cut off by the time limit still reports its curve.
#
# Usage (repo root; DATA is a CIFAR-10 .npz in the layout of fedbif_jax/data/sources.py):
#   DATA=../shared/data/cifar10.npz OUT=/tmp/gpu_study bash benchmarks/gpu_study.sh
#   SMOKE=1 DATA=../shared/data/cifar10.npz bash benchmarks/gpu_study.sh   # a CPU dry run
# Knobs (environment): TEST_SUBSET (test images, default all), RUN_SECONDS (default 300),
# PAPER_SECONDS (the round benchmark's limit, default 170), EVAL_EVERY (default 2).
# Writes to OUT: paper_round.json/.log, {fedavg,fedbif}.log, {fedavg,fedbif}_metrics.jsonl.
set -u
: "${DATA:?set DATA to a CIFAR-10 .npz}"
OUT=${OUT:-/tmp/gpu_study}
RUN_SECONDS=${RUN_SECONDS:-300}
PAPER_SECONDS=${PAPER_SECONDS:-170}
EVAL_EVERY=${EVAL_EVERY:-2}
TEST_SUBSET=${TEST_SUBSET:-0}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())" || exit 1

smoke_round=() smoke_train=()
if [ "${SMOKE:-0}" = 1 ]; then
  smoke_round=(--smoke)
  smoke_train=(--config.num_clients=2 --config.data.train_subset=64 --config.batch_size=16
               --config.local_epochs=1 --config.model.name=cnn --config.rounds=2)
fi

timeout "$PAPER_SECONDS" $PY benchmarks/paper_round.py "${smoke_round[@]}" \
    --out="$OUT/paper_round.json" > "$OUT/paper_round.log" 2>&1
echo "paper_round: exit $?"; tail -n 4 "$OUT/paper_round.log" | cut -c1-400

common=(--config=configs/cifar10_resnet18.py --config.data.source=npz "--config.data.path=$DATA"
        "--config.data.test_subset=$TEST_SUBSET" --config.checkpoint_every=0
        "--config.eval_every=$EVAL_EVERY" "${smoke_train[@]}")
for algorithm in fedavg fedbif; do
  rm -rf "/tmp/gpu_study_$algorithm"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 timeout "$RUN_SECONDS" $PY launch.py "${common[@]}" \
      "--config.algorithm=$algorithm" "--workdir=/tmp/gpu_study_$algorithm" \
      > "$OUT/$algorithm.log" 2>&1 &
done
wait
for algorithm in fedavg fedbif; do
  cp "/tmp/gpu_study_$algorithm/metrics.jsonl" "$OUT/${algorithm}_metrics.jsonl" 2>/dev/null
  echo "$algorithm: $(grep -c '"round"' "$OUT/${algorithm}_metrics.jsonl" 2>/dev/null) rounds"
  grep -E "round [0-9]+/" "$OUT/$algorithm.log" | tail -n 3 | cut -c1-300
  grep -iE "error|Traceback" "$OUT/$algorithm.log" | head -n 3
done

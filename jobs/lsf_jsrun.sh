#!/usr/bin/env bash
# LSF (Summit-class), CPU path: resource sets of one core each, one rank per resource set.
# Submit: bsub jobs/lsf_jsrun.sh   (edit the variables below first)
#BSUB -P CHANGE_ME
#BSUB -nnodes 2
#BSUB -W 60
#BSUB -J spinifel
#BSUB -o spinifel-%J.log
set -euo pipefail

CONFIG=${CONFIG:-examples/2cex.toml}
DATASET=${DATASET:-2cex.h5}
OUT=${OUT:-spinifel_out_${LSB_JOBID:-manual}}
NODES=${NODES:-2}
RANKS_PER_NODE=${RANKS_PER_NODE:-42}
THREADS_PER_RANK=1

export OMP_NUM_THREADS=$THREADS_PER_RANK OPENBLAS_NUM_THREADS=$THREADS_PER_RANK
mkdir -p "$OUT"
{
  date
  echo "job ${LSB_JOBID:-none} nodes $NODES ranks/node $RANKS_PER_NODE"
  (module list 2>&1 || true)
  spinifel-mpi --version
} > "$OUT/environment.txt"

jsrun -n "$((NODES * RANKS_PER_NODE))" -a 1 -c "$THREADS_PER_RANK" -b packed:1 \
  spinifel-mpi run "$CONFIG" --set "data.path=$DATASET" --out "$OUT"

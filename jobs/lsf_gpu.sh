#!/usr/bin/env bash
# LSF (Summit-class: 6 GPUs and 42 cores per node), GPU path: 6 resource sets per node,
# each one GPU, 7 cores and one MPI rank. jsrun makes each rank see only its own GPU
# (device 0 for every rank: spinifel-mpi's node-local binding then has nothing to choose).
# Submit: bsub jobs/lsf_gpu.sh   (edit the variables below first)
#BSUB -P CHANGE_ME
#BSUB -nnodes 2
#BSUB -W 60
#BSUB -J spinifel-gpu
#BSUB -o spinifel-gpu-%J.log
set -euo pipefail

CONFIG=${CONFIG:-examples/2cex.toml}
DATASET=${DATASET:-2cex.h5}
OUT=${OUT:-spinifel_out_${LSB_JOBID:-manual}}
NODES=${NODES:-2}
SETS_PER_NODE=${SETS_PER_NODE:-6}
THREADS_PER_RANK=${THREADS_PER_RANK:-7}
# cupy: fail loudly if a rank finds no GPU; auto: fall back to the CPU path (dry runs).
BACKEND=${BACKEND:-cupy}
# true only with a CUDA-aware MPI (Spectrum MPI needs jsrun --smpiargs="-gpu" then).
CUDA_AWARE_MPI=${CUDA_AWARE_MPI:-false}

export OMP_NUM_THREADS=$THREADS_PER_RANK OPENBLAS_NUM_THREADS=$THREADS_PER_RANK
mkdir -p "$OUT"
{
  date
  echo "job ${LSB_JOBID:-none} nodes $NODES resource sets/node $SETS_PER_NODE backend $BACKEND"
  (module list 2>&1 || true)
  (nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv 2>&1 || true)
  spinifel-mpi --version
  (python -c 'import cupy, cufinufft; print("cupy", cupy.__version__, "cufinufft", cufinufft.__version__)' 2>&1 || true)
} > "$OUT/environment.txt"

jsrun -n "$((NODES * SETS_PER_NODE))" -a 1 -g 1 -c "$THREADS_PER_RANK" -b packed:"$THREADS_PER_RANK" \
  spinifel-mpi run "$CONFIG" --set "data.path=$DATASET" --set "runtime.backend=$BACKEND" \
  --set "runtime.cuda_aware_mpi=$CUDA_AWARE_MPI" \
  --set "runtime.threads_per_rank=$THREADS_PER_RANK" --out "$OUT"

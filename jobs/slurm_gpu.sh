#!/usr/bin/env bash
# SLURM, GPU nodes (Perlmutter-class: 4 GPUs per node): one MPI rank per GPU.
# Every rank sees all GPUs of its node (--gpu-bind=none) and spinifel-mpi binds it to
# GPU (node-local rank mod visible GPUs), from the MPI shared-memory split.
# Submit: sbatch jobs/slurm_gpu.sh   (edit the variables below first)
#SBATCH --job-name=spinifel-gpu
#SBATCH --account=CHANGE_ME
#SBATCH --constraint=gpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=01:00:00
#SBATCH --output=spinifel-gpu-%j.log
set -euo pipefail

CONFIG=${CONFIG:-examples/2cex.toml}
DATASET=${DATASET:-2cex.h5}
OUT=${OUT:-spinifel_out_${SLURM_JOB_ID:-manual}}
# cupy: fail loudly if a rank finds no GPU; auto: fall back to the CPU path (dry runs on a
# login node).
BACKEND=${BACKEND:-cupy}
# true only with a CUDA-aware MPI (device buffers straight to MPI); false stages via host.
CUDA_AWARE_MPI=${CUDA_AWARE_MPI:-false}
THREADS_PER_RANK=${SLURM_CPUS_PER_TASK:-16}

export OMP_NUM_THREADS=$THREADS_PER_RANK OPENBLAS_NUM_THREADS=$THREADS_PER_RANK MKL_NUM_THREADS=$THREADS_PER_RANK
mkdir -p "$OUT"
{
  date
  echo "job ${SLURM_JOB_ID:-none} nodes ${SLURM_JOB_NUM_NODES:-?} tasks ${SLURM_NTASKS:-?} backend $BACKEND"
  (module list 2>&1 || true)
  (nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv 2>&1 || true)
  spinifel-mpi --version
  python -c 'import mpi4py, numpy; print("mpi4py", mpi4py.__version__, "numpy", numpy.__version__)'
  (python -c 'import cupy, cufinufft; print("cupy", cupy.__version__, "cufinufft", cufinufft.__version__)' 2>&1 || true)
} > "$OUT/environment.txt"

srun --gpus-per-task=1 --gpu-bind=none --cpu-bind=cores spinifel-mpi run "$CONFIG" \
  --set "data.path=$DATASET" --set "runtime.backend=$BACKEND" \
  --set "runtime.cuda_aware_mpi=$CUDA_AWARE_MPI" \
  --set "runtime.threads_per_rank=$THREADS_PER_RANK" --out "$OUT"

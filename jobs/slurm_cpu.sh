#!/usr/bin/env bash
# SLURM, CPU nodes: one MPI rank per core, one BLAS/FFT/NUFFT thread per rank.
# Submit: sbatch jobs/slurm_cpu.sh   (edit the variables below first)
#SBATCH --job-name=spinifel
#SBATCH --account=CHANGE_ME
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=64
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=spinifel-%j.log
set -euo pipefail

CONFIG=${CONFIG:-examples/2cex.toml}
DATASET=${DATASET:-2cex.h5}
OUT=${OUT:-spinifel_out_${SLURM_JOB_ID:-manual}}
THREADS_PER_RANK=${SLURM_CPUS_PER_TASK:-1}

export OMP_NUM_THREADS=$THREADS_PER_RANK OPENBLAS_NUM_THREADS=$THREADS_PER_RANK MKL_NUM_THREADS=$THREADS_PER_RANK
mkdir -p "$OUT"
{
  date
  echo "job ${SLURM_JOB_ID:-none} nodes ${SLURM_JOB_NUM_NODES:-?} tasks ${SLURM_NTASKS:-?}"
  (module list 2>&1 || true)
  spinifel-mpi --version
  python -c 'import mpi4py, numpy, finufft; print("mpi4py", mpi4py.__version__, "numpy", numpy.__version__, "finufft", finufft.__version__)'
} > "$OUT/environment.txt"

srun --cpu-bind=cores spinifel-mpi run "$CONFIG" --set "data.path=$DATASET" \
  --set "runtime.threads_per_rank=$THREADS_PER_RANK" --out "$OUT"

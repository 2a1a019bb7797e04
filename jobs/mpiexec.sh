#!/usr/bin/env bash
# Generic launcher: one MPI rank per core, one BLAS/FFT thread per rank.
# Edit the variables, then: bash jobs/mpiexec.sh
set -euo pipefail
NRANKS=${NRANKS:-2}
CONFIG=${CONFIG:-examples/quickstart.toml}
DATASET=${DATASET:-quickstart.h5}
OUT=${OUT:-spinifel_out}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"
{ date; spinifel-mpi --version; python -c 'import mpi4py; print("mpi4py", mpi4py.__version__)'; } > "$OUT/environment.txt"
mpiexec -n "$NRANKS" spinifel-mpi run "$CONFIG" --set "data.path=$DATASET" --out "$OUT"

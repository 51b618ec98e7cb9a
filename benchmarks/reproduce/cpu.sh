#!/usr/bin/env bash
# The CPU reproduction of the paper's tables and figures: runs the cpu-* experiment grids (each resumes: finished cells
# are skipped, an interrupted one continues from its checkpoint) and writes each report under results/NAME/.
#   bash benchmarks/reproduce/cpu.sh                      all grids, in this order (many hours on 2 cores)
#   bash benchmarks/reproduce/cpu.sh cpu-table5-mnist ... only these, in the order given
# Two lanes in parallel, one thread each, is the fastest use of 2 cores. Two lanes may run the same grid: each cell
# is claimed by one process (toolkit/experiments/claims.py) and the other passes on to the next cell:
#   OMP_NUM_THREADS=1 bash benchmarks/reproduce/cpu.sh cpu-table4-mnist &
#   OMP_NUM_THREADS=1 bash benchmarks/reproduce/cpu.sh cpu-table4-mnist
set -euo pipefail
cd "$(dirname "$0")/../.."
MTK=${MTK:-.venv/bin/mtk}
export MTK_DATA=${MTK_DATA:-$(realpath ../shared/data)}
GRIDS=("$@")
if [ ${#GRIDS[@]} -eq 0 ]; then
  GRIDS=(cpu-table2-mnist cpu-table4-mnist-2m cpu-table5-mnist cpu-table4-mnist cpu-baselines-mnist cpu-fig2-mnist
         cpu-fig3-mnist cpu-table5-cifar10 cpu-table2-cifar10 cpu-table1-cifar10)
fi
for name in "${GRIDS[@]}"; do
  $MTK run "specs/experiments/$name.json"
  $MTK report "specs/experiments/$name.json" > /dev/null
  echo "[reproduce] $name: results/$name/report.md"
done

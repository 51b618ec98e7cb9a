#!/usr/bin/env bash
# MNIST extraction results (issue 4): Knockoff Nets and DFME against the undefended LeNet5 target and the MISLEADER
# ensemble, each within an hour on the 2-core CPU. Needs runs/targets/mnist-lenet5 and runs/defenses/mnist-misleader
# (mtk defend specs/mnist-misleader.json builds both). Every step resumes from its checkpoint if re-run.
#   bash benchmarks/mnist_extraction/run.sh      (DFME_BUDGET=... to change the DFME budget; paper: 2000000)
set -euo pipefail
cd "$(dirname "$0")/../.."
MTK=${MTK:-.venv/bin/mtk}
DFME_BUDGET=${DFME_BUDGET:-300000}
DEF=runs/defenses/mnist-misleader
$MTK extract specs/threats/mnist-knockoff.json
$MTK extract specs/threats/mnist-knockoff.json --victim $DEF --name mnist-knockoff-vs-misleader
$MTK extract specs/threats/mnist-dfme.json --budget "$DFME_BUDGET" --name "mnist-dfme-$DFME_BUDGET"
$MTK extract specs/threats/mnist-dfme.json --budget "$DFME_BUDGET" --victim $DEF --name "mnist-dfme-$DFME_BUDGET-vs-misleader"
$MTK extraction runs/attacks/mnist-knockoff runs/attacks/mnist-knockoff-vs-misleader \
  "runs/attacks/mnist-dfme-$DFME_BUDGET" "runs/attacks/mnist-dfme-$DFME_BUDGET-vs-misleader" --out results/mnist-extraction

#!/usr/bin/env bash
# The benchmark's peer libraries (scripts/bench.py, scripts/peers.py), into the active Python environment,
# without touching its torch.
#
# Every peer here requires torch, and backpack-for-pytorch (pulled by curvlinops) torchvision too: left to
# pip's resolver they can bring another torch build that replaces the installed one (`pip install
# curvlinops-for-pytorch` does). So each is installed with --no-deps at a pinned version, and so are their
# pure-Python dependencies (also in setup.cfg's `bench` extra, which holds nothing that requires torch), so
# that this script works on its own. The pins were checked to import and run with torch 2.13.0+cpu.
# Install curvscope and its torch first:
#     pip install torch==2.13.0 && pip install -e ".[bench]" && bash scripts/install_bench_peers.sh
# backpack's own requirements torchvision and unfoldNd are left out on purpose: curvlinops' GGN and
# empirical Fisher operators do not use them (`pip check` names them as missing; nothing here imports them).
set -euo pipefail

PYTHON=${PYTHON:-python}
before=$("$PYTHON" -c "import torch; print(torch.__version__)")

"$PYTHON" -m pip install --no-deps \
    "pyhessian==0.1" \
    "hessian-eigenthings==1.0.0a5" \
    "curvlinops-for-pytorch==3.0.1" \
    "backpack-for-pytorch==1.7.1" \
    "einconv==0.1.0" \
    "linear-operator==0.6.1" \
    "einops==0.8.2" \
    "opt-einsum==3.4.0" \
    "jaxtyping==0.3.11" \
    "wadler-lindig==0.1.8" \
    "tqdm==4.70.1"

after=$("$PYTHON" -c "import torch, curvlinops, pyhessian, hessian_eigenthings; print(torch.__version__)")
if [ "$before" != "$after" ]; then
    echo "install_bench_peers.sh: torch changed from $before to $after" >&2
    exit 1
fi
echo "bench peers installed; torch is still $after"

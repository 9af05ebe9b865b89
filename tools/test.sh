#!/usr/bin/env bash
# The whole test suite, in order: notebooks and library in sync, notebooks clean, notebook tests, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
snap() { find "$1" -name "$2" -not -path '*/.ipynb_checkpoints/*' -type f -print0 | sort -z | xargs -0 sha256sum; }
drift() { diff <(echo "$1") <(echo "$2") | grep '^[<>]' | awk '{print $3}' | sort -u; }

echo "== 1/5 nbdev-export leaves the library unchanged"
before=$(snap deepstable_fastai '*.py'); nbdev-export; after=$(snap deepstable_fastai '*.py')
if [ "$before" != "$after" ]; then echo "FAIL: nbdev-export changed:"; drift "$before" "$after"; exit 1; fi

echo "== 2/5 nbdev-clean leaves the notebooks unchanged"
before=$(snap nbs '*.ipynb'); nbdev-clean; after=$(snap nbs '*.ipynb')
if [ "$before" != "$after" ]; then echo "FAIL: nbdev-clean changed:"; drift "$before" "$after"; exit 1; fi

echo "== 3/5 the Spanish tutorial runs the English one's code; nbdev-test (2 workers)"
python tools/sync_tutorials.py --check
# one BLAS thread per worker: two workers on two cores, no oversubscription
OMP_NUM_THREADS=1 nbdev-test --n-workers 2 --timing

echo "== 4/5 the monitor and guard notebooks again on the device path (the compiled statistics that CUDA tensors take)"
DEEPSTABLE_KERNEL=compiled OMP_NUM_THREADS=1 nbdev-test --n-workers 2 --file-re '^0[56]_' --timing

echo "== 5/5 pytest tests"
set +e; python -m pytest tests -q -p no:cacheprovider "$@"; rc=$?; set -e
# pytest exits 5 when it collected no test: for this suite that means tests went missing, so fail loudly.
if [ $rc -eq 5 ]; then echo "FAIL: pytest collected no tests"; exit 1; fi
exit $rc

"""One tutorial, two languages: copy the code of `why_explode.ipynb` into its Spanish twin `por_que_explotan.ipynb`.

The two notebooks have the same cells in the same order. The English one owns every code cell; the Spanish one owns
its markdown cells and one code cell of its own, the plot labels (a `#| hide` cell that starts with `# plot labels`).
Edit the code in English, run `python tools/sync_tutorials.py`, then execute and clean the Spanish notebook.
`--check` only reports (exit 1) where the twin has drifted; `tools/test.sh` runs it.
"""
import sys, nbformat
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent/'nbs'/'tutorials'
SRC,DST = ROOT/'why_explode.ipynb',ROOT/'por_que_explotan.ipynb'
LABELS = '#| hide\n# plot labels'

def _own(c): return c.cell_type=='markdown' or c.source.startswith(LABELS)

def drift(src=SRC, dst=DST):
    "Cells where `dst` differs from `src` in what `src` owns; an empty list when in sync"
    a,b = nbformat.read(src, 4),nbformat.read(dst, 4)
    if [c.cell_type for c in a.cells]!=[c.cell_type for c in b.cells]: return ['the cell types or their order differ']
    return [f'cell {i}' for i,(x,y) in enumerate(zip(a.cells, b.cells)) if not _own(x) and x.source!=y.source]

def sync(src=SRC, dst=DST):
    "Copy `src`'s code cells (all but the plot labels) into `dst`; returns the indices of the cells it changed"
    a,b = nbformat.read(src, 4),nbformat.read(dst, 4)
    if [c.cell_type for c in a.cells]!=[c.cell_type for c in b.cells]:
        raise ValueError(f"{dst.name} must have the cells of {src.name} in the same order; add the new markdown cells first")
    changed = [i for i,(x,y) in enumerate(zip(a.cells, b.cells)) if not _own(x) and x.source!=y.source]
    for i in changed: b.cells[i].source,b.cells[i].outputs = a.cells[i].source,[]
    if changed: nbformat.write(b, dst)
    return changed

if __name__=='__main__':
    if '--check' in sys.argv:
        d = drift()
        if d: print(f"{DST.name} drifted from {SRC.name} ({', '.join(d)}): run python tools/sync_tutorials.py"); sys.exit(1)
    else: print(f"copied cells {sync()} into {DST.name}; now execute it and run nbdev-clean")

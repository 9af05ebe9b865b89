"""Flag notebook cells that `nbdev-proc-nbs` would execute out of context: code cells that mix imports with other code.

nbdev's docs processor runs every exported cell and every cell containing an import, skipping the rest; such a
cell then fails on names that only the skipped cells define. Usage: python tools/lint_nbs.py [nbs]
"""
import ast, json, sys
from pathlib import Path

def offenders(nb_path):
    nb = json.loads(Path(nb_path).read_text())
    for i,c in enumerate(nb['cells']):
        if c['cell_type']!='code': continue
        src = ''.join(c['source'])
        if any(l.strip().startswith(('#| export','#|export','#| exporti','#| exports','#| eval: false')) for l in src.splitlines()[:3]): continue
        if 'nbdev_export()' in src: continue
        try: tree = ast.parse('\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('%','!'))))
        except SyntaxError: continue
        imps = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        if imps and any(not isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body): yield i, src.splitlines()[0][:80]

if __name__=='__main__':
    root = Path(sys.argv[1] if len(sys.argv)>1 else 'nbs')
    bad = [(p,i,l) for p in sorted(root.rglob('*.ipynb')) if '.ipynb_checkpoints' not in p.parts for i,l in offenders(p)]
    for p,i,l in bad: print(f'{p}: cell {i}: {l}')
    sys.exit(1 if bad else 0)

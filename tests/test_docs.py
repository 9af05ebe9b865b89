"Docs site, README and CI wiring: what notebooks cannot check about themselves."
import html, importlib, inspect, re, sys
from pathlib import Path
from conftest import ROOT, run_py

def _text(p): return ' '.join(html.unescape(re.sub(r'<[^>]+>', ' ', Path(p).read_text())).split())
def _norm(s): return ''.join(s.replace('`', '').split())

def _modules():
    from deepstable_fastai._modidx import d
    return sorted({v[1][:-3].replace('/', '.') for syms in d['syms'].values() for v in syms.values()})

def test_site_pages(docs_site):
    docs = ROOT/'_docs'
    assert (docs/'index.html').exists()
    nbs = [p for p in (ROOT/'nbs').glob('[0-9]*.ipynb')]
    for nb in nbs:
        page = docs/re.sub(r'^\d+[a-zA-Z0-9]*_', '', nb.stem.lower())
        assert page.with_suffix('.html').exists(), f'no page for {nb.name}'

def test_every_public_symbol_documented(docs_site):
    "Each name in a module's `__all__` appears in its page with its signature's parameters and its docstring"
    missing = []
    for modname in _modules():
        mod = importlib.import_module(modname)
        page = ROOT/'_docs'/f"{modname.split('.')[-1]}.html"
        assert page.exists(), f'no docs page for {modname}'
        txt = _text(page)
        for name in getattr(mod, '__all__', []):
            o = getattr(mod, name)
            if not callable(o) or not getattr(o, '__module__', '').startswith('deepstable_fastai'): continue
            doc = inspect.getdoc(o)
            if name not in txt: missing.append(f'{modname}.{name}: name'); continue
            if doc and _norm(doc.splitlines()[0]) not in _norm(txt): missing.append(f'{modname}.{name}: docstring')
            try: params = [p for p in inspect.signature(o).parameters if p not in ('self','args','kwargs')]
            except (TypeError, ValueError): params = []
            for p in params[:4]:
                if p not in txt: missing.append(f'{modname}.{name}: parameter {p}')
    assert not missing, '\n'.join(missing)

def test_readme_in_sync():
    sys.path.insert(0, str(ROOT/'tools'))
    import build_docs
    assert (ROOT/'README.md').read_text() == build_docs.readme_text(), 'README.md is stale: run python tools/build_docs.py --readme'

def _readme_blocks(lang):
    return re.findall(rf'```{lang}\n(.*?)```', (ROOT/'README.md').read_text(), re.S)

def test_readme_quick_start_has_two_commands():
    qs = (ROOT/'README.md').read_text().split('## Quick start')[1].split('\n## ')[0]
    cmds = re.findall(r'```sh\n(.*?)```', qs, re.S)
    assert len(cmds)==2 and all(len(c.strip().splitlines())==1 for c in cmds), cmds

def test_ci_runs_readme_test_command():
    qs = (ROOT/'README.md').read_text().split('## Quick start')[1]
    test_cmd = re.findall(r'```sh\n(.*?)```', qs, re.S)[1].strip()
    assert test_cmd in (ROOT/'.ci'/'run').read_text().splitlines()

def test_readme_example_runs(tmp_path):
    blocks = _readme_blocks('python')
    assert blocks, 'README has no python example'
    code = '\n'.join(blocks)
    assert len(blocks[0].strip().splitlines()) <= 12, 'the first usage example should stay about 10 lines'
    r = run_py(code, cwd=tmp_path, env={'MPLBACKEND': 'Agg'})
    assert r.returncode==0, r.stderr[-3000:]

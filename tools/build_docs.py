"""Build the docs site into `_docs/` without Quarto: `nbdev-proc-nbs`, then nbconvert each processed notebook to HTML.

Usage: python tools/build_docs.py [--skip-proc] [--readme]   (--readme only rewrites README.md)
Where Quarto exists, `nbdev-docs` builds the full site from the same notebooks and `nbs/_quarto.yml`.
"""
import json, re, shutil, subprocess, sys, html
from pathlib import Path

root = Path(__file__).resolve().parent.parent
proc, dest = root/'_proc', root/'_docs'
_re_dir = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*)$')

def page_name(p):
    "`00_data.ipynb` -> `data.html`, as nbdev names pages"
    return p.with_name(re.sub(r'^\d+[a-zA-Z0-9]*_', '', p.name.lower())).with_suffix('.html')

def _prep(nb):
    "Make a processed notebook acceptable to nbconvert: drop float `execution` metadata, apply echo/output directives"
    title, desc, cells = None, None, []
    for c in nb['cells']:
        c.get('metadata', {}).pop('execution', None)
        src = ''.join(c['source']) if isinstance(c['source'], list) else c['source']
        if c['cell_type']=='raw' and src.startswith('---'):
            import yaml
            fm = yaml.safe_load(src.strip().strip('-')) or {}
            title, desc = fm.get('title'), fm.get('description')
            continue
        c.setdefault('id', f'c{len(cells)}')
        if c['cell_type']=='code':
            lines = src.splitlines(); dirs = {}
            while lines and _re_dir.match(lines[0]):
                k,v = _re_dir.match(lines[0]).groups(); dirs[k]=v.strip(); lines.pop(0)
            c['source'] = '\n'.join(lines)
            tags = c['metadata'].setdefault('tags', [])
            if dirs.get('echo')=='false' or not lines: tags.append('remove_input')
        cells.append(c)
    nb['cells'] = cells
    return nb, title, desc

def _nav(pages, here):
    depth = len(here.relative_to(dest).parts)-1
    up = '../'*depth
    links = ' '.join(f'<a href="{up}{p.relative_to(dest).as_posix()}">{html.escape(t)}</a>' for p,t in pages)
    return f'<nav class="ds-nav" style="padding:8px 16px;background:#2780e3;font-family:sans-serif">{links}</nav><style>.ds-nav a{{color:white;margin-right:14px;text-decoration:none}}</style>'

def build(skip_proc=False):
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    if not skip_proc: subprocess.run(['nbdev-proc-nbs'], cwd=root, check=True)
    shutil.rmtree(dest, ignore_errors=True); dest.mkdir()
    cfg = Config(); cfg.TagRemovePreprocessor.remove_input_tags = {'remove_input'}
    cfg.TagRemovePreprocessor.enabled = True
    exp = HTMLExporter(config=cfg, template_name='lab', exclude_input_prompt=True, exclude_output_prompt=True)
    nbs = sorted(p for p in proc.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
    pages, docs = [], []
    for p in nbs:
        nb, title, desc = _prep(nbformat.reads(p.read_text(), as_version=4))
        out = dest/page_name(p.relative_to(proc))
        pages.append((out, title or out.stem)); docs.append((nb, out, title, desc))
    pages.sort(key=lambda o: (o[0].name!='index.html', len(o[0].relative_to(dest).parts), str(o[0])))
    for nb, out, title, desc in docs:
        if title:
            head = f'# {title}' + (f'\n\n> {desc}' if desc else '')
            nb['cells'].insert(0, {'cell_type':'markdown', 'metadata':{}, 'source':head, 'id':'ds-title'})
        body, _ = exp.from_notebook_node(nbformat.from_dict(nb))
        body = body.replace('<body', '<body data-page="ds"', 1)
        body = re.sub(r'(<body[^>]*>)', lambda m: m.group(1)+_nav(pages, out), body, count=1)
        if title: body = re.sub(r'<title>.*?</title>', lambda m: f'<title>{html.escape(title)}</title>', body, count=1, flags=re.S)
        out.parent.mkdir(parents=True, exist_ok=True); out.write_text(body)
    print(f'{len(docs)} pages in {dest}')
    return [o for o,_ in pages]


def readme_text():
    "README.md from `nbs/index.ipynb`, as `nbdev-readme` would make it where Quarto exists"
    import nbformat
    from nbconvert import MarkdownExporter
    nb = nbformat.read(root/'nbs'/'index.ipynb', as_version=4)
    cells = []
    for c in nb.cells:
        if c.cell_type=='code':
            lines = c.source.splitlines()
            if lines and re.match(r'^\s*#\|\s*hide', lines[0]): continue
            c.source = '\n'.join(l for l in lines if not _re_dir.match(l))
            # the README is plain text on a code host: keep printed output, drop html tables and images
            c.outputs = [o for o in c.outputs if o.get('output_type')=='stream' or not ({'text/html','image/png'} & set(o.get('data', {})))]
        cells.append(c)
    nb.cells = cells
    nb.metadata['language_info'] = {'name': 'python'}
    body, _ = MarkdownExporter().from_notebook_node(nb)
    body = re.sub(r'\n{3,}', '\n\n', body).strip()+'\n'
    return '<!-- Generated from nbs/index.ipynb by tools/build_docs.py: edit the notebook, not this file. -->\n\n'+body

if __name__=='__main__':
    (root/'README.md').write_text(readme_text())
    if '--readme' not in sys.argv: build(skip_proc='--skip-proc' in sys.argv)

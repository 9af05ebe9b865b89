"The docs site and the demo report opened in headless Chromium: pages render, plots load, screenshots are not blank."
import shutil, subprocess, re
from pathlib import Path
import numpy as np, pytest

CHROME = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
pytestmark = pytest.mark.skipif(CHROME is None, reason='needs Debian chromium (installed by .ci/run)')
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking']
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-imgs', imgs.length);
  document.body.setAttribute('data-broken', imgs.filter(i => !i.complete || i.naturalWidth===0).length);
});</script>"""

def _probe(page, tmp_path):
    "Load a copy of `page` with a probe script; return (number of images, number broken)"
    p = tmp_path/('probe_'+page.name)
    p.write_text(page.read_text().replace('</body>', PROBE+'</body>'))
    dom = subprocess.run([CHROME, *FLAGS, '--virtual-time-budget=10000', '--dump-dom', p.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-imgs="(\d+)" data-broken="(\d+)"', dom) or re.search(r'data-broken="(\d+)".*?data-imgs="(\d+)"', dom)
    assert m, f'probe did not run on {page}'
    return int(m.group(1)), int(m.group(2))

def _screenshot(page, png):
    subprocess.run([CHROME, *FLAGS, '--hide-scrollbars', '--window-size=1280,1600', f'--screenshot={png}', page.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image
    a = np.asarray(Image.open(png).convert('L'), dtype=float)
    return a

def test_docs_in_browser(docs_site, tmp_path):
    docs = Path(docs_site[0]).parent
    total = 0
    for page in sorted(docs.rglob('*.html')):
        n, broken = _probe(page, tmp_path)
        assert broken==0, f'{broken} broken images in {page.name}'
        total += n
        a = _screenshot(page, tmp_path/f'{page.stem}.png')
        assert a.std()>5, f'{page.name} renders blank'
    assert total>0, 'no plot rendered anywhere in the docs'

def test_report_in_browser(demo_report, tmp_path):
    _, out = demo_report
    page = out/'report.html'
    n, broken = _probe(page, tmp_path)
    assert n>=16 and broken==0, (n, broken)
    a = _screenshot(page, tmp_path/'report.png')
    assert a.std()>5
    colours = np.asarray(__import__('PIL.Image', fromlist=['Image']).open(tmp_path/'report.png').convert('RGB'))[:400].reshape(-1,3)
    assert ((colours[:,0]>190)&(colours[:,1]<110)).any(), 'no red card for the exploded run'
    assert ((colours[:,1]>160)&(colours[:,0]<120)).any(), 'no green card for the trained run'

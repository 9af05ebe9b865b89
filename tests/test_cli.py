"The `deepstable` command as a user runs it: a subprocess, real files, exit codes."
import json, time
from pathlib import Path
import numpy as np
from conftest import cli

def test_demo_quick(demo_report):
    r, out = demo_report
    assert r.returncode==0, r.stderr[-3000:]
    s = json.loads((out/'summary.json').read_text())
    runs = {o['name']:o for o in s['runs']}
    assert list(runs)==['naive','kaiming','batchnorm','resblock']
    naive = runs['naive']
    assert naive['verdict']=='exploded' and naive['events'], naive['headline']
    assert naive['events'][0]['layer'], 'the guard must name the layer'
    assert runs['resblock']['accuracy']>=0.9 and runs['resblock']['verdict']=='trained'
    assert all(o['finite_weights'] for o in s['runs'])
    for f in ('report.html','summary.md'): assert (out/f).exists()
    for o in s['runs']:
        assert o['lr']>0 and o['lr_reason'], o['name']
        for p in o['figures']: assert (out/p).stat().st_size>1000, p

def test_demo_story_and_depth_panel(demo_report):
    "The report opens with the story in order, each claim as the runs bore it out, and the depth sweep panel"
    r, out = demo_report
    s = json.loads((out/'summary.json').read_text())
    story = s['story']
    assert [t.split('**')[1] for t in story]==['naive','kaiming','batchnorm','resblock'], story
    assert 'explodes' in story[0] and 'did not' not in story[0], story[0]
    assert story[3].startswith('**resblock** trains deepest'), story[3]
    sweep = s['meta']['depth_sweep']
    assert {o['variant'] for o in sweep}=={'kaiming','batchnorm','resblock'} and len({o['depth'] for o in sweep})>=3
    assert [p['figure'] for p in s['panels']]==['depth_sweep.png'] and (out/'depth_sweep.png').stat().st_size>1000
    page = (out/'report.html').read_text()
    assert page.index('<ol class="story">') < page.index('class="cards"') < page.index('Depth sweep')
    for i,t in enumerate(story, 1): assert f"{i}. {t.replace('`','').replace('**','')}" in r.stdout

def test_no_seed_wording(demo_report):
    "Nothing a user reads speaks of a seed's network: the report, the summary, the CLI's output and help"
    import re
    r, out = demo_report
    texts = [(out/'summary.md').read_text(), re.sub(r'<details>.*?</details>', '', (out/'report.html').read_text(), flags=re.S),
             r.stdout] + [cli(*sub, '--help').stdout for sub in ([], ['demo'], ['train'], ['check'])]
    for t in texts: assert not re.search(r"\bseed'?s\b(?! for)|the seed\b", t, re.I), re.findall(r'.{40}seed.{40}', t)

def _two_class_folder(root):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c,(lo,hi) in enumerate([(0,100),(150,255)]):
        d = root/f'class{c}'; d.mkdir(parents=True)
        for i in range(24): Image.fromarray(rng.integers(lo, hi, (20,20,3), dtype=np.uint8)).save(d/f'{i}.png')
    return root

def test_train_on_handmade_folder(tmp_path):
    src = _two_class_folder(tmp_path/'imgs')
    r = cli('train', src, '--arch', 'resnet18', '--epochs', 1, '--size', 32, '--bs', 8, '--out', tmp_path/'rep')
    assert r.returncode in (0,1), r.stderr[-3000:]
    s = json.loads((tmp_path/'rep'/'summary.json').read_text())
    assert s['runs'][0]['accuracy'] is not None and (tmp_path/'rep'/'report.html').exists()
    assert (r.returncode==1)==bool(s['runs'][0]['events'])

def test_train_on_digits_folder(tmp_path):
    from deepstable_fastai.data import digits_folder
    src = digits_folder(tmp_path/'cache')
    r = cli('train', src, '--epochs', 1, '--size', 32, '--lr', 3e-3, '--out', tmp_path/'rep')
    assert r.returncode in (0,1), r.stderr[-3000:]
    s = json.loads((tmp_path/'rep'/'summary.json').read_text())
    assert s['runs'][0]['accuracy']>0.5

def test_bad_input_exits_2(tmp_path):
    empty = tmp_path/'empty'; empty.mkdir()
    broken = _two_class_folder(tmp_path/'broken')
    (broken/'class0'/'0.png').write_bytes(b'not a png')
    cases = {('train', tmp_path/'missing'): 'does not exist',
             ('train', empty): 'no image files',
             ('train', broken): 'cannot be read',
             ('train', broken, '--arch', 'resnet9000'): '--arch',
             ('check', 'resnet9000'): 'TARGET: unknown architecture',  # `check` has no --arch
             ('check', 'resnet18', '--bs', 0): '--bs must be positive, got 0',
             ('check', 'resnet18', '--size', -4): '--size must be positive',
             ('check', 'resnet18', '--size', 4): '--size must be an int in [8,512], got 4',  # data._expect's, as a flag
             ('check', 'resnet18', '--n-in', 0): '--n-in must be positive',
             ('check', 'resnet18', '--data', tmp_path/'missing'): '--data: ',
             ('demo', '--seed', -1): '--seed must be in',
             ('demo', '--out', broken/'class0'/'1.png'): '--out: ',  # a file: refused before any training
             ('train', broken, '--out', broken/'class0'/'1.png'/'sub'): '--out: cannot write into',
             ('train', broken, '--lr', -1): '--lr must be positive',
             ('train', broken, '--seed', -1): '--seed must be in',
             ('nope',): 'unknown command'}
    for args,msg in cases.items():
        r = cli(*args)
        assert r.returncode==2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines)==1 and msg in lines[0] and 'Traceback' not in r.stderr, (args, r.stderr)

def test_help_everywhere():
    for sub in ([], ['demo'], ['train'], ['check']):
        r = cli(*sub, '--help')
        assert r.returncode==0 and 'usage' in r.stdout.lower(), (sub, r.stderr)

def test_check_arch():
    r = cli('check', 'resnet18', '--size', 32)
    assert r.returncode in (0,1) and 'overall:' in r.stdout, r.stderr[-2000:]
    r = cli('check', 'resnet18', '--size', 32, '--bs', 4, '--n-in', 2)  # digits in grey, in 2 channels
    assert r.returncode in (0,1) and 'overall:' in r.stdout, r.stderr[-2000:]

def test_check_exported_learner(tmp_path):
    from deepstable_fastai.data import digits_image_dls
    from deepstable_fastai.learner import resblock_learner
    learn = resblock_learner(digits_image_dls(tmp_path/'cache', size=8, bs=32), n_blocks=2)
    learn.export(tmp_path/'m.pkl')
    r = cli('check', tmp_path/'m.pkl', '--size', 8)
    assert r.returncode==0 and 'overall: ok' in r.stdout, r.stdout+r.stderr[-2000:]
    r = cli('check', tmp_path/'missing.pkl')
    assert r.returncode==2 and 'does not exist' in r.stderr

def test_check_exported_learner_own_batch(tmp_path):
    "An exported learner gets a batch through its own pipeline; one its data does not fit is a usage error"
    import torch.nn as nn
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from deepstable_fastai.data import digits_dls, digits_image_dls
    conv = lambda: nn.Sequential(nn.Conv2d(1,4,3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4,10))
    Learner(digits_dls(), conv(), loss_func=CrossEntropyLossFlat()).export(tmp_path/'conv1.pkl')
    r = cli('check', tmp_path/'conv1.pkl')  # trained on 1-channel 8x8 digits tensors
    assert r.returncode==0 and 'overall: ok' in r.stdout, r.stdout+r.stderr[-2000:]
    rgb = digits_image_dls(tmp_path/'cache', size=8)
    Learner(rgb, conv(), loss_func=CrossEntropyLossFlat()).export(tmp_path/'rgb.pkl')
    r = cli('check', tmp_path/'rgb.pkl')  # its pipeline makes RGB images its 1-channel model cannot take
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode==2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert last.startswith('deepstable check: TARGET: the model cannot take a batch of shape (32, 3, 8, 8)'), last

def test_train_under_torchrun(tmp_path):
    "`torchrun` starts two `deepstable train` processes: they train together and rank 0 alone writes the report"
    import subprocess, sys
    src = _two_class_folder(tmp_path/'imgs')
    exe = Path(sys.executable).parent
    cmd = [exe/'torchrun', '--standalone', '--nproc_per_node', '2', '--no-python', exe/'deepstable', 'train', src,
           '--arch', 'resnet18', '--epochs', '1', '--size', '32', '--bs', '8', '--out', tmp_path/'rep']
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode in (0,1), r.stderr[-3000:]
    s = json.loads((tmp_path/'rep'/'summary.json').read_text())
    assert len(s['runs'])==1 and s['runs'][0]['finite_weights']
    assert r.stdout.count('report:')==1, r.stdout
    r = subprocess.run(list(map(str, [exe/'torchrun', '--standalone', '--nproc_per_node', '2', '--no-python', exe/'deepstable', 'demo', '--quick'])),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode!=0 and 'one process' in r.stderr

"`export()` / `load_learner()` round trips for the issue-5 learners, loaded in a fresh process; the defaults bench."
import os, subprocess, sys, textwrap
import pytest, torch
from fastai.learner import load_learner
from fastai.vision.all import vision_learner, resnet18
from deepstable_fastai.data import digits_image_dls
from deepstable_fastai.learner import resblock_learner, bn_stem, add_bn_stem, WithStem

LOAD = textwrap.dedent('''
    import sys, torch
    from fastai.learner import load_learner
    learn = load_learner(sys.argv[1])
    x = torch.load(sys.argv[2])
    with torch.no_grad(): torch.save(learn.model.eval()(x), sys.argv[3])
    print(type(learn.model[0][0]).__name__, getattr(learn, 'arch', None), next(learn.model.named_parameters())[0])
''')

def _roundtrip(learn, x, tmp_path):
    "Export `learn`, load it in a new process, and return (its output on `x`, its stdout)"
    fn = tmp_path/'learn.pkl'
    learn.export(fn)
    torch.save(x, tmp_path/'x.pt')
    r = subprocess.run([sys.executable, '-c', LOAD, str(fn), str(tmp_path/'x.pt'), str(tmp_path/'y.pt')],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode==0, r.stderr[-3000:]
    return torch.load(tmp_path/'y.pt'), r.stdout

def test_resblock_learner_export(tmp_path):
    # digits_dls' in-memory TensorDL can't be exported (no `new_empty`), so use the PNG pipeline
    learn = resblock_learner(digits_image_dls(size=8, bs=16, channels=1), n_blocks=3, nf=8)
    with learn.no_bar(): learn.fit(1, 1e-3)
    x = torch.randn(4,1,8,8)
    y,_ = _roundtrip(learn, x, tmp_path)
    with torch.no_grad(): torch.testing.assert_close(y, learn.model.eval()(x))

def test_bn_stem_export(tmp_path):
    learn = vision_learner(digits_image_dls(size=16, bs=16), bn_stem(resnet18), pretrained=False)
    x = torch.randn(2,3,16,16)
    y,out = _roundtrip(learn, x, tmp_path)
    assert out.split()==['WithStem', 'bn_stem(resnet18)', '0.0.stem.0.weight']  # the stem registered first, as it runs
    with torch.no_grad(): torch.testing.assert_close(y, learn.model.eval()(x))
    assert isinstance(load_learner(tmp_path/'learn.pkl').model[0][0], WithStem)

def test_add_bn_stem_export(tmp_path):
    dls = digits_image_dls(size=16, bs=16, channels=1)
    learn = add_bn_stem(vision_learner(dls, resnet18, n_in=1, pretrained=False))
    x = torch.randn(2,1,16,16)
    y,out = _roundtrip(learn, x, tmp_path)
    assert out.split()[-1]=='0.0.stem.0.weight'
    with torch.no_grad(): torch.testing.assert_close(y, learn.model.eval()(x))

@pytest.mark.slow
def test_defaults_train_at_the_valley(root):
    "`resblock_learner`'s defaults reach 0.90 on 16x16 digits after `fit_one_cycle(4, lr_find().valley)`, every run"
    r = subprocess.run([sys.executable, str(root/'bench'/'resblock_defaults.py'), '--configs', 'default'],
                       capture_output=True, text=True, timeout=900, env={**os.environ, 'OMP_NUM_THREADS':'1'})
    assert r.returncode==0, r.stderr[-3000:]
    row = next(l for l in r.stdout.splitlines() if l.startswith('| default |')).split('|')
    accs = [float(a) for a in row[4].split()]
    assert len(accs)==3 and min(accs)>=0.9, row

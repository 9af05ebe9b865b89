"`add_bn_stem` and `timm_split` on timm archs (`vision_learner(dls, '<name>')`): cut, split, freeze, fit, export."
import subprocess, sys, textwrap
import pytest, torch
timm = pytest.importorskip('timm')
from fastai.callback.training import ShortEpochCallback
from fastai.torch_core import norm_types
from fastai.vision.learner import vision_learner, TimmBody
from deepstable_fastai.data import digits_image_dls
from deepstable_fastai.layers import BNStem
from deepstable_fastai.learner import add_bn_stem, timm_split, WithStem
import fastai.callback.progress # `Learner.no_bar`, `no_logging`

# one per family: a ResNet, a ConvNeXt, an EfficientNet (smallest variants; ConvNeXt's stride-4 stem needs 32x32)
ARCHS = ['resnet18', 'convnext_atto', 'efficientnet_b0']

@pytest.fixture(scope='module')
def dls(): return digits_image_dls(size=32, bs=16)

def learner(dls, arch, **kwargs):
    torch.manual_seed(0)
    return add_bn_stem(vision_learner(dls, arch, pretrained=False, splitter=timm_split, **kwargs))

def stem_of(learn):
    "The `WithStem` `add_bn_stem` put in the timm model"
    ws = [m for m in learn.model.modules() if isinstance(m, WithStem)]
    assert len(ws)==1, ws
    return ws[0]

def first_leaf(m, xb):
    "The first leaf module `m` runs on `xb`"
    seen = []
    hs = [o.register_forward_pre_hook(lambda o,i: seen.append(o)) for o in m.modules() if not list(o.children())]
    with torch.no_grad(): m.eval()(xb)
    for h in hs: h.remove()
    return seen[0]

@pytest.mark.parametrize('arch', ARCHS)
def test_cut_and_stem(dls, arch):
    learn = learner(dls, arch)
    body,head = learn.model[0],learn.model[1]
    assert isinstance(body, TimmBody) and len(learn.model)==2
    xb = dls.one_batch()[0][:4]
    feats = body.eval()(xb)
    assert feats.dim()==4 and feats.shape[1]==body.model.num_features  # body ends at timm's features, no classifier
    assert head(feats).shape==(4, dls.c)
    w = stem_of(learn)
    assert isinstance(w.stem, BNStem) and w.stem[0].num_features==3
    assert first_leaf(learn.model, xb) is w.stem[0]
    names = [n for n,_ in learn.model.named_parameters()]
    assert names[0].endswith('stem.0.weight') and '.layer.' in names[2]  # registered in the order they run
    add_bn_stem(learn)
    assert len([m for m in learn.model.modules() if isinstance(m, WithStem)])==1

@pytest.mark.parametrize('arch', ARCHS)
def test_split_and_freeze(dls, arch):
    learn = learner(dls, arch)
    g = learn.splitter(learn.model)
    assert len(g)==3 and all(len(o) for o in g)
    ids = [id(p) for o in g for p in o]
    assert sorted(ids)==sorted(id(p) for p in learn.model.parameters())  # each parameter in exactly one group
    assert any(p is stem_of(learn).stem[0].weight for p in g[0])
    assert {id(p) for p in g[2]}=={id(p) for p in learn.model[1].parameters()}
    learn.freeze()
    norm = {id(p) for m in learn.model.modules() if isinstance(m, norm_types) for p in m.parameters()}
    head = {id(p) for p in learn.model[1].parameters()}
    assert {id(p) for p in learn.model.parameters() if p.requires_grad}==head|norm
    assert stem_of(learn).stem[0].weight.requires_grad and not stem_of(learn).layer.weight.requires_grad

def test_frozen_learner_stays_frozen(dls):
    learn = vision_learner(dls, 'resnet18', pretrained=False, splitter=timm_split)
    learn.freeze()
    add_bn_stem(learn)
    assert learn.opt.frozen_idx==2
    assert any(p is stem_of(learn).stem[0].weight for g in learn.opt.param_lists for p in g)
    assert stem_of(learn).stem[0].weight.requires_grad and not stem_of(learn).layer.weight.requires_grad

def test_one_channel():
    dls1 = digits_image_dls(size=32, bs=16, channels=1)
    learn = learner(dls1, 'resnet18', n_in=1)
    w = stem_of(learn)
    assert (w.stem[0].num_features, w.layer.in_channels)==(1, 1)
    assert learn.model.eval()(dls1.one_batch()[0][:2]).shape==(2, 10)

@pytest.mark.parametrize('arch', ARCHS)
def test_short_fit(dls, arch):
    learn = learner(dls, arch)
    w = stem_of(learn)
    before = w.layer.weight.detach().clone(), w.stem[0].running_mean.clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=ShortEpochCallback(0.01))
    assert all(torch.isfinite(torch.tensor(v)).all() for v in learn.recorder.values[-1][:2])
    assert not torch.equal(w.layer.weight, before[0]) and not torch.equal(w.stem[0].running_mean, before[1])

LOAD = textwrap.dedent('''
    import sys, torch
    from fastai.learner import load_learner
    learn = load_learner(sys.argv[1])
    x = torch.load(sys.argv[2])
    with torch.no_grad(): torch.save(learn.model.eval()(x), sys.argv[3])
    print(learn.arch, len(learn.splitter(learn.model)))
''')

@pytest.mark.parametrize('arch', ARCHS[:2])
def test_export_load(dls, arch, tmp_path):
    learn = learner(dls, arch)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=ShortEpochCallback(0.01))
    learn.export(tmp_path/'learn.pkl')
    x = torch.randn(2,3,32,32)
    torch.save(x, tmp_path/'x.pt')
    args = [str(tmp_path/o) for o in ('learn.pkl', 'x.pt', 'y.pt')]
    r = subprocess.run([sys.executable, '-c', LOAD, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode==0, r.stderr[-3000:]
    assert r.stdout.split()==[arch, '3']
    with torch.no_grad(): torch.testing.assert_close(torch.load(tmp_path/'y.pt'), learn.model.eval()(x))

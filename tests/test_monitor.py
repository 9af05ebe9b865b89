"""What the monitor notebook cannot show: interrupts, a fresh process loading an export, RNNs, the PNG pipeline, long runs.
The interrupt tests run on both statistics paths (`kernel` in conftest.py): the CPU's C++ op and the device path."""
import subprocess, sys, textwrap
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastai.learner import Learner
from conftest import nan_batch, stop_after
from fastai.callback.core import Callback, CancelFitException
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.test_utils import synth_learner
from fastai.torch_core import set_seed
from fastai.callback.progress import *
from deepstable_fastai.data import digits_dls
from deepstable_fastai.monitor import ActivationMonitor, MONITOR_STATS

def n_hooks(m): return sum(len(o._forward_hooks)+len(o._backward_hooks)+len(o._forward_pre_hooks) for o in m.modules())

def interrupt(at, n=2):
    "A callback that raises `KeyboardInterrupt` in event `at` of training batch `n`"
    def boom(self):
        if self.training and self.iter==n: raise KeyboardInterrupt
    return type('Interrupt', (Callback,), {at: boom})()

def mlp_learner(**kw):
    set_seed(0)
    m = nn.Sequential(nn.Linear(64,32), nn.ReLU(), nn.Linear(32,32), nn.Tanh(), nn.Linear(32,10))
    return Learner(digits_dls(flat=True), m, loss_func=F.cross_entropy, **kw)

def interrupt_err(at, err, n=2):
    "A callback that raises `err` in event `at` of training batch `n`"
    def boom(self):
        if self.training and self.iter==n: raise err('boom')
    return type('Interrupt', (Callback,), {at: boom})()

def then_fit(learn): learn.fit(1, cbs=stop_after(3))
def then_preds(learn): learn.get_preds()
def then_validate(learn): learn.validate() # `predict` enters through `get_preds`
def then_one_batch(learn): # run by hand, as fastai's tests do, with no `before_fit`
    learn.epoch,learn.training,learn.dl,learn.n_iter = 0,True,learn.dls.train,len(learn.dls.train); learn.model.train()
    learn.one_batch(0, learn.dls.train.one_batch())
def then_export(learn, tmp_path):
    from fastai.learner import load_learner
    learn.export(tmp_path/'m.pkl'); l2 = load_learner(tmp_path/'m.pkl')
    assert l2.activation_monitor._engine is None and l2.__dict__.get('_stats_engine') is None
    l2.model(torch.randn(4, 64)) # any hook pickled with the model loads inert: a no-op of the standard library
    import functools
    from deepstable_fastai.engine import StatsEngine
    assert all(isinstance(h, functools.partial) for o in l2.model.modules() for h in o._forward_hooks.values())
    StatsEngine(l2.model).remove(); assert n_hooks(l2.model)==0 # the next engine on the model takes them off
    learn.get_preds()

EVENTS = ['before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step', 'after_step',
          'after_batch']

@pytest.mark.parametrize('then', ['fit', 'get_preds', 'validate', 'export', 'one_batch'])
@pytest.mark.parametrize('at', EVENTS)
@pytest.mark.usefixtures('kernel')
def test_exception_then_entry_point(at, then, tmp_path):
    "No global patch of fastai: hooks of a fit that raised go at the next entry point, history kept"
    learn = mlp_learner(cbs=ActivationMonitor(with_hist=True))
    err = KeyboardInterrupt if EVENTS.index(at)%2 else RuntimeError
    with pytest.raises(err), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=interrupt_err(at, err))
    mon = learn.activation_monitor
    with learn.no_bar(), learn.no_logging():
        if then=='export': then_export(learn, tmp_path)
        else: dict(fit=then_fit, get_preds=then_preds, validate=then_validate, one_batch=then_one_batch)[then](learn)
    assert n_hooks(learn.model)==0 and '_stats_engine' not in learn.__dict__ and mon._engine is None and mon._snap is None
    assert mon.k==(3 if then=='fit' or at=='after_batch' else 2) # records of the fit that raised are kept
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=stop_after(3))   # usable afterwards
    assert mon.k==3 and n_hooks(learn.model)==0

def test_remove_and_gc():
    import gc
    learn = mlp_learner(cbs=ActivationMonitor())
    with pytest.raises(RuntimeError), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=interrupt_err('after_batch', RuntimeError))
    learn.activation_monitor.remove(); assert n_hooks(learn.model)==0
    with pytest.raises(RuntimeError), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=interrupt_err('after_batch', RuntimeError))
    m = learn.model; assert n_hooks(m)>0
    del learn; gc.collect()
    assert n_hooks(m)==0

def test_export_load_in_fresh_process(tmp_path):
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, CategoryBlock, Normalize
    import pandas as pd
    from deepstable_fastai.data import digits_arrays
    x,y = digits_arrays()
    df = pd.DataFrame(x.reshape(len(x), -1), columns=[f'p{i}' for i in range(64)]).assign(y=y)
    dls = TabularDataLoaders.from_df(df, y_names='y', cont_names=list(df.columns[:64]), procs=[Normalize], y_block=CategoryBlock(), bs=128)
    learn = tabular_learner(dls, layers=[32], cbs=ActivationMonitor(with_hist=True, keep_history=True))
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    learn.export(tmp_path/'m.pkl')
    learn.activation_monitor.to_df().to_pickle(tmp_path/'df.pkl')
    code = textwrap.dedent(f'''
        import pandas as pd, matplotlib; matplotlib.use('Agg')
        from fastai.learner import load_learner
        learn = load_learner({str(tmp_path/'m.pkl')!r})
        m = learn.activation_monitor
        pd.testing.assert_frame_equal(m.to_df(), pd.read_pickle({str(tmp_path/'df.pkl')!r}))
        m.plot().savefig({str(tmp_path/'p.png')!r}); m.color_dim(0); m.dead_chart()
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
        assert m.k == learn.train_iter, (m.k, learn.train_iter)
        print('ok', len(m.names))''')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode==0 and 'ok' in r.stdout, r.stderr[-3000:]
    assert (tmp_path/'p.png').stat().st_size > 1000

class SeqData(torch.utils.data.Dataset):
    "Token sequences whose label is whether token 1 occurs"
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(2, 50, (n, 12), generator=g)
        self.x[::2, 5] = 1
        self.y = (self.x==1).any(1).long()
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]

class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb,self.rnn,self.cell,self.head = nn.Embedding(50, 16),nn.LSTM(16, 32, num_layers=2, batch_first=True),nn.GRUCell(32, 32),nn.Linear(32, 2)
    def forward(self, x):
        o,(h,c) = self.rnn(self.emb(x))
        s = h[-1]
        for t in range(o.shape[1]): s = self.cell(o[:,t], s)   # a cell called 12 times per forward
        return self.head(s)

def test_rnn_learner():
    set_seed(0)
    dls = DataLoaders(DataLoader(SeqData(512, 0), bs=32, shuffle=True), DataLoader(SeqData(128, 1), bs=64))
    learn = Learner(dls, LSTMNet(), loss_func=F.cross_entropy, cbs=ActivationMonitor(with_hist=True))
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
    m = learn.activation_monitor
    assert m.names==['emb','rnn','cell','head'] and m.k==learn.train_iter
    df = m.to_df()
    assert df.value[df.stat.isin(['mean','std','absmax','grad_norm'])].notna().all()
    # the LSTM's row covers its whole (output, (h, c)) tuple, the cell's all 12 calls
    h = m.hist_counts('rnn')[0]; assert h.sum()==32*12*32 + 2*(2*32*32)
    assert m.hist_counts('cell')[0].sum()==12*32*32
    assert n_hooks(learn.model)==0

def test_text_awd_lstm():
    from fastai.text.models.core import get_text_classifier
    from fastai.text.models.awdlstm import AWD_LSTM
    set_seed(0)
    model = get_text_classifier(AWD_LSTM, 50, 2, seq_len=4, config=dict(emb_sz=16, n_hid=24, n_layers=2, pad_token=0,
                                hidden_p=0.1, input_p=0.1, embed_p=0.1, weight_p=0.2, bidir=False, output_p=0.1), max_len=48)
    dls = DataLoaders(DataLoader(SeqData(256, 0), bs=32, shuffle=True), DataLoader(SeqData(64, 1), bs=64))
    learn = Learner(dls, model, loss_func=lambda p,y: F.cross_entropy(p[0], y), cbs=ActivationMonitor())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    m = learn.activation_monitor
    assert any('rnns' in n for n in m.names) and m.k==learn.train_iter
    ran = m.values('std').isfinite().all(0)
    # AWD_LSTM's EmbeddingDropout reads the encoder's weight without calling it: that row stays NaN
    assert [n for n,r in zip(m.names, ran) if not r]==['0.module.encoder']
    assert all(r for n,r in zip(m.names, ran) if 'rnns' in n) and m.values('grad_norm', '0.module.encoder').isfinite().all()
    assert n_hooks(learn.model)==0

def test_vision_learner_png_pipeline(tmp_path):
    from fastai.vision.learner import vision_learner
    from torchvision.models import resnet18
    from deepstable_fastai.data import digits_image_dls
    dls = digits_image_dls(tmp_path, size=32, bs=32, num_workers=0)
    learn = vision_learner(dls, resnet18, pretrained=False, loss_func=F.cross_entropy, cbs=ActivationMonitor(with_hist=True))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=stop_after(4))
    m = learn.activation_monitor
    assert m.k==4 and '0.0' in m.names and any(n.startswith('1.') for n in m.names)
    assert m.values('grad_norm', '0.0').isfinite().all()
    preds,_ = learn.get_preds(); assert m.k==4
    m.plot(); m.color_dim('0.0'); m.plot_layer_stats('0.0'); m.dead_chart()
    assert n_hooks(learn.model)==0

def test_long_run_memory_cap():
    learn = synth_learner(n_trn=3000, cbs=ActivationMonitor(cap=64, with_hist=True))
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    m = learn.activation_monitor
    assert 32<=m.k<=64 and m.stride==64
    st = m.steps
    assert st[0]==0 and st[-1]>=3000-m.stride and set((st[1:]-st[:-1]).tolist())=={m.stride}
    assert m.nbytes()==64*(len(m.names)*(4*(len(MONITOR_STATS)+1)+4*43)+40)
    assert m.hist_counts(0).sum(1).eq(16).all()

class Mode(Callback):
    "The statistics engine's mode at each training batch"
    def before_fit(self): self.modes = set()
    def after_batch(self): self.modes.add(self.learn._stats_engine._mode)

def test_monitor_and_guard_share_batches(kernel):
    "Monitor histograms and stats are recorded with the guard attached (fastai's CastToTensor swaps `xb` between them)"
    import torch
    from fastai.learner import Learner
    from deepstable_fastai.data import digits_dls
    from deepstable_fastai.guard import ExplosionGuard
    from deepstable_fastai.monitor import ActivationMonitor
    from deepstable_fastai.stats import kernel_path
    m = torch.nn.Sequential(torch.nn.Linear(64,32), torch.nn.ReLU(), torch.nn.Linear(32,10))
    learn = Learner(digits_dls(flat=True), m, cbs=[ActivationMonitor(with_hist=True), ExplosionGuard(act_every=4), Mode()])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert learn.mode.modes=={'cpp' if kernel_path(wait=True)=='cpp' else 'staged'}, learn.mode.modes # the path tested
    mon = learn.activation_monitor
    assert mon.k == learn.train_iter
    h = mon.hist_counts(0)
    assert (h.sum(1) == 64*32).all(), h.sum(1)
    assert torch.isfinite(torch.as_tensor(mon.values('std', 0))).all()

def test_compiled_model_names():
    "A model given to `torch.compile` keeps its user's names (no `_orig_mod.`) in the history, `modules=` and events"
    from deepstable_fastai.guard import ExplosionGuard
    set_seed(0)
    m = nn.Sequential(nn.Linear(64,32), nn.ReLU(), nn.Linear(32,10))
    learn = Learner(digits_dls(flat=True, bs=64), torch.compile(m), loss_func=F.cross_entropy,
                    cbs=[ActivationMonitor(modules=['0', '2']), ExplosionGuard('skip', verbose=False), nan_batch(2)])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=stop_after(4))
    assert learn.activation_monitor.names==['0', '2']
    ev = learn.explosion_guard.events
    assert ev and all('_orig_mod' not in str(e['layer']) for e in ev), ev

def test_compiled_model_one_graph():
    "A compiled model stays one graph with the monitor and the guard, and they record what they record eagerly"
    from torch._dynamo.utils import counters
    from deepstable_fastai.guard import ExplosionGuard
    def run(comp):
        torch._dynamo.reset(); counters.clear(); set_seed(0)
        m = nn.Sequential(nn.Linear(64,32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Linear(32,10))
        learn = Learner(digits_dls(flat=True, bs=64), torch.compile(m) if comp else m, loss_func=F.cross_entropy,
                        cbs=[ActivationMonitor(with_hist=True), ExplosionGuard('skip', verbose=False), nan_batch(2)])
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 0., cbs=stop_after(5)) # lr 0: the same net each batch
        return learn,dict(counters['stats']),dict(counters['graph_break'])
    (a,_,_),(b,st,gb) = run(False),run(True)
    assert st['unique_graphs']==1 and not gb, (st, gb)
    ma,mb = a.activation_monitor,b.activation_monitor
    assert ma.k==mb.k==5
    for s in ('mean','std','absmax','near_zero','zero','nan'):
        va,vb = (torch.as_tensor(m.values(s)) for m in (ma, mb))
        torch.testing.assert_close(vb, va, rtol=1e-4, atol=1e-5, equal_nan=True, msg=s)
    ha,hb = ma.hbuf[:5].long(),mb.hbuf[:5].long()
    assert (ha.sum(-1)==hb.sum(-1)).all() and (ha-hb).abs().max()<=2, (ha-hb).abs().max()
    ea,eb = ([(e['train_iter'], e['kind'], e['layer']) for e in l.explosion_guard.events] for l in (a, b))
    assert ea==eb==[(2, 'nonfinite_act', 'input')], (ea, eb)

class Twice(nn.Module):
    "A block that runs its ReLU twice, as torchvision's `BasicBlock` does"
    def __init__(self): super().__init__(); self.l1,self.l2,self.relu = nn.Linear(8,8),nn.Linear(8,8),nn.ReLU()
    def forward(self, x): return self.relu(self.l2(self.relu(self.l1(x))))

@pytest.mark.parametrize('kind', ['whole', 'part', 'twice'])
def test_compiled_parts(kind):
    "The engine's statistics of a compiled model, one with a compiled part (its end eager), one module run twice"
    import copy
    from deepstable_fastai.engine import StatsEngine
    torch.manual_seed(0)
    if kind=='part':
        a = nn.Sequential(nn.Sequential(nn.Linear(8,16), nn.BatchNorm1d(16), nn.ReLU(inplace=True)), nn.Linear(16,4))
        b = copy.deepcopy(a); b[0] = torch.compile(b[0])
    else: a = nn.Sequential(Twice(), nn.Linear(8,4)) if kind=='twice' else nn.Sequential(nn.Linear(8,4), nn.ReLU())
    if kind!='part': b = torch.compile(copy.deepcopy(a))
    ea,eb = StatsEngine(a),StatsEngine(b)
    try:
        for k in range(3):
            x = torch.randn(16,8); ea.begin(k, hist=True); a(x); eb.begin(k, hist=True); b(x)
            assert eb._tq # the graph's sums wait, as its outputs, for the table to be read
            torch.testing.assert_close(eb.stats(), ea.stats(), rtol=1e-4, atol=1e-5, equal_nan=True)
            assert (eb.hists().sum(1)==ea.hists().sum(1)).all()
        assert eb.order==ea.order
    finally: ea.remove(); eb.remove()

def test_compiled_in_place_keeps_graph():
    "A model compiled in place (`nn.Module.compile`, which traces its own hooks) keeps one graph over fits"
    from torch._dynamo.utils import counters
    torch._dynamo.reset(); counters.clear(); set_seed(0)
    m = nn.Sequential(nn.Linear(64,32), nn.ReLU(), nn.Linear(32,10)); m.compile()
    learn = Learner(digits_dls(flat=True, bs=64), m, loss_func=F.cross_entropy)
    for _ in range(3): # each fit a new monitor, so new hooks: dynamo once guarded on the id of one of them
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[mon:=ActivationMonitor(), stop_after(2)])
        assert mon.k==2
    assert counters['stats']['unique_graphs']==1, dict(counters['stats'])

def test_compiled_model_hooked_late():
    "A compiled model that ran without the hooks (`lr_find`, a fit, a monitor of fewer modules) is traced again"
    # dynamo does not notice hooks added to a module it compiled (torch._dynamo.config.skip_nnmodule_hook_guards)
    import warnings
    from torch._dynamo.utils import counters
    from fastai.callback.schedule import Learner # adds `lr_find`
    from deepstable_fastai.guard import ExplosionGuard
    torch._dynamo.reset(); set_seed(0)
    m = nn.Sequential(nn.Linear(64,32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Linear(32,10))
    learn = Learner(digits_dls(flat=True, bs=64), torch.compile(m), loss_func=F.cross_entropy)
    def fit(*cbs, n=2):
        with warnings.catch_warnings(record=True) as ws, learn.no_bar(), learn.no_logging():
            warnings.simplefilter('always'); learn.fit(1, 1e-3, cbs=list(cbs)+[stop_after(n)])
        return any('compiles again' in str(w.message) for w in ws)
    def rows(mon): return torch.as_tensor(mon.values('std'))
    with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=3, show_plot=False, suggest_funcs=())
    mon,g = ActivationMonitor(),ExplosionGuard('skip', verbose=False)
    assert fit(mon, g, nan_batch(2), n=3) # traced again: it records and guards
    assert mon.k==3 and (rows(mon)[:2]>0).all(), rows(mon)
    assert [(e['train_iter'], e['kind'], e['layer']) for e in g.events]==[(2, 'nonfinite_act', 'input')]
    n = counters['stats']['unique_graphs']
    assert not fit(mon:=ActivationMonitor()) and mon.k==2 # hooked as it was: the graph is kept
    assert counters['stats']['unique_graphs']==n
    assert not fit() # without the hooks: dynamo notices they left, and traces it again
    assert fit(mon:=ActivationMonitor(modules=['0'])) and mon.k==2 and (rows(mon)>0).all()
    assert fit(mon:=ActivationMonitor()) and mon.k==2 and (rows(mon)>0).all() # more modules than last time

def test_compiled_model_between_fits():
    "`lr_find`, `get_preds`, `validate` around the fits of a compiled model: no reset, no new graph, each fit records"
    # the callbacks hold the hooks, idle, through every loop (`StatsEngine.hold`): dynamo then reuses the fit's graphs
    import warnings
    from torch._dynamo.utils import counters
    from fastai.callback.schedule import Learner # adds `lr_find`
    from deepstable_fastai.guard import ExplosionGuard
    torch._dynamo.reset(); set_seed(0)
    m = nn.Sequential(nn.Linear(64,32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Linear(32,10))
    mon,g = ActivationMonitor(modules=['0']),ExplosionGuard('skip', verbose=False) # the guard hooks more modules
    learn = Learner(digits_dls(flat=True, bs=64), torch.compile(m), loss_func=F.cross_entropy, cbs=[mon,g])
    def run(f):
        with warnings.catch_warnings(record=True) as ws, learn.no_bar(), learn.no_logging():
            warnings.simplefilter('always'); f()
        assert not any('compiles again' in str(w.message) for w in ws), [str(w.message) for w in ws]
        assert n_hooks(learn.model)==0
    def fit():
        run(lambda: learn.fit(1, 1e-3, cbs=nan_batch(2)))
        r = torch.as_tensor(mon.values('std'))
        assert mon.k==len(learn.dls.train) and (r[:2]>0).all() and (r[3:]>0).all(), r
        assert [(e['train_iter'], e['kind']) for e in g.events]==[(2, 'nonfinite_act')]
    run(lambda: learn.lr_find(num_it=3, show_plot=False, suggest_funcs=()))
    fit(); n = counters['stats']['unique_graphs']
    for _ in range(2):
        run(learn.get_preds); run(learn.validate); fit()
    assert counters['stats']['unique_graphs']==n, (n, dict(counters['stats']))

class PredsFirst(Callback):
    "Calls `get_preds` in the first `before_epoch` of a fit: a loop nested before any `before_train`"
    def before_epoch(self):
        if self.epoch==0 and not hasattr(self.learn, 'gather_preds'): self.learn.get_preds()

@pytest.mark.parametrize('compiled', [False, True])
def test_loop_nested_before_train(compiled):
    "A `get_preds` nested in a fit before its first `before_train` leaves the monitor and the guard on for the fit"
    from deepstable_fastai.guard import ExplosionGuard
    torch._dynamo.reset(); set_seed(0)
    m = nn.Sequential(nn.Linear(64,32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Linear(32,10))
    learn = Learner(digits_dls(flat=True, bs=64), torch.compile(m) if compiled else m, loss_func=F.cross_entropy)
    mon,g = ActivationMonitor(),ExplosionGuard('skip', verbose=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[mon, g, PredsFirst(), nan_batch(2), stop_after(3)])
    assert mon.k==3 and [(e['train_iter'], e['kind']) for e in g.events]==[(2, 'nonfinite_act')]
    assert n_hooks(learn.model)==0 and '_stats_engine' not in learn.__dict__

def test_no_engine_left_alive():
    "Each fit, and each loop of a compiled model, makes an engine: none stays alive once its loop ended"
    import gc
    from deepstable_fastai.engine import StatsEngine
    from deepstable_fastai.guard import ExplosionGuard
    def alive(): gc.collect(); return sum(isinstance(o, StatsEngine) for o in gc.get_objects())
    n = alive()
    for compiled in (False, True):
        torch._dynamo.reset(); set_seed(0)
        m = nn.Sequential(nn.Linear(64,32), nn.ReLU(), nn.Linear(32,10))
        learn = Learner(digits_dls(flat=True, bs=64), torch.compile(m) if compiled else m, loss_func=F.cross_entropy,
                        cbs=[ActivationMonitor(), ExplosionGuard('skip', verbose=False)])
        with learn.no_bar(), learn.no_logging():
            for _ in range(3): learn.fit(1, 1e-3, cbs=stop_after(2)); learn.get_preds()
        assert alive()<=n, (compiled, alive(), n) # the learner lives on: its finalizers held every engine before

class Raise(Callback):
    def before_epoch(self): raise RuntimeError('boom')

def test_per_call_callbacks_of_a_loop_that_raised():
    "Per-call callbacks of a fit that raised before training, on a compiled model: their idle hooks leave with them"
    from deepstable_fastai.guard import ExplosionGuard
    torch._dynamo.reset(); set_seed(0)
    m = nn.Sequential(nn.Linear(64,32), nn.ReLU(), nn.Linear(32,10))
    learn = Learner(digits_dls(flat=True, bs=64), torch.compile(m), loss_func=F.cross_entropy)
    with learn.no_bar(), learn.no_logging(): # hooked and unhooked as a fit leaves it
        learn.fit(1, 1e-3, cbs=[ActivationMonitor(), stop_after(2)])
    for cb in (ActivationMonitor(), ExplosionGuard('skip', verbose=False)):
        with pytest.raises(RuntimeError), learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3, cbs=[cb, Raise()])
        assert n_hooks(learn.model)==0 and '_stats_engine' not in learn.__dict__, type(cb).__name__

def test_removed_during_a_fit():
    "`removed_cbs` in a running fit (fastai's `FetchPredsCallback`) takes the callbacks out and back: the fit goes on"
    from fastai.callback.core import FetchPredsCallback
    from deepstable_fastai.guard import ExplosionGuard
    set_seed(0)
    m = nn.Sequential(nn.Linear(64,32), nn.ReLU(), nn.Linear(32,10))
    mon,g = ActivationMonitor(),ExplosionGuard('skip', verbose=False)
    learn = Learner(digits_dls(flat=True, bs=64), m, loss_func=F.cross_entropy, cbs=[mon, g])
    n = len(learn.dls.train)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=[FetchPredsCallback(cbs=[mon, g]), nan_batch(n+2)])
    assert mon.k==2*n and [(e['epoch'], e['train_iter']) for e in g.events]==[(1, n+2)], (mon.k, g.events)
    assert n_hooks(m)==0

def test_monitor_exported_before_loops():
    "A monitor pickled when it kept its learner as `learn` (before `_Loops`) loads with its learner"
    learn = mlp_learner(cbs=ActivationMonitor())
    d = learn.activation_monitor.__getstate__(); d['learn'] = d.pop('_learn')
    mon = ActivationMonitor.__new__(ActivationMonitor); mon.__setstate__(d)
    assert mon.learn is learn and mon.update_sample==16384

@pytest.mark.usefixtures('kernel')
@pytest.mark.parametrize('modules', [['0', '2'], ['2', '0']])
def test_some_modules_beside_guard(modules):
    "A monitor of some modules beside the guard, which hooks them all: the monitor's own rows, as without the guard"
    from deepstable_fastai.guard import ExplosionGuard
    def run(guard):
        set_seed(0)
        m = nn.Sequential(nn.Linear(64,32), nn.ReLU(), nn.Linear(32,10))
        cbs = [ActivationMonitor(modules=modules, update_every=1, with_hist=True)]
        learn = Learner(digits_dls(flat=True, bs=64), m, loss_func=F.cross_entropy,
                        cbs=cbs+([ExplosionGuard('skip', verbose=False)] if guard else []))
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=stop_after(4))
        return learn.activation_monitor
    a,b = run(False),run(True)
    assert b.names==modules and b.k==a.k==4
    assert torch.allclose(a.buf[:a.k], b.buf[:b.k], equal_nan=True) and torch.equal(a.hbuf[:a.k], b.hbuf[:b.k])

class Blow(Callback):
    "Before training batch 2, module 0 of the model outputs a huge spread of negative constants (zero after the ReLU)"
    order = -20
    def before_batch(self):
        if self.training and self.train_iter==2:
            with torch.no_grad(): self.model[0].weight.zero_(); self.model[0].bias.copy_(-1e9*torch.arange(1., 33.))

@pytest.mark.usefixtures('kernel')
def test_guard_of_some_modules_beside_monitor():
    "A guard of some modules checks and records those only, as without a monitor of more modules beside it"
    from deepstable_fastai.guard import ExplosionGuard
    def run(mods, monitor):
        set_seed(0)
        m = nn.Sequential(nn.Linear(64,32), nn.ReLU(), nn.Linear(32,10))
        cbs = [ExplosionGuard('skip', modules=mods, verbose=False), Blow(), nan_batch(3)]
        learn = Learner(digits_dls(flat=True, bs=64), m, loss_func=F.cross_entropy,
                        cbs=cbs+([ActivationMonitor()] if monitor else []))
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=stop_after(5))
        g = learn.explosion_guard
        return [(e['train_iter'], e['kind'], e['layer']) for e in g.events],[set(g.flight(e).module) for e in g.events]
    assert run(None, False)[0][0]==(2, 'exploding_act', '0') # watching every module, the guard sees module 0 blow up
    ev,fl = run(['2'], True)
    assert (ev,fl)==run(['2'], False), ev
    assert ev==[(3, 'nonfinite_act', 'input of 2')] and fl==[{'2'}], (ev, fl) # its first module's input, not 'input'

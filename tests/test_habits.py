"""fastai habits that broke the monitor or the guard (two reviews' sweeps of fastai's entry points, 2026-12-02): a fit
after a 'stop', a model whose output a callback reshapes before the loss (`RNNCallback`), an lr set by the next `fit`
after an interrupted rollback, `GradientAccumulation`, prediction loops nested in a fit, and bad arguments."""
import pickle, warnings
import numpy as np, pytest, torch, torch.nn as nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
from fastai.callback.core import Callback, CancelBatchException
from fastai.callback.training import GradientAccumulation
from fastai.callback.rnn import RNNCallback, ModelResetter
from fastai.callback.core import FetchPredsCallback
import fastai.callback.progress # `Learner.no_bar`, `no_logging`
import fastai.callback.schedule # `Learner.fine_tune`
from conftest import nan_batch
from deepstable_fastai.data import digits_dls
from deepstable_fastai.monitor import ActivationMonitor
from deepstable_fastai.guard import ExplosionGuard

def mlp(): return nn.Sequential(nn.Flatten(), nn.Linear(64,32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32,10))

def learner(cbs=None, model=None):
    set_seed(0)
    return Learner(digits_dls(size=8, bs=64), model or mlp(), loss_func=CrossEntropyLossFlat(), cbs=cbs)

def fit(learn, *a, **k):
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore'); learn.fit(*a, **k)

def hooks(m): return sum(len(o._forward_hooks) for o in m.modules())

@pytest.mark.usefixtures('kernel')
def test_fit_after_stop():
    "A 'stop' leaves no NaN gradient behind: fastai skips `zero_grad` when the fit is cancelled in `before_step`"
    g = ExplosionGuard('stop'); learn = learner([g])
    fit(learn, 1, 1e-2, cbs=[nan_batch(3)])
    assert g.stop_reason is not None and learn.train_iter==3
    assert all(p.grad is None or p.grad.isfinite().all() for p in learn.model.parameters())
    fit(learn, 1, 1e-2) # clean data
    assert g.stop_reason is None and g.events==[] and learn.train_iter==len(learn.dls.train)
    assert all(p.isfinite().all() for p in learn.model.parameters())

class Body(nn.Module):
    "A model with a tuple output, as fastai's AWD-LSTM: `RNNCallback` keeps the first element for the loss"
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64,32), nn.ReLU(), nn.Linear(32,32), nn.ReLU())
        self.head = nn.Linear(32,10)
    def forward(self, x): h = self.body(x); return self.head(h),[h],[h]

class NaNInside(Callback):
    "Make the output of the model's submodule `mod` (default `body[3]`) NaN at training batch `n`"
    order = -20
    def __init__(self, n, mod='body.3'): self.n,self.mod = n,mod
    def before_fit(self):
        def f(m, i, o):
            if self.learn.training and self.learn.train_iter==self.n: return o*float('nan')
        self.h = self.learn.model.get_submodule(self.mod).register_forward_hook(f)
    def after_fit(self): self.h.remove()

@pytest.mark.usefixtures('kernel')
@pytest.mark.parametrize('fault', ['inside', 'input'])
def test_replay_of_a_reshaped_output(fault):
    "The guard's replays of a batch go through the loss as the fit does, here after `RNNCallback`'s `after_pred`"
    g = ExplosionGuard('skip'); learn = learner([g, RNNCallback()], Body())
    fit(learn, 1, 1e-2, cbs=[NaNInside(5) if fault=='inside' else nan_batch(5)])
    assert [e['iter'] for e in g.events]==[5], g.events
    assert g.events[0]['layer']==('body.3' if fault=='inside' else 'input'), g.events[0]
    assert hooks(learn.model)==0 and learn.__dict__.get('_stats_engine') is None
    assert all(p.isfinite().all() for p in learn.model.parameters())

class LRs(Callback):
    order = 12 # after the guard: the lr of the step
    def before_fit(self): self.lrs = set()
    def before_step(self): self.lrs.add(self.opt.hypers[0]['lr'])

class Interrupt(Callback):
    def after_step(self):
        if self.train_iter==6: raise KeyboardInterrupt

def test_next_fit_keeps_its_lr():
    "A fit interrupted while the guard's lr is backed off: the next `fit` trains at the lr it was given"
    g = ExplosionGuard('rollback', lr_recover=0); learn = learner([g])
    with pytest.raises(KeyboardInterrupt): fit(learn, 1, 1e-2, cbs=[nan_batch(3), Interrupt()])
    assert [e['action'][:8] for e in g.events]==['rollback']
    log = LRs(); fit(learn, 1, 1e-3, cbs=[log])
    assert log.lrs=={1e-3}
    learn.opt.set_hypers(lr=0.5) # and `remove()` by hand outside a fit gives back the lr it backed off
    with pytest.raises(KeyboardInterrupt): fit(learn, 1, 1e-2, cbs=[nan_batch(3), Interrupt()])
    assert learn.opt.hypers[0]['lr']==5e-3
    g.remove(); assert learn.opt.hypers[0]['lr']==1e-2

def test_gradient_accumulation():
    "Under `GradientAccumulation` an update ratio is measured on a batch that steps"
    m = ActivationMonitor(update_every=2); learn = learner([m, GradientAccumulation(n_acc=128)])
    fit(learn, 1, 1e-2)
    r = m.values('update_ratio')
    assert torch.isfinite(torch.as_tensor(r)).any(1).sum()>=len(learn.dls.train)//4

def test_nested_prediction_loop_not_recorded():
    "`record_valid=True` records the fit's validation batches only, not those of a `get_preds` inside the fit"
    dls = digits_dls(size=8, bs=64)
    m = ActivationMonitor(record_valid=True); learn = learner([m, FetchPredsCallback(dl=dls.valid)])
    fit(learn, 2, 1e-2)
    assert (m.pos[:m.k,3]==0).sum()==2*len(learn.dls.valid)

@pytest.mark.parametrize('kw', [dict(cap=4.0), dict(cap=True), dict(every=1.5), dict(every='2'), dict(every=True),
                                dict(update_every=2.0), dict(bins=4.0), dict(hist_range=(1,)), dict(hist_range=None),
                                dict(hist_range=('a','b'))])
def test_monitor_bad_arguments(kw):
    with pytest.raises(ValueError, match=f"`{next(iter(kw))}`"): ActivationMonitor(**kw)

@pytest.mark.parametrize('kw', [dict(act_factor=None), dict(act_factor='3'), dict(grad_factor=float('nan')),
                                dict(std_min=None), dict(dead_max='x'), dict(lr_backoff=None), dict(std_max=True),
                                dict(verbose='no'), dict(patience=True)])
def test_guard_bad_arguments(kw):
    with pytest.raises(ValueError, match=f"`{next(iter(kw))}`"): ExplosionGuard(**kw)

@pytest.mark.parametrize('kw', [dict(verbose=0), dict(verbose=np.True_), dict(retries=np.int64(2)),
                                dict(act_factor=np.float32(50))])
def test_guard_arguments_accepted(kw): ExplosionGuard(**kw)

def test_read_before_any_fit():
    "Reading a monitor or a guard that has recorded nothing says so"
    with pytest.raises(ValueError, match='Nothing recorded'): ActivationMonitor().to_df()
    with pytest.raises(ValueError, match='no event'): ExplosionGuard().flight()

def test_predict_on_the_digits():
    "`Learner.predict` on the embedded data, with both callbacks: a prediction, no record, no hook left"
    m,g = ActivationMonitor(),ExplosionGuard(); learn = learner([m, g])
    fit(learn, 1, 1e-2); k = m.k
    x,y = learn.dls.valid_ds[0]
    with learn.no_bar(): dec,idx,probs = learn.predict(x)
    assert probs.shape==(10,) and int(idx)==int(probs.argmax()) and m.k==k and g.events==[]
    assert hooks(learn.model)==0 and learn.__dict__.get('_stats_engine') is None

@pytest.mark.parametrize('n_acc,update_every', [(128,2), (256,8), (512,4)])
def test_update_ratio_of_the_accumulated_step(n_acc, update_every):
    "The sample of an update batch cancelled before its step waits for the step: one ratio per update batch"
    m = ActivationMonitor(update_every=update_every); learn = learner([m, GradientAccumulation(n_acc=n_acc)])
    fit(learn, 2, 1e-2)
    r = torch.as_tensor(m.values('update_ratio')); ok = r.isfinite().any(1)
    tot,a = 2*len(learn.dls.train),n_acc//64 # the accumulation counts on across epochs: a step every `a` batches
    steps = [g for g in range(tot) if (g+1)%a==0]
    want = [u for u in range(0, tot, update_every) if any(u<=g<u+update_every for g in steps)] # not resampled first
    assert ok.nonzero().flatten().tolist()==want
    assert (r[ok].nan_to_num(1.)>0).all() # modules without parameters have no ratio

@pytest.mark.parametrize('r', [(-float('inf'), 5.), (-1e39, 1e39), (0., 1e-46), (0., 1e-44), (float('nan'), 1.),
                               (0, 10**400), (1e6, 1e6+0.01)])
def test_hist_range_that_float32_cannot_bin(r):
    with pytest.raises(ValueError, match='`hist_range`'): ActivationMonitor(with_hist=True, hist_range=r)

@pytest.mark.parametrize('r', [[-5, 5], (np.float32(-1), np.float64(2)), np.array([-3., 3.]), torch.tensor([-2., 2.])])
def test_hist_range_accepted(r): ActivationMonitor(with_hist=True, hist_range=r)

def test_lr_given_back_after_a_fit_that_raised():
    "A per-call guard whose fit raised while its lr was backed off gives the optimizer its lr back"
    learn = learner()
    with pytest.raises(KeyboardInterrupt):
        fit(learn, 1, 1e-2, cbs=[ExplosionGuard('rollback', lr_recover=0), nan_batch(3), Interrupt()])
    assert learn.opt.hypers[0]['lr']==1e-2

def test_bins_never_out_of_range():
    "A bin width that float32 rounds to an infinite scale: 0*inf is NaN, which must land in a bin, not past the counts"
    from deepstable_fastai.stats import kernel_path, _bins
    assert (_bins(torch.zeros(10), 0., 1e-44, 40)==0).all()
    if kernel_path(wait=True)!='cpp': return
    h = torch.zeros(2, 43, dtype=torch.long)
    torch.ops.deepstable.hist_(torch.zeros(5000), h, 1, 0., 1e-44) # the vectorised blocks and the tail
    torch.ops.deepstable.hist_(torch.tensor([0., float('nan')]), h, 0, 0., 1e-44) # the branchy loop
    assert h[1,0]==5000 and h[1].sum()==5000 and h[0].tolist()==[1]+[0]*39+[1,0,0]

class CancelAfterGuard(Callback):
    order = 12 # after the guard's before_step, which backs the lr off
    def before_step(self):
        if self.train_iter in (8, 9, 10): raise CancelBatchException

def test_backed_off_lr_does_not_compound():
    "A batch cancelled after the guard's `before_step` skips its `after_step`: the backed-off lr is not scaled twice"
    g = ExplosionGuard('rollback', lr_recover=0); log = LRs(); learn = learner([g])
    fit(learn, 1, 1e-2, cbs=[nan_batch(3), CancelAfterGuard(), log])
    assert log.lrs=={1e-2, 5e-3} and learn.opt.hypers[0]['lr']==1e-2, log.lrs

class FirstFitNaN(Callback):
    "Make sample 0 of training batch 5 NaN in the first fit only; note the training loader's length after each"
    order = -20
    def __init__(self): self.fits,self.lens = 0,[]
    def before_fit(self): self.fits += 1
    def before_batch(self):
        if self.training and self.fits==1 and self.train_iter==5:
            x = self.xb[0].clone(); x[0] = float('nan'); self.learn.xb = (x,)
    def after_train(self): self.lens.append(len(self.dl.get_idxs()))

@pytest.mark.usefixtures('kernel')
def test_fine_tune_is_one_run():
    "The unfrozen fit of a `fine_tune` goes on from the frozen one: guard events, dropped samples, monitor history"
    g,m = ExplosionGuard(verbose=False, drop_bad_samples=True),ActivationMonitor()
    learn,c = learner([g, m]),FirstFitNaN()
    n,N = len(learn.dls.train),len(learn.dls.train.get_idxs())
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore'); learn.fine_tune(1, 1e-3, cbs=c)
    assert [(e['train_iter'], e['kind']) for e in g.events]==[(5, 'nonfinite_act')], g.events
    assert len(g.bad_samples)==1 and c.lens==[N-1, N-1] # still left out in the unfrozen fit
    assert m.steps.tolist()==list(range(2*n)) and hooks(learn.model)==0
    for cb in (g, m): assert pickle.loads(pickle.dumps(cb))._tune is None # the run's frame is not pickled
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 1e-3) # a new call: a new run
    assert g.events==[] and m.steps.tolist()==list(range(2*n))
    fit(learn, 1, 1e-3)
    assert m.steps.tolist()==list(range(n)) and len(learn.dls.train.get_idxs())==N

class NaNAt(Callback):
    "Make the inputs of training batches `at` all NaN"
    order = -20
    def __init__(self, *at): self.at = at
    def before_batch(self):
        if self.training and self.train_iter in self.at: self.learn.xb = (self.xb[0].clone().fill_(float('nan')),)

@pytest.mark.usefixtures('kernel')
@pytest.mark.parametrize('action', ['skip', 'rollback'])
def test_cancelled_step_update_ratio(action):
    "A step the guard cancels has an update ratio of 0 (fastai still calls `after_step`): a rollback is no update"
    g,m = ExplosionGuard(action, snapshot_every=10, verbose=False),ActivationMonitor(update_every=1)
    learn = learner([g, m])
    fit(learn, 1, 1e-2, cbs=NaNAt(15, 16)) # the second bad batch in a row rolls back to the snapshot of step 10
    assert [e['train_iter'] for e in g.events]==[15, 16]
    r = m.values('update_ratio'); r = r[:, r[0].isfinite()] # modules with parameters
    assert r.shape[1]==3 and (r[[15,16]]==0).all() and r[:15].isfinite().all() and r[17:].isfinite().all(), r[:,-1]

class PredsAtEpochEnd(Callback):
    "Run `get_preds` at the end of each epoch, a loop nested in the fit (fastai sets `train_iter` back to 0 in it)"
    order = 60
    def after_epoch(self):
        if not hasattr(self.learn, 'gather_preds'): self.learn.get_preds(dl=self.dls.valid)

def tune(learn, *a, **k):
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore'); learn.fine_tune(*a, **k)

@pytest.mark.usefixtures('kernel')
def test_fine_tune_run_edges():
    "Counting on through a nested loop; a `fine_tune` with no frozen epoch is a new run; a 'stop' stops the run"
    g,m = ExplosionGuard(verbose=False),ActivationMonitor(every=2)
    learn = learner([g, m]); n = len(learn.dls.train)
    tune(learn, 1, 1e-3, cbs=[NaNAt(3), PredsAtEpochEnd()])
    assert [e['train_iter'] for e in g.events]==[3, n+3] and m.steps.tolist()==list(range(0, 2*n, 2))
    tune(learn, 1, 1e-3, freeze_epochs=0) # the frozen fit trains nothing: no run to continue
    assert g.events==[] and m.steps.tolist()==list(range(0, n, 2))
    g.action = 'stop'
    tune(learn, 1, 1e-3, cbs=NaNAt(3))
    assert [(e['train_iter'], e['action'][:4]) for e in g.events]==[(3, 'stop')] and g.stop_reason
    assert m.steps.tolist()==[0, 2] and learn.train_iter==0 and hooks(learn.model)==0 # the unfrozen fit did not train
    fit(learn, 1, 1e-3)
    assert g.events==[] and g.stop_reason is None and m.steps.tolist()==list(range(0, n, 2))

class MyResetter(ModelResetter): pass

class NaNToken(Callback):
    "NaN in an AWD-LSTM's embedding output wherever the input token is `tok` (so it follows its sample); notes where"
    order = -20
    def __init__(self, tok): self.tok,self.at = tok,[]
    def before_batch(self):
        rows = (self.xb[0]==self.tok).any(1).nonzero()[:,0].tolist()
        if self.training: self.at += [(self.train_iter, [r]) for r in rows]
    def before_fit(self):
        def f(m, i, o):
            if self.learn.training and (k:=i[0]==self.tok).any(): o = o.clone(); o[k] = float('nan'); return o
        self.h = self.learn.model[0].encoder_dp.register_forward_hook(f)
    def after_fit(self): self.h.remove()

@pytest.mark.usefixtures('kernel')
@pytest.mark.parametrize('resetter', [ModelResetter, MyResetter, None])
def test_stateful_model_reset_after_a_bad_batch(resetter):
    "With a `ModelResetter`, an RNN's NaN hidden state is reset after a skip, and each replay starts from a reset state"
    from fastai.data.core import DataLoaders
    from fastai.text.data import LMDataLoader
    from fastai.text.models.awdlstm import AWD_LSTM, awd_lstm_lm_config
    from fastai.text.models.core import get_language_model
    set_seed(0)
    toks = [torch.randint(0, 28, (500,)) for _ in range(4)]; toks[2][137] = 29 # one bad token
    dls = DataLoaders(*(LMDataLoader(t, bs=4, seq_len=10) for t in (toks, toks[:1])))
    m = get_language_model(AWD_LSTM, 30, config={**awd_lstm_lm_config, 'emb_sz':16, 'n_hid':32, 'n_layers':2})
    g,bad = ExplosionGuard(verbose=False, max_skips=1000, drop_bad_samples=True),NaNToken(29)
    cbs = [*([resetter()] if resetter else []), RNNCallback(), g, bad]
    learn = Learner(dls, m, loss_func=CrossEntropyLossFlat(), cbs=cbs)
    fit(learn, 2, 1e-3) # a language model's rows are no dataset items: nothing blamed by index, nothing dropped
    assert len(bad.at)==2 and g.bad_samples==[], bad.at # once an epoch
    evs = [(e['train_iter'], e.get('positions')) for e in g.events]
    if resetter is None: assert len(evs)>10, evs # the NaN state carried on
    else: assert evs==bad.at and all(p.isfinite().all() for p in learn.model.parameters()), (evs, bad.at)

# Second sweep (2026-12-02, later): fastai's trackers and schedulers, its loggers, AMP, and models whose state
# holds non-finite values on purpose.

class NaNBatches(Callback):
    "NaN inputs in training batches `its` of epoch `ep`"
    order = -20
    def __init__(self, ep, its): self.ep,self.its = ep,its
    def before_batch(self):
        if self.training and self.epoch==self.ep and self.iter in self.its:
            self.learn.xb = (self.xb[0].clone().fill_(float('nan')),)

class StepLRs(Callback):
    order = 12 # after the guard's `before_step`: the lr the step takes
    def before_fit(self): self.lrs = []
    def before_step(self): self.lrs.append((self.epoch, self.opt.hypers[0]['lr']))

@pytest.mark.parametrize('action', ['rollback', 'stop'])
def test_restore_keeps_the_hypers_of_now(action):
    "A rollback to the trusted snapshot, or a stop, puts back weights and optimizer state, not an older lr"
    from fastai.callback.tracker import ReduceLROnPlateau
    g,log = ExplosionGuard(action, lr_recover=0, verbose=False),StepLRs()
    learn = learner([g])
    # the lr is cut at the end of epochs 1 and 2; two bad batches in a row in epoch 2 roll back to a snapshot taken
    # before the first cut
    fit(learn, 4 if action=='rollback' else 3, 1e-2,
        cbs=[ReduceLROnPlateau(patience=1, min_delta=10., factor=10.), NaNBatches(2, (1, 2)), log])
    assert [e['action'] for e in g.events]==(['rollback', 'rollback'] if action=='rollback' else ['stop'])
    assert g.events[-1]['message'].endswith('back to the state after batch 39') # epoch 1 (of 22), before the cut
    if action=='rollback':
        assert {round(lr, 8) for ep,lr in log.lrs if ep==2}=={1e-3, 5e-4} # the cut, then its back-off: not 1e-2
        assert {round(lr, 8) for ep,lr in log.lrs if ep==3}=={5e-5}
    assert learn.opt.hypers[0]['lr']==pytest.approx(1e-5 if action=='rollback' else 1e-3)

class AttnMask(nn.Module):
    "An additive attention mask (`-inf` above the diagonal) kept as a buffer, as `nn.Transformer`'s users do"
    def __init__(self):
        super().__init__(); self.lin = nn.Linear(8, 8); self.out = nn.Linear(64, 10)
        self.register_buffer('mask', nn.Transformer.generate_square_subsequent_mask(8))
    def forward(self, x):
        x = x.view(-1, 8, 8)
        a = (self.lin(x) @ x.transpose(1, 2) + self.mask).softmax(-1) @ x
        return self.out(a.flatten(1))

def test_minus_inf_buffer_is_not_a_failure():
    "A fit of a model with an `-inf` mask buffer keeps its trained weights (it was restored to a snapshot)"
    g = ExplosionGuard('skip', verbose=False); learn = learner([g], AttnMask())
    w0 = learn.model.out.weight.detach().clone()
    fit(learn, 1, 1e-2)
    assert g.events==[] and not torch.equal(w0, learn.model.out.weight)
    assert torch.isinf(learn.model.mask).sum()==28

def test_nonfinite_parameter_at_the_start():
    "A parameter that is not finite from the start (an unused NaN embedding row) is said once, and training is kept"
    m = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(4, 10))
    with torch.no_grad(): m[0].weight[19] = float('nan') # no token 19 in the data
    learn = Learner(digits_dls(flat=True, bs=64), m, loss_func=CrossEntropyLossFlat(),
                    cbs=[ExplosionGuard(verbose=False)])
    class Tokens(Callback):
        order = -20
        def before_batch(self): self.learn.xb = (self.xb[0][:, :1].long().clamp(0, 16),)
    w0 = m[2].weight.detach().clone()
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); learn.fit(1, 1e-2, cbs=Tokens())
    assert [str(o.message) for o in w if "not finite since the start" in str(o.message)]==[
        "ExplosionGuard: parameters not finite since the start of the fit, which no snapshot can mend: 0.weight"]
    assert learn.explosion_guard.events==[] and not torch.equal(w0, m[2].weight) # no restore threw the fit away

class Remover(Callback):
    def __init__(self, cb): self.cb = cb
    def after_epoch(self):
        if self.epoch==0: self.learn.remove_cb(self.cb)

@pytest.mark.parametrize('cls', [ActivationMonitor, ExplosionGuard])
def test_removed_in_a_running_fit(cls):
    "`remove_cb` of our callback while a fit runs takes its hooks off"
    cb = cls(); learn = learner([cb])
    fit(learn, 2, 1e-2, cbs=Remover(cb))
    assert cb not in learn.cbs and hooks(learn.model)==0 and cb._engine is None
    assert '_stats_engine' not in learn.__dict__

def test_messages_stay_out_of_the_csv_log(tmp_path):
    "Without a progress bar the guard's messages go to the learner's logger under `CSVLogger`, not into its file"
    import pandas as pd
    from fastai.callback.progress import CSVLogger
    learn,said = learner([ExplosionGuard(), CSVLogger(tmp_path/'h.csv')]),[]
    learn.logger = said.append
    with learn.no_bar(): learn.fit(2, 1e-2, cbs=nan_batch(3))
    assert len(learn.explosion_guard.events)==1 and len(pd.read_csv(tmp_path/'h.csv'))==2
    assert [o for o in said if isinstance(o, str)]==[learn.explosion_guard.events[0]['message']]

class DropNaNLoss(Callback):
    "A user's own check: drop a batch whose loss is not finite, before its backward"
    order = 20
    def before_fit(self): self.dropped = []
    def after_loss(self):
        if self.training and not torch.isfinite(self.loss):
            self.dropped.append(self.train_iter); raise CancelBatchException()

@pytest.mark.parametrize('action', ['skip', 'stop'])
def test_batch_cancelled_before_backward(action):
    "A batch a user's callback cancels before backward is judged on its own, not with the next batch"
    g,d = ExplosionGuard(action, verbose=False),DropNaNLoss()
    learn = learner([g]); fit(learn, 1, 1e-2, cbs=[d, nan_batch(3)])
    assert d.dropped==[3] and [(e['train_iter'], e['layer']) for e in g.events]==[(3, 'input')]
    assert learn.train_iter==(len(learn.dls.train) if action=='skip' else 3)
    assert all(t.isfinite().all() for t in learn.model.state_dict().values() if t.is_floating_point())

def cpu_amp(dtype=torch.float16, **kw):
    "fastai's `MixedPrecision` with the CPU's autocast and `GradScaler`"
    from fastai.callback.fp16 import MixedPrecision
    from torch.amp import GradScaler
    class CPUMixedPrecision(MixedPrecision):
        def before_fit(self):
            self.autocast = torch.autocast('cpu', dtype=dtype)
            self.learn.scaler,self.scales = GradScaler('cpu', enabled=dtype==torch.float16, **kw),[]
    return CPUMixedPrecision()

def test_skipped_batches_under_amp_leave_autocast_off():
    "The guard leaves a batch out after `MixedPrecision` entered autocast for it: it leaves it again"
    g = ExplosionGuard('rollback', skip_batches=3, verbose=False); learn = learner([cpu_amp(torch.bfloat16), g])
    fit(learn, 1, 1e-2, cbs=nan_batch(5))
    assert g.skipped==[6, 7, 8] and not torch.is_autocast_enabled('cpu')
    assert learn.model(torch.randn(4, 1, 8, 8)).dtype==torch.float32

class Big(Callback):
    "Sample 3 of training batch 8 is finite in float32 and overflows float16 in the first Linear"
    order = -20
    def before_batch(self):
        if self.training and self.train_iter==8: x = self.xb[0].clone(); x[3] = 3e5; self.learn.xb = (x,)

def test_blame_under_amp():
    "The replays that blame samples run under the fit's autocast: an fp16 overflow is reproduced"
    g = ExplosionGuard('skip', drop_bad_samples=True, verbose=False); learn = learner([g, cpu_amp()])
    fit(learn, 1, 1e-2, cbs=Big())
    assert [(e['train_iter'], e['layer'], e['positions']) for e in g.events]==[(8, '1', [3])] and len(g.bad_samples)==1

class BigGrad(Callback):
    "A finite gradient spike at training batch 25 (no activation statistics there under `act_every=2`)"
    order = 5
    def after_loss(self):
        if self.training and self.train_iter==25: self.learn.loss_grad = self.learn.loss_grad*1e3

class BadTarget(Callback):
    "Float targets, one NaN in training batch 26"
    order = -30
    def before_batch(self):
        y = self.yb[0].float()
        if self.training and self.train_iter==26: y = y.clone(); y[5] = float('nan')
        self.learn.yb = (y,)

def test_amp_cancelled_step_reads_no_older_replay():
    "A NaN batch that AMP's scaler cancelled right after an event is not named from that event's replay"
    import torch.nn.functional as F
    g = ExplosionGuard('skip', verbose=False, act_every=2)
    set_seed(0)
    learn = Learner(digits_dls(size=8, bs=64), mlp(), loss_func=lambda o,y: F.mse_loss(o[:,0], y),
                    cbs=[g, cpu_amp(init_scale=1.)])
    fit(learn, 2, 1e-3, cbs=[BigGrad(), BadTarget()])
    assert [(e['train_iter'], e['kind'], e['layer'], e.get('positions')) for e in g.events]==[
        (25, 'exploding_grad', '4.weight', None), (26, 'nonfinite_loss', 'loss', [5])]

# The monitor's history (a third sweep, 2026-12-02)

def test_fine_tune_history_evenly_spaced():
    "A history that a `fine_tune` continues is spaced as one fit's, and its epochs count on"
    from fastai.torch_core import params
    def run(tune):
        set_seed(0); m = nn.Sequential(nn.Flatten(), nn.Linear(64,32), nn.ReLU(), nn.Linear(32,10))
        mon = ActivationMonitor(cap=16)
        learn = Learner(digits_dls(size=8, bs=64), m, loss_func=CrossEntropyLossFlat(), cbs=[mon],
                        splitter=lambda m: [params(m[1]), params(m[3])])
        with learn.no_bar(), learn.no_logging():
            if tune: learn.fine_tune(3, 1e-2, freeze_epochs=1) # 22 + 66 training batches
            else: learn.fit(4, 1e-2)
        return mon
    a,b = run(True),run(False)
    assert a.steps.tolist()==b.steps.tolist()==list(range(0, 88, 8))
    assert a.pos[:a.k,1].tolist()==b.pos[:b.k,1].tolist()==[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]

def test_continued_history_with_validation_records():
    "A validation record's step is the next training batch's: the fit after it goes on from there, as one fit does"
    def run(tune):
        set_seed(0); mon = ActivationMonitor(record_valid=True, every=2); learn = learner([mon])
        with learn.no_bar(), learn.no_logging():
            if tune: learn.fine_tune(1, 1e-2, freeze_epochs=1)
            else: learn.fit(2, 1e-2)
        return mon
    a,b = run(True),run(False)
    assert a.steps.tolist()==b.steps.tolist() and a._end==b._end==2*len(a.learn.dls.train)

def test_two_monitors_share_the_histogram_range():
    "Histograms are counted once per batch: two monitors of a learner that ask for different ranges are told so"
    a,b = ActivationMonitor(with_hist=True),ActivationMonitor(with_hist=True, hist_range=(-1, 1), modules=['1'])
    with pytest.raises(ValueError, match='`hist_range`, `bins`: another ActivationMonitor'): fit(learner([a, b]), 1)
    alone = ActivationMonitor(with_hist=True); fit(learner([alone]), 1)
    a,b = ActivationMonitor(with_hist=True),ActivationMonitor(hist_range=(-1, 1)) # no histograms: no say
    fit(learner([a, b]), 1)
    assert torch.equal(a.hist_counts('1'), alone.hist_counts('1'))

def test_reads_are_copies():
    "What `values` and `steps` return can be changed without changing the history"
    mon = ActivationMonitor(); fit(learner([mon]), 1)
    v,s = mon.values('grad_norm'),mon.steps
    v[v.isnan()] = 0; s += 100
    assert mon.values('grad_norm').isnan().any() and mon.steps[0]==0 and mon.to_df().step.min()==0

def test_module_named_twice_is_hooked_once():
    m = mlp(); mon = ActivationMonitor(modules=['3', '1', m[3]]); fit(learner([mon], m), 1)
    assert mon.names==['3', '1'] and len(mon.to_df()) # in the order first named

# A review of the sweeps' fixes (2026-12-02)

def test_cancelled_batch_judged_once():
    "A bad batch a user's callback cancels is acted on once: the batches left out after its rollback are not"
    g,d = ExplosionGuard('rollback', skip_batches=2, verbose=False),DropNaNLoss()
    learn = learner([g]); fit(learn, 1, 1e-2, cbs=[d, nan_batch(3)])
    assert [(e['train_iter'], e['action']) for e in g.events]==[(3, 'rollback')]
    assert g.skipped==[4, 5] and g.stop_reason is None and learn.train_iter==len(learn.dls.train)

class EMA(nn.Module):
    "A running mean kept in a buffer that each training forward replaces (not updated in place)"
    def __init__(self, n): super().__init__(); self.register_buffer('mu', torch.zeros(n))
    def forward(self, x):
        if self.training: self.mu = 0.9*self.mu + 0.1*x.detach().mean(0)
        return x - self.mu

def test_replaced_buffer_checked_at_the_end():
    "The end-of-fit check reads the model's tensors of now, by name; an empty buffer is no trouble"
    m = nn.Sequential(nn.Flatten(), EMA(64), nn.Linear(64,32), nn.ReLU(), nn.Linear(32,10))
    m.register_buffer('placeholder', torch.empty(0))
    g = ExplosionGuard('skip', verbose=False); learn = learner([g], m)
    class Spoil(Callback): # a NaN `mu` bound after the last step: no skip can undo it, the end of the fit does
        def after_batch(self):
            if self.training and self.iter==len(self.dls.train)-1: m[1].mu = m[1].mu*float('nan')
    fit(learn, 1, 1e-2, cbs=Spoil())
    assert [e['kind'] for e in g.events]==['nonfinite_weights'] and m[1].mu.isfinite().all()

# ---- Third sweep (2026-12-02, evening): models copied, changed, saved and read after training ----

def _nan_grad_hook(param):
    "Make `param`'s next gradient NaN, once"
    h = []
    def f(g): h[0].remove(); return g*float('nan')
    h.append(param.register_hook(f))

def test_unfrozen_in_the_fit_is_checked():
    "A layer a callback unfreezes in the fit has its gradients checked too (the guard listed the trainable ones once)"
    from fastai.torch_core import params
    m = mlp(); g = ExplosionGuard('skip', verbose=False)
    set_seed(0)
    learn = Learner(digits_dls(size=8, bs=64), m, loss_func=CrossEntropyLossFlat(), cbs=[g],
                    splitter=lambda m: [params(m[1]), params(m[2:])])
    learn.freeze()
    class Thaw(Callback):
        order = 0
        def before_epoch(self):
            if self.epoch==1: self.learn.unfreeze()
        def before_backward(self):
            if self.epoch==1 and self.iter==3: _nan_grad_hook(m[1].weight)
    fit(learn, 2, 1e-2, cbs=Thaw())
    assert [(e['kind'], e['layer'], e['epoch'], e['iter']) for e in g.events]==[('nonfinite_grad', '1.weight', 1, 3)]
    assert all(p.isfinite().all() for p in m.parameters())

def test_rebound_buffer_put_back_by_a_skip():
    m = nn.Sequential(nn.Flatten(), nn.Linear(64,32), EMA(32), nn.ReLU(), nn.Linear(32,10)) # `EMA`: see above
    g = ExplosionGuard('skip', verbose=False); learn = learner([g], model=m)
    fit(learn, 1, 1e-2, cbs=[nan_batch(5)])
    assert [(e['kind'], e['iter']) for e in g.events]==[('nonfinite_act', 5)] # one skip, not a run of them
    assert m[2].mu.isfinite().all()

def test_lazy_modules_under_the_guard():
    m = nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32,10))
    g = ExplosionGuard('rollback', verbose=False); learn = learner([g], model=m)
    fit(learn, 1, 1e-2, cbs=[nan_batch(4)])
    assert [(e['kind'], e['iter']) for e in g.events]==[('nonfinite_act', 4)]
    assert all(p.isfinite().all() for p in m.parameters())

def test_flights_kept_bounded():
    "Under 'warn', an event every batch keeps the flights of the first and the last 16 events only"
    from deepstable_fastai.guard import _FLIGHTS
    g = ExplosionGuard('warn', std_max=1e-3, verbose=False); learn = learner([g])
    fit(learn, 2, 1e-3)
    n = len(g.events); assert n > 2*_FLIGHTS
    kept = [i for i,f in enumerate(g._flights) if f is not False]
    assert kept==list(range(_FLIGHTS))+list(range(n-_FLIGHTS, n))
    assert len(g.flight(dict(g.events[-1]))) and len(g.flight(np.int64(0))) # a copy of an event, a numpy index
    with pytest.raises(ValueError, match='not kept'): g.flight(_FLIGHTS+1)
    with pytest.raises(ValueError, match='`ev` must be'): g.flight(n)
    with pytest.raises(ValueError, match='`ev` must be'): g.flight(0.)

def test_events_kept_bounded(monkeypatch, capsys):
    "An event every batch keeps the first and the last `_EVENTS` events (and their flights); Python warnings stop there"
    import deepstable_fastai.guard as G
    monkeypatch.setattr(G, '_EVENTS', 6)
    g = ExplosionGuard('warn', std_max=1e-3, verbose=False); learn = learner([g])
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)
    n = g.n_events; assert n > 20
    assert len(g.events)==len(g._flights)==12
    its = [e['train_iter'] for e in g.events]
    assert its[:6]==list(range(6)) and its[-6:]==list(range(n-6, n)) # one event per batch here
    assert [f is not False for f in g._flights]==[True]*12 # within the first or the last `_FLIGHTS`
    assert len(g.flight(g.events[-1])) and len(g.flight(5))
    msgs = [str(w.message) for w in ws if 'ExplosionGuard' in str(w.message)]
    assert len(msgs)==7 and 'over 6 events' in msgs[-1]
    g.report(); assert f'{n} events in all' in capsys.readouterr().out
    fit(learn, 1, 1e-3) # a new fit starts a new count
    assert g.n_events==len(learn.dls.train) and g.events[0]['train_iter']==0

def test_events_kept_first_of_each_kind(monkeypatch):
    "Past the cap, the first event of each kind stays, wherever it falls: a run's report still sees what happened"
    import deepstable_fastai.guard as G
    from deepstable_fastai.report import run_verdict
    monkeypatch.setattr(G, '_EVENTS', 6)
    g = ExplosionGuard('warn', std_max=1e-3, verbose=False); learn = learner([g])
    fit(learn, 2, 1e-3, cbs=[nan_batch(20)]) # exploding activations every batch, a NaN batch in the middle
    assert g.n_events>30 and len(g.events)<=2*6+len(G.KINDS)+2
    assert next(e for e in g.events if e['kind'].startswith('nonfinite'))['train_iter']==20
    assert run_verdict(dict(events=g.events, accuracy=1.))=='exploded'

def test_plot_events_without_losses_and_after_skips(tmp_path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from fastai.learner import load_learner
    g = ExplosionGuard('rollback', skip_batches=3, verbose=False); learn = learner([g])
    plt.close(g.plot_events()) # before any fit: no losses
    fit(learn, 2, 1e-2, cbs=[nan_batch(8)])
    assert g.skipped==[9, 10, 11]
    x = g.plot_events().axes[0].lines[0].get_xdata(); plt.close('all')
    assert list(x)==[s for s in range(len(x)+3) if s not in (9, 10, 11)] # the skipped batches have no loss
    learn.export(tmp_path/'l.pkl'); l2 = load_learner(tmp_path/'l.pkl') # a loaded recorder has no `losses`
    plt.close(l2.explosion_guard.plot_events())

def test_forward_after_the_batch_not_recorded():
    "A callback's forward pass after the batch's (a probe batch) is not summed into the batch's record"
    probe = torch.randn(8, 1, 8, 8)*100
    class Probe(Callback):
        def after_step(self):
            with torch.no_grad(): self.learn.model(probe)
    out = []
    mon = ActivationMonitor(modules=['1']); learn = learner([mon, Probe()])
    h = learn.model[1].register_forward_hook(lambda m,i,o: out.append(o.detach().abs().max().item()))
    fit(learn, 1, 1e-2); h.remove()
    train = out[:-len(learn.dls.valid)][0::2] # the batch's forward, then the probe's
    assert np.allclose(mon.values('absmax', '1').numpy(), train, rtol=1e-5)

def test_parametrized_layers_are_watched():
    "weight_norm / spectral_norm layers stay in the default selection, and their gradients have their module"
    wn,sn = nn.utils.parametrizations.weight_norm,nn.utils.parametrizations.spectral_norm
    m = nn.Sequential(nn.Flatten(), wn(nn.Linear(64,32)), nn.ReLU(), sn(nn.Linear(32,10)))
    mon,g = ActivationMonitor(),ExplosionGuard('skip', verbose=False)
    learn = learner([mon, g], model=m)
    class Grad(Callback):
        def before_backward(self):
            if self.iter==4: _nan_grad_hook(m[1].parametrizations.weight.original1)
    fit(learn, 1, 1e-2, cbs=Grad())
    assert mon.names==['1', '2', '3']
    assert [(e['kind'], e['layer'], e['iter']) for e in g.events]==[('nonfinite_grad', '1.parametrizations.weight.original1', 4)]
    v = mon.values('grad_norm', '1') # the monitor reads the gradient before the guard skips it
    assert v[4].isnan() and v[torch.arange(len(v))!=4].isfinite().all()

def test_model_replaced_in_the_fit():
    "A callback that loads another model mid-fit: the monitor and the guard follow it (with a warning for the guard)"
    import copy
    class Revert(Callback):
        order = 30
        def after_epoch(self):
            if self.epoch==0: self.best = copy.deepcopy(self.learn.model)
            if self.epoch==1: self.learn.model = copy.deepcopy(self.best); self.learn.create_opt()
        def before_backward(self):
            if self.epoch==2 and self.iter==3: _nan_grad_hook(self.learn.model[1].weight)
    mon,g = ActivationMonitor(),ExplosionGuard('skip', verbose=False)
    learn = learner([mon, g])
    with pytest.warns(UserWarning, match='replaced during the fit'): fit_w(learn, 3, 1e-2, cbs=Revert())
    n = len(learn.dls.train)
    assert [int((mon.pos[:mon.k,1]==e).sum()) for e in range(3)]==[n]*3
    assert mon.values('std')[2*n:].isfinite().all()
    assert [(e['kind'], e['epoch'], e['iter']) for e in g.events]==[('nonfinite_grad', 2, 3)]
    assert all(p.isfinite().all() for p in learn.model.parameters()) and hooks(learn.model)==0

def fit_w(learn, *a, **k):
    "`fit` with its warnings let through"
    with learn.no_bar(), learn.no_logging(): learn.fit(*a, **k)

def test_history_dropped_with_a_warning():
    "`reset_on_fit=False` and other layers next fit: the history starts again, with a warning"
    mon = ActivationMonitor(reset_on_fit=False); learn = learner([mon])
    fit(learn, 1, 1e-2)
    learn.model = nn.Sequential(learn.model); learn.create_opt()
    with pytest.warns(UserWarning, match='history starts again'): fit_w(learn, 1, 1e-2)
    assert mon.steps[0]==0 and mon.names[0]=='0.1'

def test_model_saved_whole_in_a_fit_loads_without_the_package(tmp_path):
    import subprocess, sys
    from test_load_without_package import HIDE
    class Save(Callback):
        def after_step(self):
            if self.iter==2: torch.save(self.learn.model, tmp_path/'m.pt')
    learn = learner([ActivationMonitor(), ExplosionGuard('skip', verbose=False)])
    fit(learn, 1, 1e-2, cbs=Save())
    code = HIDE + "import torch; m = torch.load(__import__('sys').argv[1], weights_only=False); m(torch.randn(2,1,8,8)); print('OK')"
    r = subprocess.run([sys.executable, '-c', code, str(tmp_path/'m.pt')], capture_output=True, text=True)
    assert r.stdout.strip()=='OK', r.stderr[-2000:]

# A review of the third sweep's fixes (2026-12-02, late)

class GenCritic(nn.Module):
    "A GAN's shape: the model's forward runs the generator, the loss runs the critic on its output"
    def __init__(self):
        super().__init__()
        self.gen = nn.Sequential(nn.Flatten(), nn.Linear(64,32), nn.ReLU())
        self.critic = nn.Sequential(nn.Linear(32,10))
    def forward(self, x): return self.gen(x)

def test_layers_the_loss_runs_are_recorded():
    "Layers a loss function runs after the model's forward pass (fastai's `GANLoss` runs the critic) are the batch's"
    m = GenCritic(); mon = ActivationMonitor()
    set_seed(0)
    learn = Learner(digits_dls(size=8, bs=64), m, loss_func=lambda out, y: nn.functional.cross_entropy(m.critic(out), y),
                    cbs=[mon, ExplosionGuard('skip', verbose=False)])
    fit(learn, 1, 1e-2)
    assert 'critic.0' in mon.names and mon.values('std').isfinite().all()

def test_lazy_batchnorm_bad_first_batch():
    "A lazy BatchNorm whose first batch is bad: the skip puts its statistics back to their first values"
    m = nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(32,10))
    g = ExplosionGuard('skip', verbose=False); learn = learner([g], model=m)
    fit(learn, 1, 1e-2, cbs=[nan_batch(0)])
    assert [(e['kind'], e['iter']) for e in g.events]==[('nonfinite_act', 0)]
    assert m[2].running_mean.isfinite().all() and all(p.isfinite().all() for p in m.parameters())

def test_lazy_model_cancelled_first_step():
    "A step cancelled before the guard decides, at the first batch of a lazy model (no snapshot yet): no crash"
    m = nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32,10))
    class Cancel(Callback):
        order = 10 # before the guard, as `MixedPrecision`'s overflow skip
        def before_step(self):
            if self.iter==0: raise CancelStepException()
    from fastai.callback.core import CancelStepException
    g = ExplosionGuard('stop', verbose=False); learn = learner([g, Cancel()], model=m)
    fit(learn, 1, 1e-2, cbs=[nan_batch(0)])
    assert [e['kind'] for e in g.events]==['nonfinite_act'] and g.stop_reason is not None

# ---- Callbacks that run the model themselves (a fifth sweep)

class _Tag: t = 'own'

class _Consistency(Callback):
    "A target from an augmented copy of the batch, computed in `before_batch` (pseudo-labels, consistency training)"
    def __init__(self, order=0): self.order = order
    def before_batch(self):
        if not self.training: return
        with torch.no_grad(): _Tag.t = 'cb'; self.t = self.learn.model(self.xb[0]*10+3).argmax(1); _Tag.t = 'own'

def _own_hook(learn, out, n=None):
    "Record the absmax (and into `n` the size) of module '1''s output in the batch's own training passes into `out`"
    def f(m, i, o):
        if not (learn.training and _Tag.t=='own'): return
        out.append(o.detach().abs().max().item())
        if n is not None: n.append(o.numel())
    return learn.model[1].register_forward_hook(f)

@pytest.mark.parametrize('order', [0, 20])
def test_callback_pass_before_the_batch_not_recorded(order):
    "A callback's forward pass in `before_batch` (after the engine's `begin`) is neither recorded nor judged"
    out = []
    mon = ActivationMonitor(modules=['1']); learn = learner([mon, _Consistency(order)])
    h = _own_hook(learn, out); fit(learn, 1, 1e-2); h.remove()
    assert np.allclose(mon.values('absmax', '1').numpy(), out, rtol=1e-5) # the batch's own pass, not the callback's
    class Fault(Callback): # module '1' of the batch's own pass x1e4 at batch 30
        def before_fit(self):
            f = lambda m,i,o: o*1e4 if self.training and self.train_iter==30 and _Tag.t=='own' else None
            self.h = self.learn.model[1].register_forward_hook(f)
        def after_fit(self): self.h.remove()
    g = ExplosionGuard('skip', verbose=False); learn = learner([g, ActivationMonitor(), _Consistency(order), Fault()])
    fit(learn, 2, 1e-2)
    assert [(e['kind'], e['layer'], e['train_iter']) for e in g.events]==[('exploding_act', '1', 30)]

@pytest.mark.parametrize('event', ['before_batch', 'after_pred', 'after_step'])
def test_layer_probe_not_recorded(event):
    "A layer a callback runs alone (a probe, a teacher sharing it) is not summed into the batch's record"
    probe,out,n = torch.randn(8, 64)*100,[],[]
    def run(self):
        if self.training:
            with torch.no_grad(): _Tag.t = 'cb'; self.learn.model[1](probe); _Tag.t = 'own'
    mon = ActivationMonitor(modules=['1']); learn = learner([mon, type('Probe', (Callback,), {event: run})()])
    h = _own_hook(learn, out, n); fit(learn, 1, 1e-2); h.remove()
    assert np.allclose(mon.values('absmax', '1').numpy(), out, rtol=1e-5)
    assert mon.buf[:mon.k, 0, -1].tolist()==n # the elements of the batch's pass alone

def test_weights_written_before_the_guard():
    "SAM-like: a callback before the guard steps the weights along NaN gradients; a skip goes back to the snapshot"
    class SAM(Callback):
        order = 5 # before the guard: it decides on SAM's gradients
        def before_step(self):
            ps = [p for p in self.learn.model.parameters() if p.grad is not None]
            es = [p.grad*0.05/(torch.stack([q.grad.norm() for q in ps]).norm()+1e-12) for p in ps]
            with torch.no_grad(): torch._foreach_add_(ps, es)
            self.learn.opt.zero_grad()
            self.learn.loss_func(self.learn.model(*self.xb), *self.yb).backward()
            with torch.no_grad(): torch._foreach_sub_(ps, es)
    g = ExplosionGuard('skip', verbose=False); learn = learner([g, SAM()])
    fit(learn, 1, 1e-2, cbs=[nan_batch(5)])
    assert all(p.isfinite().all() for p in learn.model.parameters())
    e = g.events[0]
    assert e['train_iter']==5 and 'weights not finite' in e['action'] and 'back to the start of the fit' in e['message']
    assert len(g.events)==1 # no run of skips on NaN weights before an escalation
    m = mlp(); m.unused = nn.Parameter(torch.full((3,), float('nan'))) # never finite: not the callback's doing
    g = ExplosionGuard('skip', verbose=False); learn = learner([g], model=m)
    fit(learn, 1, 1e-2, cbs=[nan_batch(5)])
    assert [e['action'] for e in g.events]==['skip'] and 'back to' not in g.events[0]['message']

class _Twin(nn.Module):
    "Two views of the input through the same layer, the second by a call of the model itself"
    def __init__(self): super().__init__(); self.f,self.enc,self.head = nn.Flatten(),nn.Linear(64, 32),nn.Linear(32, 10)
    def forward(self, x, inner=False):
        x = self.f(x)
        if inner: return self.enc(x.flip(1))
        return self.head(torch.relu(self.enc(x) + self(x, inner=True)))

@pytest.mark.parametrize('cb', [False, True])
def test_model_calling_itself_recorded_whole(cb):
    "A model that calls itself in its forward pass: both calls are the batch's, also next to a callback's own pass"
    mon,out = ActivationMonitor(),[]; learn = learner([mon]+([_Consistency()] if cb else []), model=_Twin())
    h = learn.model.head.register_forward_hook(
        lambda m,i,o: out.append(o.detach().abs().max().item()) if learn.training and _Tag.t=='own' else None)
    fit(learn, 1, 1e-2); h.remove()
    n = mon.buf[:mon.k,:,-1]
    assert mon.names==['enc','head'] and (n[:,0]==2*64*32).all() and (n[:,1]==64*10).all()
    assert np.allclose(mon.values('absmax', 'head').numpy(), out, rtol=1e-5) # the batch's own pass

"Importing the library registers names and nothing else: fastai's defaults, the warning filters and `sys.argv` stay."
import json
from conftest import run_py

# Runs in a fresh process: spies on the warning-filter functions, records the global state, imports the library.
CODE = '''
import sys, json, warnings
calls = []
def spy(f):
    def g(*a, **k):
        mod = sys._getframe(1).f_globals.get('__name__', '')
        if mod.startswith('deepstable_fastai'): calls.append(f"{mod}: {f.__name__}{a}")
        return f(*a, **k)
    return g
warnings.filterwarnings,warnings.simplefilter = spy(warnings.filterwarnings),spy(warnings.simplefilter)
from fastai.learner import defaults
cbs,argv = [c.__name__ for c in defaults.callbacks],list(sys.argv)
import deepstable_fastai.all
ignored = [str(f[2]) for f in warnings.filters if f[0]=='ignore' and f[2] is FutureWarning and f[3] is None]
print(json.dumps(dict(cbs=cbs, cbs_after=[c.__name__ for c in defaults.callbacks], argv=argv==sys.argv, calls=calls,
                      ignored=ignored, mods=sorted(m for m in sys.modules if m.startswith('fastai')))))
'''

def _state():
    r = run_py(CODE, env={'OMP_NUM_THREADS': '1'})
    assert r.returncode==0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

def test_import_has_no_global_side_effect():
    s = _state()
    assert s['cbs_after']==s['cbs'], s['cbs_after'] # no ProgressCallback added to every later Learner
    assert s['argv'] and not s['calls'] and not s['ignored'], s
    heavy = [m for m in s['mods'] if m.startswith(('fastai.tabular','fastai.text','fastai.collab','fastai.callback.progress',
                                                   'fastai.vision.learner','fastai.vision.all'))]
    assert not heavy, heavy
    assert len(s['mods'])<30, s['mods'] # 38 before issue 14, 19 after

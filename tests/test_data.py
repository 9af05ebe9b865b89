"The image-folder cache: first build time, reuse, and two processes building it at once."
import time
from conftest import run_py

BUILD = "from deepstable_fastai.data import digits_folder; import sys; print(digits_folder(sys.argv[1] if len(sys.argv)>1 else None))"

def test_folder_build_then_cached(tmp_path):
    from deepstable_fastai.data import digits_folder, digits_image_dls
    t = time.time(); p = digits_folder(tmp_path); first = time.time()-t
    assert first < 60
    t = time.time(); assert digits_folder(tmp_path)==p; assert time.time()-t < 1
    t = time.time(); dls = digits_image_dls(tmp_path, size=16, bs=32)
    xb,yb = dls.one_batch()
    assert time.time()-t < 30 and xb.shape==(32,3,16,16)

def test_concurrent_builds(tmp_path):
    import subprocess, sys
    code = f"from deepstable_fastai.data import digits_folder; print(digits_folder({str(tmp_path)!r}))"
    ps = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in ps]
    assert all(p.returncode==0 for p in ps), [e for _,e in outs]
    paths = {o.strip() for o,_ in outs}
    assert len(paths)==1
    from pathlib import Path
    d = Path(paths.pop())
    assert (d/'.complete').exists()
    assert len(list(d.rglob('*.png')))==1797
    assert not [o for o in tmp_path.iterdir() if o.name.startswith('.tmp_digits_')]

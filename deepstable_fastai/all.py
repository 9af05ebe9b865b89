# Hand-written (like fastai's own `all.py`): the public API in one import.
from .data import *
from .stats import *
from .engine import *
from .trackers import *
from .monitor import *
from .guard import *
from .init import *
from .layers import *
from .learner import *
from .report import *
from .demo import *

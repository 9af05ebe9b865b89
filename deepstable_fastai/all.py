# Hand-written (like fastai's own `all.py`): the public API in one import.
from .data import *
from .stats import *

"""sparsemeta-edge: run, fine-tune and inspect exported sparse Conv4 models with NumPy alone.

Deliberately independent of ``sparsemeta`` and torch (only NumPy, the standard library and,
to read images, Pillow), so it installs on a small device; the ``.smz`` format is defined here
and written by ``sparsemeta.experiments.export``.
"""

from sparsemeta_edge.manifest import Manifest
from sparsemeta_edge.nn import Conv4, cross_entropy
from sparsemeta_edge.runtime import Adapter, finetune, network, predict
from sparsemeta_edge.smz import EdgeError, SmzError, SmzModel, load, save, save_model

__all__ = ["Adapter", "Conv4", "EdgeError", "Manifest", "SmzError", "SmzModel", "cross_entropy",
           "finetune", "load", "network", "predict", "save", "save_model"]

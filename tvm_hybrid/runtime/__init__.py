"""The edge runtime: load an artifact, run its segments on the device (and the cloud).

Importing this package loads neither TVM's compiler library, nor onnx, nor
``tvm_hybrid.compiler``; an edge app ships it with numpy and the TVM runtime alone.
"""

from ..errors import ArtifactError, HybridError, RuntimeFailure, UsageError
from .generate import Generator
from .session import Session

__all__ = ["Session", "Generator", "HybridError", "ArtifactError", "RuntimeFailure", "UsageError"]

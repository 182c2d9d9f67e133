"""tvm-hybrid: compile ONNX models with TVM for edge targets, run them with cloud fallback."""

__version__ = "0.1.0"

"""Format converters (torch → ONNX, ONNX → optimized ONNX, torch → TFLite) as registered plug-ins.

Importing this package registers every converter; each imports its heavy libraries only when it runs.
"""

from . import onnx_optimize, torch_onnx, torch_tflite
from .base import CONVERTERS, ConversionResult, Converter, TensorSpec
from .errors import ConversionError, ParityError
from .parity import ParityReport, ParityTolerance, check_parity, compare_many, compare_outputs

__all__ = [
    "CONVERTERS",
    "ConversionError",
    "ConversionResult",
    "Converter",
    "ParityError",
    "ParityReport",
    "ParityTolerance",
    "TensorSpec",
    "check_parity",
    "compare_many",
    "compare_outputs",
    "onnx_optimize",
    "torch_onnx",
    "torch_tflite",
]

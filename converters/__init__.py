"""Format converters (torch → ONNX, ONNX → optimized ONNX, torch → TFLite) as registered plug-ins.

Importing this package registers every converter; each imports its heavy libraries only when it runs.
"""

from edgefleet.converters import onnx_optimize, torch_onnx, torch_tflite
from edgefleet.converters.base import CONVERTERS, ConversionResult, Converter, TensorSpec
from edgefleet.converters.errors import ConversionError, ParityError
from edgefleet.converters.parity import (
    ParityReport,
    ParityTolerance,
    check_parity,
    compare_many,
    compare_outputs,
)

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

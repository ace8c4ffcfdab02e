"""Compression steps (quantization, pruning, distillation, transfer learning) as registered plug-ins."""

from edgefleet.sdk.compress.base import (
    COMPRESSORS,
    CompressionContext,
    CompressionError,
    CompressionStep,
    Requirements,
)

__all__ = ["COMPRESSORS", "CompressionContext", "CompressionError", "CompressionStep", "Requirements"]

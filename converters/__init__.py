"""Format converters (torch → ONNX, ONNX → optimized ONNX, torch → TFLite) as registered plug-ins."""

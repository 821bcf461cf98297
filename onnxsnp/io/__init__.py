"""Files: loading a model with clear errors, writing results atomically, onnxruntime-genai folders."""

"""sdedge.runtime: run a bundle without PyTorch (NumPy, ONNX Runtime, tokenizers, Pillow)."""

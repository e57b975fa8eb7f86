"""sdedge.runtime: run a bundle without PyTorch (NumPy, ONNX Runtime, tokenizers, Pillow).

    from sdedge.runtime import Pipeline
    pipe = Pipeline.load("bundle/")
    images = pipe("a red circle", steps=20, seed=7)
"""

__all__ = ["Pipeline", "GenerationResult", "Cancelled", "ray_app"]


def __getattr__(name):  # lazy, so importing sdedge.runtime.errors does not load ONNX Runtime
    if name == "ray_app":  # Ray Serve (the `ray` extra), imported when called
        from .ray_serve import ray_app

        return ray_app
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdedge.runtime' has no attribute {name!r}")

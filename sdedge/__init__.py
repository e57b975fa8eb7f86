"""sdedge: Stable Diffusion to a signed, optimised engine on an edge device."""

__version__ = "0.1.0"

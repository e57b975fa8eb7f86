"""The built-in tiny world, in one place: the procedural shapes (`shapes`), the shape-and-colour classifier that
scores prompt matches (`classifier`), and the trained tiny base's architecture and shipped weights (`base`).

The trainer draws its demo data here, export writes the built-in base from here, benchmarks and the quickstart
score images here. It imports only `sdedge.runtime` (and torch/diffusers inside the functions that need them):
every other layer may import it (docs/architecture.md).
"""

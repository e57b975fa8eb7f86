"""Errors every part of sdedge raises: one base class, so the CLI can turn any of them into exit code 2.

They live in the runtime because the runtime is the root of the dependency graph: `export`, `trainer`
and `benchmarks` may import it, it imports none of them.
"""


class SdedgeError(Exception):
    """A failure the user can act on. The message names the file, key or limit at fault."""

    exit_code = 2


class BadInput(SdedgeError):
    """A request outside what the model or bundle supports (size, steps, scheduler name, ...)."""


class BundleError(SdedgeError):
    """A bundle that is missing, corrupt, of an unknown format, or does not match its manifest."""


class MissingDependency(SdedgeError):
    """An optional package (an extra) is needed for what was asked."""

"""The package list, discovered: each top-level folder of the design maps into the one `sdedge` package, and every
subfolder with an `__init__.py` comes along, so a new subpackage cannot work in the editable install and vanish
from the wheel (tests/test_packaging.py builds the wheel and checks). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

LAYERS = {
    "sdedge": "sdedge",
    "sdedge.runtime": "runtime",
    "sdedge.export": "export",
    "sdedge.trainer": "trainer",
    "sdedge.benchmarks": "benchmarks",
    "sdedge.tinyworld": "tinyworld",
}


def packages() -> list[str]:
    found = []
    for name, folder in LAYERS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(found)


setup(package_dir=LAYERS, packages=packages())

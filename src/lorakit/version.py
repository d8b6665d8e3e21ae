"""lorakit's version, in a module of its own so the library's modules can read it without importing the package."""

__version__ = "0.1.0"  # keep equal to pyproject.toml's [project] version

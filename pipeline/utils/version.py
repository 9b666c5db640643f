"""The package version, in one place (``featcache --version``, ``pipeline.__version__``)."""

VERSION = "0.1.0"

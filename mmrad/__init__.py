"""mmrad: Ray-native reasoning VLMs for general industrial anomaly detection."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mmrad")  # pyproject.toml's, as installed
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

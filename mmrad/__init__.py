"""mmrad: Ray-native reasoning VLMs for general industrial anomaly detection."""

__version__ = "0.1.0"

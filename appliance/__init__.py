"""appliance: signed offline model bundles and an OpenAI-compatible service for edge devices."""

__version__ = "0.1.0"

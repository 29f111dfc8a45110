"""The package version, in one place (read by provenance and packaging)."""

__version__ = "0.1.0"

"""The package's version, in the foundation so that every layer (storage's manifests
record it as ``created_by``) can name it without importing the package root."""

__version__ = "0.1.0"

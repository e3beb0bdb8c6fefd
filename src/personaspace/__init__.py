"""personaspace: a data-versioned pipeline for experiments on persona space in chat models."""

__version__ = "0.1.0"

"""Study analyses: one pure module per study (panel, em_first, ...).

Each takes tidy tables and the study's params models and returns a metrics dict (JSON-ready, named
keys, decisions as named values) plus plot tables (DataFrames). No file, MLflow or params.yaml I/O:
the pipeline's stages and the ``personaspace analyze`` CLI read and write, the modules compute.
"""


class TableError(ValueError):
    """A table given to an analysis is malformed or does not fit the study; the message names the row or key."""

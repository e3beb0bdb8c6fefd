"""Loaded by Hydra's plugin scan, which DVC runs before composing conf/ into params.yaml.

It registers the resolvers conf/config.yaml uses (`params_sha256`, `stage_graph`) and refuses to
compose over a hand-edited params.yaml (see personaspace.params_guard). No __init__.py here: Hydra
scans `hydra_plugins` as a namespace package under DVC's `hydra.plugins_path` (the repo root).
"""

from pathlib import Path

from personaspace.params_guard import guard_composition
from personaspace.study import register_resolver

register_resolver()
guard_composition(Path(__file__).resolve().parents[1] / "params.yaml")

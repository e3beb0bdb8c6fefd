"""Join stage outputs into the tables the analyses read: the S1 regression table and the rate grid.

>>> table = regression_table(cosines, rates, catalog, tokenizer, panel, "helpful_assistant")  # doctest: +SKIP
>>> grid = rate_grid(rates)                       # source x eval persona, rates pooled over seeds  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from personaspace.completions import system_message
from personaspace.personas import Catalog


def own_rates(rates: pd.DataFrame) -> pd.DataFrame:
    """Each source's fire rate under its own persona, pooled over training seeds: source, fired, n."""
    own = rates[rates["source"].notna() & (rates["source"] == rates["persona"])]
    return own.groupby("source", sort=False)[["fired", "n"]].sum().reset_index()


def rate_grid(rates: pd.DataFrame) -> pd.DataFrame:
    """Source x eval persona fire rates (pooled over seeds), rows and columns in panel order."""
    coupled = rates[rates["source"].notna()]
    pooled = coupled.groupby(["source", "persona"], sort=False)[["fired", "n"]].sum()
    grid = (pooled["fired"] / pooled["n"]).unstack("persona")
    order = list(dict.fromkeys(coupled["persona"]))
    return grid.reindex(index=[s for s in order if s in grid.index], columns=order)


def regression_table(
    cosines: pd.DataFrame,
    rates: pd.DataFrame,
    catalog: Catalog,
    tokenizer: Any,
    panel: Sequence[str],
    reference: str,
    centered: bool = True,
) -> pd.DataFrame:
    """One row per (source, layer): cosine of its centroid to ``reference``'s and its own fire rate.

    ``inherited`` (the persona joined at a smaller panel size) is added when the panel holds
    personas of more than one size, so the inherited-vs-new split can be tested. Layers where a
    cosine is undefined are left out (see ``undefined_layers``).
    """
    column = "cosine_centered" if centered else "cosine_raw"
    to_reference = cosines[cosines["persona_b"] == reference]
    own = own_rates(rates).set_index("source")
    rows = []
    for persona_name in panel:
        if persona_name not in own.index:
            continue
        persona = catalog.persona(persona_name)
        prompt = system_message(persona, tokenizer) or ""
        tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
        layers = to_reference[to_reference["persona_a"] == persona_name]
        for layer in layers.itertuples(index=False):
            rows.append({
                "persona": persona_name, "category": persona.category, "layer": int(layer.layer),
                "cosine": float(getattr(layer, column)), "fired": int(own.loc[persona_name, "fired"]),
                "n": int(own.loc[persona_name, "n"]), "prompt_tokens": tokens, "prompt": prompt,
                "panel_size": persona.panel,
            })  # fmt: skip
    table = pd.DataFrame(rows)
    table = table[~table["layer"].isin(undefined_layers(cosines, centered))].reset_index(drop=True)
    sizes = table.pop("panel_size")
    if sizes.nunique() > 1:
        table["inherited"] = sizes < sizes.max()
    return table


def undefined_layers(cosines: pd.DataFrame, centered: bool = True) -> list[int]:
    """Layers with an undefined (NaN) cosine: e.g. index 0 at the last input token, where every
    persona reads the same token's embedding, so every centered centroid is the zero vector."""
    column = "cosine_centered" if centered else "cosine_raw"
    return sorted(int(k) for k in cosines.loc[cosines[column].isna(), "layer"].unique())


def cosine_grid(cosines: pd.DataFrame, layer: int, centered: bool = True) -> pd.DataFrame:
    """Persona x persona cosines at one layer."""
    column = "cosine_centered" if centered else "cosine_raw"
    at = cosines[cosines["layer"] == layer]
    return at.pivot(index="persona_a", columns="persona_b", values=column)

"""The model families crate-edge compiles, one table: CRATE (crate_edge.model) and CRATE-α
(crate_edge.crate_alpha). A config says its family (`CrateConfig.FAMILY`; in a config dict the
"family" key, absent for CRATE), and every other module builds, names and recognises models
through the functions here."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import crate_alpha, model

FAMILIES: dict[str, tuple[type, type]] = {
    model.CrateConfig.FAMILY: (model.CrateConfig, model.CRATE),
    crate_alpha.CrateAlphaConfig.FAMILY: (crate_alpha.CrateAlphaConfig, crate_alpha.CrateAlpha),
}
MODEL_TYPES = tuple(m for _, m in FAMILIES.values())
TITLES = {"crate": "CRATE", "crate-alpha": "CRATE-α"}

# every named variant of every family, by name
VARIANTS: dict[str, dict[str, Any]] = {**model.VARIANTS, **crate_alpha.VARIANTS}
_FAMILY_OF_VARIANT = {**{n: "crate" for n in model.VARIANTS}, **{n: "crate-alpha" for n in crate_alpha.VARIANTS}}


def config_from_dict(d: dict[str, Any]) -> model.CrateConfig:
    """The config a dict describes (CrateConfig.to_dict's form), of the family it names."""
    fam = d.get("family", "crate")
    if fam not in FAMILIES:
        raise ValueError(f"unknown model family {fam!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[fam][0].from_dict(d)


def build_model(cfg: model.CrateConfig) -> nn.Module:
    """A freshly initialised model of cfg's family."""
    return FAMILIES[cfg.FAMILY][1](cfg)


def is_model(obj) -> bool:
    return isinstance(obj, MODEL_TYPES)


def title(cfg: model.CrateConfig) -> str:
    return TITLES[cfg.FAMILY]


def list_variants() -> list[str]:
    return sorted(VARIANTS)


def variant_config(name: str | None, family: str = "crate", **overrides) -> model.CrateConfig:
    """The config of a named variant (its family's), with keyword overrides; name=None gives the
    family's defaults."""
    if name is not None and name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; known: {', '.join(list_variants())}")
    fam = _FAMILY_OF_VARIANT[name] if name else family
    kw = dict(VARIANTS[name]) if name else {}
    kw.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return FAMILIES[fam][0](**kw)


def create_model(name: str | None = None, family: str = "crate", **overrides) -> nn.Module:
    """create_model("tiny") -> CRATE-Tiny/16 at 224, create_model("crate-alpha-base") ->
    CRATE-α-B/16 at 224; keyword overrides change any config field."""
    return build_model(variant_config(name, family, **overrides))

"""`compress models`: the supported families, read from the registered adapters and passes."""

from __future__ import annotations

from compressor.errors import UsageError

# example checkpoints of families whose adapters name none (`examples` on an adapter class wins)
EXAMPLE_CHECKPOINTS = {"dinov2": ("example:dinov2-small", "facebook/dinov2-small"),
                       "llama": ("example:smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")}


def model_families() -> list[dict]:
    """One row per supported family: its model types, modality, the passes that apply and example checkpoints."""
    import compressor.passes  # noqa: F401  (registers the bundled passes)
    from compressor.models import ADAPTERS

    rows: dict[str, dict] = {}
    for cls in ADAPTERS:
        row = rows.setdefault(cls.family, {"family": cls.family, "model_types": [], "modality": cls.modality,
                                           "passes": _applicable_passes(cls), "examples": []})
        row["model_types"] += [t for t in cls.model_types if t not in row["model_types"]]
        for e in cls.examples or EXAMPLE_CHECKPOINTS.get(cls.family, ()):
            if e not in row["examples"]:
                row["examples"].append(e)
    return list(rows.values())


def _applicable_passes(adapter_cls) -> list[str]:
    """Passes whose `requires` the family's capabilities meet (as a handle computes them, plus what applicable passes
    ensure), less those whose own check refuses the family on a stand-in that has the class's attributes only."""
    from compressor.program.handle import ModelHandle
    from compressor.pipeline.registry import REGISTRY

    handle = ModelHandle(adapter_cls.__new__(adapter_cls), source=None, shapes={})
    caps, applies = set(handle.capabilities), []
    only = adapter_cls.supported_passes  # a family that lists its passes (speech) takes no other
    if only is not None:
        return sorted(n for n in only if n in REGISTRY)
    grew = True
    while grew:
        grew = False
        for name, cls in sorted(REGISTRY.items()):
            if name in applies or not cls.requires <= caps or _refuses(cls, handle):
                continue
            applies.append(name)
            caps |= cls.ensures
            grew = True
    return sorted(applies)


def _refuses(pass_cls, handle) -> bool:
    stand_in = pass_cls.__new__(pass_cls)
    stand_in.config = None  # options are not the question here: some passes have no valid default
    try:
        stand_in.check(handle)
    except UsageError:
        return True
    except Exception:  # the check needs a loaded model: `requires` decides
        return False
    return False

"""`python -m pipeline promote`: move alias `champion` to a registered version unless its
test metric is worse than the champion's (`register.metric`, `register.higher_is_better`)."""

from __future__ import annotations

from pipeline.config import RegisterConfig


def run(
    cfg: RegisterConfig, *, name: str | None = None, version: str | None = None, force: bool = False
) -> str:
    """Move alias `champion` to `version` (default: the challenger) unless it is worse."""
    from pipeline.tracking import model_registry

    name = name or cfg.model_name
    promoted, old, new = model_registry.promote(
        name, version=version, metric=cfg.metric, higher_is_better=cfg.higher_is_better, force=force
    )
    before = "none" if old is None else f"{old:.4f}"
    print(
        f"promoted {name} v{promoted} to @{model_registry.CHAMPION}: "
        f"{cfg.metric} {new:.4f} (previous champion: {before})"
    )
    return promoted

"""A toy sparsity method written the way a new one is added: this one module holds its settings
(a config section ``toy``), the tuning range of that setting and its lifecycle, and one line
registers it (``methods.register(METHOD)``; in the package, one entry of ``methods._MODULES``).
Nothing else in sparsemeta names it."""

from __future__ import annotations

from dataclasses import dataclass

from sparsemeta.config import Config, open_unit
from sparsemeta.experiments.methods.base import Branch, Method, Param, SeedRun
from sparsemeta.sparsity.prune import MagnitudeRule


@dataclass
class ToySettings:
    """Magnitude pruning at initialisation: θ₀ pruned to every level, trained from θ₀."""

    rate: float = 0.2
    """Fraction of the remaining weights removed from θ₀ per level."""

    def validate(self, at: str = "toy") -> None:
        open_unit(f"{at}.rate", self.rate)


def settings(cfg: Config) -> ToySettings:
    return cfg.section("toy")


def run(s: SeedRun) -> None:
    theta0, mask = s.theta0(), s.full
    rule = MagnitudeRule(settings(s.cfg).rate)
    for level in range(1, s.levels + 1):
        mask = rule.apply(theta0, mask)
        s.run(f"{s.label(level)} toy", s.dir(level, "toy"), init=theta0, mask=mask)


METHOD = Method(name="toy", help="magnitude pruning at initialisation",
                branches=(Branch("toy", "tab:olive"),), run=run,
                plan=lambda cfg, controls: cfg.prune.num_levels(), score_branch="toy",
                settings=ToySettings, search={"rate": Param("toy.rate", 0.1, 0.5)})

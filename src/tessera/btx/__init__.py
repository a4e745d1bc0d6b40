"""Branch-Train-MiX (Sukhbaatar et al., 2024): branch a seed LLM into domain experts trained in
parallel, mix their FFNs into a Mixtral MoE (:mod:`tessera.btx.mix`), learn token routing
(:mod:`tessera.btx.routing`, :mod:`tessera.btx.train`); baselines in :mod:`tessera.btx.baselines`."""

from tessera.btx.data import Domain, parse_domains
from tessera.btx.mix import mix_experts

__all__ = ["Domain", "mix_experts", "parse_domains"]

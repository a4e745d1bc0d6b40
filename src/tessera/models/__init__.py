"""Pure nn.Modules for mixed-modal sparse transformers (MoT, MoE, MoMa, MoD) and their pieces.

Components other systems import: :class:`~tessera.models.modality.ModalityRouter` (index lists once
per batch), :mod:`tessera.models.masks` (causal, Transfusion masks), :mod:`tessera.models.diffusion`
(DDPM cosine schedule, loss, sampler, patchify), :mod:`tessera.models.flops`,
:class:`~tessera.models.classifier.DigitClassifier`, :class:`~tessera.models.vq.VQTokenizer`.
"""

from tessera.models.decoder import MixedModalConfig, MixedModalTransformer, parse_variant
from tessera.models.modality import IMAGE, TEXT, ModalityIndex, ModalityRouter, PerModality
from tessera.models.objectives import MixedModalLM

__all__ = ["IMAGE", "TEXT", "MixedModalConfig", "MixedModalLM", "MixedModalTransformer", "ModalityIndex",
           "ModalityRouter", "PerModality", "parse_variant"]

"""torchvision's box coder, IoU matcher and balanced sampler, from their one import site.

torchvision builds its own RPN and RoI heads from these three classes but publishes them
only in the private module `torchvision.models.detection._utils`; no public path exists.
This module is the only place in rts_thaw that imports it, so an upstream move or change
breaks one import here and tests/test_torchvision_detection.py, which pins the behaviour
the cascade heads rely on (encode/decode, match labels, sampled fractions).
"""

from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher

__all__ = ["BalancedPositiveNegativeSampler", "BoxCoder", "Matcher"]

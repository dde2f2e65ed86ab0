"""Sample quality as papers measure it: feature extractors (Inception-v3 from disk, an offline
digits classifier), the metrics (FID/FD, KID, precision/recall, IS, class confidence) and the
``evaluate`` command. The ``FID`` callback runs the same code during training."""

from .features import DigitFeatures, InceptionFeatures
from .metrics import ReferenceStats, sample_quality

__all__ = ["DigitFeatures", "InceptionFeatures", "ReferenceStats", "sample_quality"]

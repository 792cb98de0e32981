"""Explaining what transfers: saliency maps, influence functions and unit analysis.

- `saliency`: loss input-gradients and SmoothGrad, and how much of their mass lies on the
  digit's ink (Utrera et al. arXiv 2007.05869 Fig. 4; Smilkov et al. arXiv 1706.03825).
- `influence`: influence of each training image on each test loss over the fine-tuned
  parameters, behind one `inverse_hvp` seam: exact, CG, LiSSA (Koh & Liang arXiv 1703.04730);
  `loo`: leave-one-out validation. (Figs. 5-6 of Utrera et al. are the `influence` study,
  `studies.influence`.)
- `units`: single units vs random directions of a layer (Szegedy et al. arXiv 1312.6199).
"""

from robust_transfer.explain.checkpoints import FinetunedModel, load_finetune, robustness_label
from robust_transfer.explain.influence import (
    CGInfluence,
    ExactInfluence,
    InfluenceModule,
    LiSSAInfluence,
    class_match_fractions,
    make_influence,
    rank_training_images,
)
from robust_transfer.explain.loo import LeaveOneOutResult, validate_leave_one_out
from robust_transfer.explain.saliency import (
    compare_saliency,
    ink_mass_fraction,
    input_gradient,
    saliency,
    smoothgrad,
)
from robust_transfer.explain.units import UnitAnalysis, layer_activations, unit_analysis

__all__ = [
    "FinetunedModel",
    "load_finetune",
    "robustness_label",
    "InfluenceModule",
    "ExactInfluence",
    "CGInfluence",
    "LiSSAInfluence",
    "make_influence",
    "rank_training_images",
    "class_match_fractions",
    "LeaveOneOutResult",
    "validate_leave_one_out",
    "input_gradient",
    "smoothgrad",
    "saliency",
    "ink_mass_fraction",
    "compare_saliency",
    "UnitAnalysis",
    "layer_activations",
    "unit_analysis",
]

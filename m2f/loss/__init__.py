"""Loss: Hungarian matcher, point sampling, set criterion (paper Table 5 switches)."""
from m2f.loss.criterion import SetCriterion, build_criterion, build_matcher, dice_loss, sigmoid_bce_loss  # noqa: F401
from m2f.loss.matcher import HungarianMatcher, hungarian_match, pairwise_cost  # noqa: F401
from m2f.loss.point_sampling import point_sample, point_sample_masks, uncertainty_point_coords  # noqa: F401

"""Loss: Hungarian matcher, point sampling, set criterion (paper Table 5 switches)."""
from m2f.loss.criterion import SetCriterion, build_criterion, build_matcher  # noqa: F401
from m2f.loss.matcher import HungarianMatcher  # noqa: F401

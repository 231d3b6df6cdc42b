"""rulewriter: rewrite the rules of a pretrained image classifier from a few images and masks.

A tour in five lines::

    from rulewriter import load_classifier, rule_from_images, collect_second_moment, rewrite
    clf = load_classifier("efficientnet-lite0")
    rule = rule_from_images(clf, clf.default_layer, ["car.jpg"], ["car_wood.jpg"], ["wheels.png"])
    edit = rewrite(clf, rule, collect_second_moment(clf, clf.default_layer, "photos/", samples=2000))
    with edit.applied(clf.model): ...

See the README for the command line and the design.
"""
from .concepts.heatmap import key_match, overlay
from .concepts.keys import Concept, concept_key, context
from .concepts.masks import coco_index, coco_masks, load_mask, mask_to_grid
from .core.edit import DEFAULT_RIDGE, AppliedEdit, Edit, LayerUpdate, projected_gd, solve_lambda, update_direction
from .errors import (
    EditError,
    ImageLoadError,
    LayerError,
    MaskError,
    ModelError,
    RulewriterError,
    StatsError,
)
from .concepts.manipulate import paste_features, paste_texture, texture_from
from .core.memory import VIEWS, LayerMemory
from .models.preprocess import Preprocess
from .models.registry import Classifier, list_models, load_classifier
from .core.rules import Rule, rewrite, rule_from_features, rule_from_images
from .core.stats import SecondMoment, collect_second_moment, merge_files
from .core.trace import StopForward, Trace

__version__ = "0.1.0"

__all__ = [
    "AppliedEdit", "Classifier", "Concept", "DEFAULT_RIDGE", "Edit", "EditError", "ImageLoadError", "LayerError",
    "LayerMemory", "LayerUpdate", "MaskError", "ModelError", "Preprocess", "Rule", "RulewriterError", "SecondMoment",
    "StatsError", "StopForward", "Trace", "VIEWS", "coco_index", "coco_masks", "collect_second_moment",
    "concept_key", "context", "key_match", "list_models", "load_classifier", "load_mask", "mask_to_grid",
    "merge_files", "overlay", "paste_features", "paste_texture", "projected_gd", "rewrite", "rule_from_features",
    "rule_from_images", "solve_lambda", "texture_from", "update_direction",
]

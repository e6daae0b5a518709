"""Defect synthesis with exact masks: masks, blending generators, and synthetic splits."""

from defectscope.synthesis.generators import GLOBAL_KINDS, KINDS, blend, poisson_clone, synthesize
from defectscope.synthesis.masks import ellipse_mask, otsu_foreground, perlin_mask, scratch_mask

__all__ = ["GLOBAL_KINDS", "KINDS", "blend", "ellipse_mask", "otsu_foreground", "perlin_mask", "poisson_clone", "scratch_mask", "synthesize"]

"""WinCLIP's compositional prompt ensemble (Jeong et al., CVPR 2023, appendix).

A prompt is a template filled with a state word applied to the object name. 7 normal and
4 anomalous states x 22 templates = 154 normal and 88 anomalous prompts per class.
"""

from __future__ import annotations

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = tuple(
    t
    for base in (
        "a cropped photo of {} {{}}.",
        "a close-up photo of {} {{}}.",
        "a bright photo of {} {{}}.",
        "a dark photo of {} {{}}.",
        "a jpeg corrupted photo of {} {{}}.",
        "a blurry photo of {} {{}}.",
        "a photo of {} {{}}.",
        "a photo of {} small {{}}.",
        "a photo of {} large {{}}.",
        "a photo of {} {{}} for visual inspection.",
        "a photo of {} {{}} for anomaly detection.",
    )
    for t in (base.format("a"), base.format("the"))
)


def prompts(class_name: str) -> tuple[list[str], list[str]]:
    """(normal prompts, anomalous prompts) for an object name, e.g. "bottle"."""
    name = class_name.replace("_", " ").strip()

    def fill(states: tuple[str, ...]) -> list[str]:
        return [t.format(s.format(name)) for s in states for t in TEMPLATES]

    return fill(NORMAL_STATES), fill(ANOMALOUS_STATES)

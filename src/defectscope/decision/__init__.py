"""From an image to a decision: the one scoring path, frame checks, thresholds, the verdict rule, metrics, findings and answers in words."""

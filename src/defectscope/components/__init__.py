"""Building blocks the methods share: patch features, memory banks and coreset selection, approximate search, CLIP prompts, the diffusion model for synthetic defects, charts."""

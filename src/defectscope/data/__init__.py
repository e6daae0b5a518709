"""Reading images, masks and datasets from disk into `Sample`s."""

from defectscope.data.datasets import (
    Dataset,
    Sample,
    list_images,
    load_dataset,
    load_folder,
)
from defectscope.data.images import Preprocess, load_image, load_mask

__all__ = [
    "Dataset",
    "Preprocess",
    "Sample",
    "list_images",
    "load_dataset",
    "load_folder",
    "load_image",
    "load_mask",
]

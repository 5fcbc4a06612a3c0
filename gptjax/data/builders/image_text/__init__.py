"""TFDS builder over a user's folder of images + captions (+ QA) for captioning / VQA."""
from gptjax.data.builders.image_text.folder import (CAPTION_FILES, SPLITS, Entry, Problem,
                                                    assign_splits, scan, split_hash)
from gptjax.data.builders.image_text.image_text import (OPTIONS, ImageText,
                                                        ImageTextBuilderConfig, ImageTextConfig,
                                                        image_text_builder, load_image,
                                                        load_image_text, skipped_items)

__all__ = [
    "CAPTION_FILES",
    "OPTIONS",
    "SPLITS",
    "Entry",
    "ImageText",
    "ImageTextBuilderConfig",
    "ImageTextConfig",
    "Problem",
    "assign_splits",
    "image_text_builder",
    "load_image",
    "load_image_text",
    "scan",
    "skipped_items",
    "split_hash",
]

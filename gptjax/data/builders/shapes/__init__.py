"""Procedurally generated shapes dataset (images, captions, QA) for multimodal tests."""
from gptjax.data.builders.shapes.shapes import (
    COLOR_NAMES,
    KINDS,
    MAX_SHAPES,
    NUM_QA,
    PALETTE,
    Shapes,
    ShapesConfig,
    generate_example,
    load_shapes,
    shapes_builder,
)

__all__ = [
    "COLOR_NAMES",
    "KINDS",
    "MAX_SHAPES",
    "NUM_QA",
    "PALETTE",
    "Shapes",
    "ShapesConfig",
    "generate_example",
    "load_shapes",
    "shapes_builder",
]

"""Built-in TFDS builders that prepare and read without TensorFlow.

They use only TF-free TFDS features (``Tensor``, ``Text``, ``ClassLabel``) and store
``array_record`` files, read back with ``builder.as_data_source``. ``tfds.features.Image``
is avoided on purpose: its PNG encoding needs TensorFlow.
"""
from gptjax.data.builders.shapes import Shapes, ShapesConfig, load_shapes
from gptjax.data.builders.text_files import TextFiles, TextFilesConfig, load_text_files

__all__ = [
    "Shapes",
    "ShapesConfig",
    "load_shapes",
    "TextFiles",
    "TextFilesConfig",
    "load_text_files",
]

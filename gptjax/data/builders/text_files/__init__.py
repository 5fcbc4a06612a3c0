"""TFDS builder over local UTF-8 text files (documents for language-model pretraining)."""
from gptjax.data.builders.text_files.text_files import (
    TextFiles,
    TextFilesConfig,
    load_text_files,
    resolve_paths,
    split_documents,
    text_files_builder,
)

__all__ = [
    "TextFiles",
    "TextFilesConfig",
    "load_text_files",
    "resolve_paths",
    "split_documents",
    "text_files_builder",
]

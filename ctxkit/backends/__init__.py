"""Backends: the layer that does the I/O. Same protocol for a local GGUF model and any OpenAI-compatible API."""

from .base import Backend
from .gguf_prompt import GGUFPrompt
from .llama_cpp import LlamaCppBackend, default_model_path
from .openai_compat import OpenAIBackend

__all__ = ["Backend", "GGUFPrompt", "LlamaCppBackend", "OpenAIBackend", "default_model_path"]

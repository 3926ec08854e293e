"""tunelab: measure prompts, generate teacher data, fine-tune and serve small language models."""

__version__ = "0.1.0"

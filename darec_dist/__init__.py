"""darec-dist: DaRec alignment of LLM and collaborative representations, trained at scale."""

__version__ = "0.1.0"

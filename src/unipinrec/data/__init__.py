"""Data sources (synthetic, MovieLens) producing the RAW layout, and the unified example builder.

See docs/architecture.md for the RAW and EX folder layouts and docs/data.md for the rules.
"""
from .synthetic import SyntheticConfig, generate_synthetic, size_for_events

__all__ = ["SyntheticConfig", "generate_synthetic", "size_for_events"]
from .examples import build_examples, iter_user_chunks

__all__ += ["build_examples", "iter_user_chunks"]
from .movielens import load_movielens

__all__ += ["load_movielens"]
from .sequence_table import iter_examples, iter_split

__all__ += ["iter_examples", "iter_split"]

"""Semantic tokens: the SAM 2.1 hiera-tiny image encoder (4,096 tokens of width 256 at 1024²) and its checkpoint files."""

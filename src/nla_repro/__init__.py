"""nla-repro: Natural Language Autoencoders and sparse autoencoders, reproducibly."""

__version__ = "0.1.0"

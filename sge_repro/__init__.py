"""sge-repro: reproduce and extend Spatial Group-wise Enhance (Li, Hu, Yang 2019)."""

__version__ = "0.1.0"

"""agecls: age estimation from face photos by transfer learning (Lightning + Hydra)."""

__version__ = "0.1.0"

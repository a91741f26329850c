"""agecls: age estimation from face photos by transfer learning (Lightning + Hydra)."""

from agecls.utils.quiet import quiet_third_party

__version__ = "0.1.0"

# Known third-party noise off before torch and Lightning are imported (see agecls.utils.quiet).
quiet_third_party()

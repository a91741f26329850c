"""agecls: age estimation from face photos by transfer learning (Lightning + Hydra).

    import agecls
    est = agecls.AgeEstimator.from_checkpoint("best.ckpt")   # or an exported "model.onnx"
    faces = est.predict("photo.jpg")                         # per face: box, landmarks, score, age, interval, status
    est.draw("photo.jpg", faces).save("photo.annotated.jpg")

See agecls.estimator. Imported lazily: `import agecls` (and agecls.deploy, which runs exported
models without torch) does not import torch.
"""

from typing import Any

from agecls.utils.quiet import quiet_third_party

__version__ = "0.1.0"
__all__ = ["AgeEstimator", "FaceAge", "FaceOptions", "__version__"]

# Known third-party noise off before torch and Lightning are imported (see agecls.utils.quiet).
quiet_third_party()


def __getattr__(name: str) -> Any:
    if name in ("AgeEstimator", "FaceAge", "FaceOptions"):
        from agecls import estimator

        return getattr(estimator, name)
    raise AttributeError(f"module 'agecls' has no attribute {name!r}")

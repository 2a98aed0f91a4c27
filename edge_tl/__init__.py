"""edge-tl: transfer learning for the edge, from an image folder to a checked TensorRT engine on a Jetson.

The top-level package imports nothing heavy: the device side (bench, engine, deploy, infer, serve) runs
without torch, and TensorRT / pycuda / jetson-stats are imported only when a runner or sampler activates.
"""

__version__ = "0.1.0"

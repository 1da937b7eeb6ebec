"""fedobj: federated image classification whose categories can grow.

The library holds everything that is neither a Flower entry point nor an HTTP route:
data, models, training loops, class maps, checkpoints and run outputs.
"""

__version__ = "0.1.0"

"""Model builders: AlexNet, VGG-11/13/16/19 and ResNet-50 as plain keras.Model objects.

Builders validate their options, build layers with deterministic names and do no device placement
or strategy lookup: build the model inside ``tfpar.scope(...)`` to train it in parallel. The
registry (`get`, `available`) builds a model from its name, for ``tfpar train --model NAME``.

Example:
    >>> with tfpar.scope("mirrored"):
    ...     model = tfpar.models.vgg16(input_shape=(32, 32, 3), num_classes=10, width=0.25)
    >>> model = tfpar.models.get("alexnet", input_shape=(64, 64, 3), num_classes=10)
"""

from tfpar.models.alexnet import LocalResponseNormalization, alexnet
from tfpar.models.registry import (
    accepted_options,
    available,
    check_input_shape,
    get,
    min_input_size,
    register,
)
from tfpar.models.resnet import resnet50
from tfpar.models.vgg import vgg, vgg11, vgg13, vgg16, vgg19

# The built-in names. "vggN_bn" are the batch-normalized variants (torchvision's names).
register("alexnet", alexnet)
for _depth in (11, 13, 16, 19):
    register(f"vgg{_depth}", vgg, preset={"depth": _depth})
    register(f"vgg{_depth}_bn", vgg, preset={"depth": _depth, "batch_norm": True})
register("resnet50", resnet50)
del _depth

__all__ = [
    "LocalResponseNormalization",
    "accepted_options",
    "alexnet",
    "available",
    "check_input_shape",
    "get",
    "min_input_size",
    "register",
    "resnet50",
    "vgg",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
]

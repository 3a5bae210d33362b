"""Model parallelism for Keras 3 on TensorFlow: plan an optimal split, place it, pipeline it.

Modules: ``layer_graph`` (a model's layer graph from its config), ``cost``, ``partition``,
``planner`` (``plan``), ``gpipe`` (the micro-batch schedule), ``placed_model`` (``SplitModel`` and
``split``), ``report``.

Example:
    import tfpar
    plan = tfpar.parallel.plan(model, ["gpu:0", "gpu:1"], balance="flops")
    print(plan.summary())
    placed = tfpar.parallel.split(model, plan, microbatches=4)
    placed.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    placed.fit(x, y, batch_size=64)
    print(tfpar.parallel.placement_report(placed, x[:8]))
"""

from tfpar.parallel import cost, gpipe, layer_graph, partition, placed_model, planner, report
from tfpar.parallel.cost import BALANCE_MODES, layer_costs
from tfpar.parallel.gpipe import bubble_fraction
from tfpar.parallel.placed_model import SplitModel, split
from tfpar.parallel.planner import Plan, Stage, plan
from tfpar.parallel.report import PlacementReport, placement_report

# The modules' former names, kept as attributes (public in __all__): tfpar.parallel.graph is the
# layer graph, tfpar.parallel.pipeline the GPipe schedule.
graph = layer_graph
pipeline = gpipe

__all__ = [
    "BALANCE_MODES",
    "PlacementReport",
    "Plan",
    "SplitModel",
    "Stage",
    "bubble_fraction",
    "cost",
    "gpipe",
    "graph",
    "layer_costs",
    "layer_graph",
    "partition",
    "pipeline",
    "placed_model",
    "placement_report",
    "plan",
    "planner",
    "report",
    "split",
]

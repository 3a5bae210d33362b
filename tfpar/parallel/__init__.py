"""Model parallelism for Keras 3 on TensorFlow: plan an optimal split, place it, pipeline it.

Example:
    import tfpar
    plan = tfpar.parallel.plan(model, ["gpu:0", "gpu:1"], balance="flops")
    print(plan.summary())
    placed = tfpar.parallel.split(model, plan, microbatches=4)
    placed.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    placed.fit(x, y, batch_size=64)
    print(tfpar.parallel.placement_report(placed, x[:8]))
"""

from tfpar.parallel import cost, graph, partition, pipeline, planner, report
from tfpar.parallel.cost import BALANCE_MODES, layer_costs
from tfpar.parallel.pipeline import bubble_fraction
from tfpar.parallel.planner import Plan, Stage, plan
from tfpar.parallel.report import PlacementReport, placement_report
from tfpar.parallel.split import SplitModel, split

__all__ = [
    "BALANCE_MODES",
    "PlacementReport",
    "Plan",
    "SplitModel",
    "Stage",
    "bubble_fraction",
    "cost",
    "graph",
    "layer_costs",
    "partition",
    "pipeline",
    "placement_report",
    "plan",
    "planner",
    "report",
    "split",
]

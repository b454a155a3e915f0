"""Workflows above the technique families: recipes (a chain of stages, measured after each),
search to a target (sensitivity, then a budgeted successive-halving search, selection on the
validation split only), and their results for the HTML report. Families never import this."""

from deepshrink.workflow.recipe import Recipe, RunResult, load_recipe, parse_recipe, run_recipe
from deepshrink.workflow.stages import STAGES, StageSpec, register_stage

__all__ = ["STAGES", "Recipe", "RunResult", "StageSpec", "load_recipe", "parse_recipe", "register_stage",
           "run_recipe"]

"""``deepshrink demo``: one run of every technique on the embedded digits data.

The demo sits above every family (it composes them; nothing in the library imports it). A
family adds its stage as a module here and one line in :data:`deepshrink.demo.run.STAGES`.
"""

from deepshrink.demo.context import DemoContext
from deepshrink.demo.run import STAGES, Stage, run_demo

__all__ = ["STAGES", "DemoContext", "Stage", "run_demo"]

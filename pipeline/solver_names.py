"""The solver and grid names the project accepts, and which solvers run on their scheduler's own grid only.

Torch-free, so that the generation CLI can check and adapt its flags without importing torch (a cache hit never does);
`pipeline/solvers.py` implements them.
"""

SOLVERS = ("ddim", "euler", "heun", "dpmpp-2m", "dpmpp-3m", "flow-euler")
GRIDS = ("scheduler", "karras", "logsnr", "cmt-authors")
SCHEDULER_GRID = "scheduler"
# Solvers whose scheduler takes no custom levels (DDIMScheduler steps between the teacher's integer timesteps).
SCHEDULER_GRID_ONLY = ("ddim",)

"""Running a recipe: the plan (steps in order, models they read and write), step keys, the step cache
and the runner that executes the plan."""

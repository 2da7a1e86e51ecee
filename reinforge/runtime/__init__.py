"""Runs a pipeline's tasks: the runner (driver), executor, actor and process pools, the Ray session. The only room that imports Ray."""

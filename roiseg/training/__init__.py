"""`train`: the loop, what a checkpoint saves and resume restores, the run folder, hooks, losses,
EMA, DDP, the LR schedule, the config schema, class weights."""

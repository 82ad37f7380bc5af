"""Running a suite: config, data, backbones, training, checkpoints, the result store, the runner and executors."""

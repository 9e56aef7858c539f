"""shardforge's launcher: CLI, recipes, engine-config builders, local and Slurm launch."""

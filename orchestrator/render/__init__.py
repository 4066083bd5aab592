"""Config -> job files (sbatch.sh, hostfile, ds_config.json, accelerate config): pure."""

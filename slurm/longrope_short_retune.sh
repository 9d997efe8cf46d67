#!/bin/bash
# LongRoPE short-window factor re-search: recovers quality inside the original window.
# Usage: sbatch [sbatch options] slurm/longrope_short_retune.sh [hydra overrides...]  (docs/cluster.md)
#SBATCH --job-name=longrope_short_retune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# sbatch runs a spool copy of this file, so find launch.sh beside the script that was submitted.
script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
exec "$(dirname "$script")/launch.sh" longrope_short_retune "$@"

#!/bin/bash
# PI, NTK, YaRN and ABF beside LongRoPE at the same fine-tuning budget, side by side in report.md.
# Usage: sbatch [sbatch options] slurm/baselines.sh [hydra overrides...]  (docs/recipes.md)
#SBATCH --job-name=baselines
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# sbatch runs a spool copy of this file, so find launch.sh beside the script that was submitted.
script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
exec "$(dirname "$script")/launch.sh" baselines "$@"

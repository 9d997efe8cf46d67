import sys
from pathlib import Path

# Make the fixture module (and the launcher probe) importable under any pytest --import-mode.
sys.path.insert(0, str(Path(__file__).parent))

from real_model import smollm2  # noqa: E402,F401  (registers the fixture)
from slurm_cluster import slurm_cluster  # noqa: E402,F401  (registers the fixture)


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a real SLURM cluster (.ci/install_slurm.sh)")

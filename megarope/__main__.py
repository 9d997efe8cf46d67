"""``python -m megarope recipe=NAME key=value ...``: the Hydra entry point (also under torchrun/srun)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from megarope import dist

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "hydra_configs")
log = logging.getLogger("megarope")


def _setup_logging(level: str) -> None:
    # rank 0 talks, the others only warn
    logging.basicConfig(
        level=getattr(logging, level.upper()) if dist.is_rank0() else logging.WARNING,
        format=f"%(asctime)s [rank{dist.rank()}] %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("megatron", "datasets", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run(cfg) -> dict:
    """Validate and run the pipeline. Bad input fails before anything is written, every problem
    found reported at once (:class:`~megarope.errors.MegaropeErrors`)."""
    from megarope.errors import MegaropeError, raise_all
    from megarope.run.config import validate
    from megarope.run.pipeline import Pipeline, resolve_stages

    cfg.stages = resolve_stages(cfg.stages)
    try:
        validate(cfg, world_size=dist.world_size())
    except MegaropeError as invalid:
        # the stages' own checks may still find more; a check that breaks on the settings
        # already refused is not reported on top of them
        errors = [invalid]
        try:
            Pipeline(cfg).preflight()
        except MegaropeError as err:
            errors.append(err)
        except Exception:  # noqa: BLE001
            pass
        raise_all(errors)
    return Pipeline(cfg).run()


def main() -> None:
    import warnings

    # megatron warns at import that Transformer Engine / apex are missing: expected on CPU (torch-native paths)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    # deprecations inside megatron-core / torch.distributed.checkpoint that users cannot act on
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    import hydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from megarope.errors import MegaropeError
    from megarope.run.checkpoint import Interrupted
    from megarope.run.config import register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
    def _main(dcfg) -> None:
        _setup_logging(dcfg.run.log_level)
        try:
            summary = run(OmegaConf.to_object(dcfg))
        except MegaropeError as err:  # bad input; anything else is a bug and keeps its traceback
            for each in getattr(err, "errors", [err]):
                log.error("error: %s: %s", each.field, each.message)
            sys.exit(2)
        except OmegaConfBaseException as err:  # e.g. a `${required:}` value or a `???` in vars left unset
            log.error("error: %s", str(err).splitlines()[0])
            sys.exit(2)
        except Interrupted as stop:
            log.warning("%s; resume by running the same command (same run.dir)", stop)
            sys.exit(stop.exit_code)
        finally:
            from megarope.mcore import parallel

            parallel.destroy()
        log.info("done: %s", json.dumps({k: v.get("kind") for k, v in summary["stages"].items()}))

    _main()


if __name__ == "__main__":
    main()

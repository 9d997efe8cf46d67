"""megatron-core version shims and the CPU compatibility layer: every device or version
difference megarope papers over lives here and nowhere else.

CPU layer
---------
megatron-core allocates on CUDA by name all through its training machinery. With a CPU-only
torch (or no GPU), ``enable_cpu_compat()`` lets megatron's OWN DDP, optimizers, schedules,
TP/SP mappings and dist_checkpointing run on CPU tensors over gloo, so CPU and GPU share one
training path. It does nothing when ``torch.cuda.is_available()``. What covers what
(file paths under megatron/core, read against 0.16.1 and 0.19.2):

1. ``_CudaToCpu``, a ``TorchFunctionMode``: ``device=`` "cuda" / "cuda:N" /
   ``torch.device("cuda")`` / an int index becomes CPU in every torch call, as does the device
   argument of ``Tensor.to``; ``Tensor.cuda`` and ``pin_memory`` return the tensor as is,
   ``pin_memory=True`` becomes False (no pinned allocator without CUDA).
   - pipeline_parallel/schedules.py  all three schedules: ``total_num_tokens = torch.zeros(...,
     device="cuda")``.
   - optimizer/optimizer.py  ``MixedPrecisionOptimizer.__init__`` (``found_inf``,
     ``_dummy_overflow_buf``, ``_scale_one``), ``FP32Optimizer.__init__`` (``_scale``);
     ``MegatronOptimizer.restore_from_cpu`` (``.cuda()``).
   - optimizer/clip_grads.py  ``get_grad_norm_fp32``, ``clip_grad_by_total_norm_fp32``,
     ``count_zeros_fp32``: norm and overflow buffers on ``'cuda'``.
   - optimizer/grad_scaler.py  ``MegatronGradScaler`` / ``DynamicGradScaler`` scale tensors.
   - transformer/utils.py  ``get_default_causal_mask`` (the local ``DotProductAttention``'s
     causal mask, via fusions/fused_softmax.py ``forward_torch_softmax``).
   - dist_checkpointing/exchange_utils.py  ``ShardDistribution`` exchange buffers;
     strategies/state_dict_saver.py  ``verify_global_md_reuse``.
   It also rewrites ``Tensor.type()`` strings "torch.X" -> "torch.cuda.X":
   optimizer/clip_grads.py ``clip_grad_by_total_norm_fp32`` asserts
   ``param.grad.type() == 'torch.cuda.FloatTensor'``; optimizer/optimizer.py
   ``Float16OptimizerWithFloat16Params`` and distrib_optimizer.py sort params by such strings.

2. CPU stand-ins set on ``torch.cuda`` (they raise, or silently do nothing, without CUDA):
   - ``current_device`` -> ``torch.device("cpu")``, not an index, so that every
     ``device=torch.cuda.current_device()`` is a CPU allocation even where the mode is not
     active: on other threads, and during backward (a mode is suspended while it handles a
     call, and ``torch.autograd.backward`` is one). Covers distributed/param_and_grad_buffer.py
     ``_ParamAndGradBuffer.__init__`` (``grad_data``/``param_data``); p2p_communication.py
     ``_communicate_shapes`` / ``create_tensor_recv_prev/next``; tensor_parallel/mappings.py
     ``_gather_along_first_dim`` / ``_gather_along_last_dim`` /
     ``_reduce_scatter_along_first_dim`` / ``_AllToAll`` (SP, incl. their backward);
     tensor_parallel/layers.py ``LinearWithGradAccumulationAndAsyncCommunication.backward``
     (SP all-gather) and the GPU-init path of ``VocabParallelEmbedding`` /
     ``ColumnParallelLinear`` / ``RowParallelLinear``; models/common/embeddings/
     rotary_pos_embedding.py ``RotaryEmbedding.get_emb`` (moves ``inv_freq``);
     transformer/dot_product_attention.py ``__init__`` (softmax offset).
   - ``synchronize``: p2p_communication.py after ``batch_isend_irecv``;
     distributed_data_parallel.py ``offload/restore_grad_buffers``; parallel_state.py
     ``update_pg_timeout``; dist_checkpointing strategies/fully_parallel.py, filesystem_async.py.
   - ``Stream`` / ``stream`` / ``default_stream`` / ``current_stream``: param_and_grad_buffer.py
     ``_ParamAndGradBucketGroup.start_grad_sync`` / ``finish_grad_sync`` (0.19 calls
     ``current_stream().wait_event`` on every sync) and distributed_data_parallel.py
     ``__init__`` (multi-instance DistOpt stream). CPU ops are synchronous: waits are no-ops.
   - ``set_device`` / ``device_count``: dist_checkpointing/strategies/async_utils.py workers.
   - ``get_rng_state`` / ``set_rng_state`` / ``manual_seed`` / ``manual_seed_all`` (also under
     ``torch.cuda.random``): tensor_parallel/random.py ``_get_cuda_rng_state``,
     ``CudaRNGStatesTracker.add``, ``model_parallel_cuda_manual_seed``; rerun_state_machine.py.
     The "CUDA" generator IS the CPU default generator, the one CPU dropout and init draw from,
     so forking the tracker really forks them.
   Plus megatron's tensor_parallel/random.py ``_set_cuda_rng_state``: it defers the change
   through ``torch.cuda._lazy_call``, which never runs without CUDA, so
   ``CudaRNGStatesTracker.fork`` (TP-region dropout, local ``DotProductAttention.forward``)
   would silently never switch or restore the state. And since the two generators are one,
   ``fork``'s "CPU RNG state changed within GPU RNG context" warning, logged whenever random
   numbers are drawn inside it, is a false alarm here: it is filtered out.

3. Sequence parallelism with the local layer spec. Without apex (GPU-only), the local spec's
   norms (models/backends.py and gpt_layer_specs.py ``LNImpl``, transformer_block.py's final
   norm) are transformer/torch_norm.py ``WrappedTorchNorm``, which asserts
   ``not sequence_parallel``. apex's ``FusedLayerNorm`` (and TE's norms) instead tag their
   weights ``sequence_parallel`` so that distributed/finalize_model_grads.py
   ``_allreduce_non_tensor_model_parallel_grads`` sums their grads over TP;
   ``_sp_torch_norm`` does just that around the torch norm.

Needing nothing: ``torch.cuda.empty_cache`` (a no-op before CUDA initialises) and
``torch.cuda.is_available`` (megatron's own CPU branches key on it). Not covered: literal
"cuda" inside code run under ``torch.autograd.backward`` (none on the paths above) or on other
threads; CUDA graphs, events, TE and apex paths. The mode is thread-local: enable the layer on
the thread that runs megatron.

Version shims
-------------
megatron-core 0.16.x resolves on Python 3.11; 0.19.x on Python 3.12 (the GPU machines).
``RotaryEmbedding.forward(max_seq_len, offset, packed_seq, cp_group)`` is the same in both: no
shim. GPTModel's deprecation log differs: shim below.
"""

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "cpu_compat",
    "cpu_compat_enabled",
    "disable_cpu_compat",
    "enable_cpu_compat",
    "quiet_gpt_model_deprecation",
    "scoped_forward",
]


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int is a CUDA index in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool) and device >= 0


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            # Pinned memory needs a CUDA allocator; megatron pins only to speed H2D copies.
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The optimizers check `param.type() == 'torch.cuda.FloatTensor'` (and Half/BFloat16).
            return result.replace("torch.", "torch.cuda.", 1)
        return result


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``: CPU kernels run synchronously."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event

    def synchronize(self):
        pass

    def query(self):
        return True


_DEFAULT_STREAM = _CpuStream()


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_RNG_FORK_WARNING = _DropMessage("CPU RNG state changed within GPU RNG context")
_GPT_MODEL_DEPRECATION = _DropMessage("GPTModel IS DEPRECATED")


def _sp_torch_norm(cls, config, *args, **kwargs):
    """``WrappedTorchNorm.__new__`` that accepts sequence parallelism (see module docstring)."""
    sequence_parallel = config.sequence_parallel
    config.sequence_parallel = False  # only to get past the assert; restored below
    try:
        norm = _original_norm_new(cls, config, *args, **kwargs)
    finally:
        config.sequence_parallel = sequence_parallel
    for param in norm.parameters():
        param.sequence_parallel = sequence_parallel
    return norm


def _set_rng_state(new_state, device=None, graph_safe=False):
    # Signature covers torch.cuda.set_rng_state and megatron's _set_cuda_rng_state.
    torch.default_generator.set_state(new_state)


def _manual_seed(seed):
    torch.default_generator.manual_seed(int(seed))


_STANDINS = {
    "current_device": lambda: torch.device("cpu"),
    "synchronize": lambda device=None: None,
    "Stream": _CpuStream,
    "stream": lambda stream=None: contextlib.nullcontext(),
    "default_stream": lambda device=None: _DEFAULT_STREAM,
    "current_stream": lambda device=None: _DEFAULT_STREAM,
    "set_device": lambda device: None,
    "device_count": lambda: 1,
    "get_rng_state": lambda device="cuda": torch.default_generator.get_state(),
    "set_rng_state": _set_rng_state,
    "manual_seed": _manual_seed,
    "manual_seed_all": _manual_seed,
}
_RNG_NAMES = ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all")

_mode: TorchFunctionMode | None = None
_original_norm_new = None
_saved: list[tuple[object, str, object]] = []


def _patch(owner, name, value):
    original = getattr(owner, name)
    _saved.append((owner, name, original))
    setattr(owner, name, value)
    return original


def compute_device() -> torch.device:
    """Where megarope puts the tensors it creates itself: the current GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def cpu_compat_enabled() -> bool:
    return _mode is not None


def enable_cpu_compat() -> bool:
    """Activate the CPU layer on this thread if there is no CUDA; idempotent.

    Returns whether the layer is active.
    """
    global _mode, _original_norm_new
    if torch.cuda.is_available() or _mode is not None:
        return _mode is not None
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    for name, fn in _STANDINS.items():
        _patch(torch.cuda, name, fn)
    for name in _RNG_NAMES:
        _patch(torch.cuda.random, name, _STANDINS[name])
    _patch(mcore_random, "_set_cuda_rng_state", _set_rng_state)
    _original_norm_new = _patch(WrappedTorchNorm, "__new__", _sp_torch_norm)
    logging.getLogger(mcore_random.__name__).addFilter(_RNG_FORK_WARNING)
    _mode = _CudaToCpu()
    _mode.__enter__()
    return True


def disable_cpu_compat() -> None:
    """Undo ``enable_cpu_compat`` (on the thread that enabled it)."""
    global _mode
    if _mode is None:
        return
    _mode.__exit__(None, None, None)
    _mode = None
    logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_RNG_FORK_WARNING)
    while _saved:
        owner, name, value = _saved.pop()
        setattr(owner, name, value)


@contextlib.contextmanager
def cpu_compat():
    """Scoped ``enable_cpu_compat``: restores torch.cuda on exit if it enabled the layer."""
    enabled_here = not cpu_compat_enabled() and enable_cpu_compat()
    try:
        yield
    finally:
        if enabled_here:
            disable_cpu_compat()


def scoped_forward(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` whose every forward runs inside :func:`cpu_compat`: a model handed to user code
    (``from_hf``) works on CPU (megatron's local attention takes its score buffer on
    ``torch.cuda.current_device()``) while the user's torch stays untouched between calls."""
    forward = module.forward

    def compat_forward(*args, **kwargs):
        with cpu_compat():
            return forward(*args, **kwargs)

    module.forward = compat_forward
    return module


# ---------------------------------------------------------------------------------------------
# Version shims
# ---------------------------------------------------------------------------------------------


def quiet_gpt_model_deprecation() -> None:
    """0.19 logs a deprecation warning (pointing at HybridModel) for every GPTModel built;
    GPTModel still works and is what megarope builds on. Idempotent."""
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    if _GPT_MODEL_DEPRECATION not in logger.filters:
        logger.addFilter(_GPT_MODEL_DEPRECATION)

"""megatron-core version shims and the CPU compatibility layer — every device or version
difference megarope has to paper over lives here and nowhere else.

CPU layer
---------
megatron-core allocates on CUDA by name all over its training machinery. With a CPU-only torch
(or no GPU), ``enable_cpu_compat()`` makes megatron's OWN DDP, optimizer, pipeline schedules and
tensor/sequence parallel mappings run on CPU tensors over gloo, so CPU and GPU share one training
path. It does nothing when ``torch.cuda.is_available()``. Two pieces:

1. ``_CudaToCpu``, a ``TorchFunctionMode`` that rewrites CUDA devices (``"cuda"``, ``"cuda:N"``,
   ``torch.device("cuda")``, an int index) to CPU in every torch call, plus ``Tensor.to``,
   ``Tensor.cuda`` and ``pin_memory``. Call sites it covers (megatron-core 0.16.1):

   - distributed/param_and_grad_buffer.py  ``_ParamAndGradBuffer.__init__``: ``grad_data`` /
     ``param_data`` / ``shared_buffer`` on ``torch.cuda.current_device()``; the NCCL-UB warm-up
     ``torch.zeros([1], device="cuda")``.
   - optimizer/optimizer.py  ``MixedPrecisionOptimizer.__init__`` (``found_inf``,
     ``_dummy_overflow_buf``, ``_scale_one`` on ``'cuda'``), ``FP32Optimizer.__init__``
     (``_scale``), ``ChainedOptimizer``'s ``get_loss_scale``; offload/reload ``.cuda()``.
   - optimizer/clip_grads.py  ``get_grad_norm_fp32`` / ``clip_grad_by_total_norm_fp32`` /
     ``count_zeros_fp32``: norm and overflow buffers on ``'cuda'``.
   - optimizer/grad_scaler.py  scale tensors on ``'cuda'``, ``load_state_dict``'s ``.cuda()``.
   - pipeline_parallel/schedules.py  ``forward_backward_no_pipelining`` and both pipelining
     schedules: ``total_num_tokens = torch.zeros(..., device="cuda")``.
   - pipeline_parallel/p2p_communication.py  ``_communicate_shapes`` / ``_communicate``: receive
     buffers on ``torch.cuda.current_device()``.
   - tensor_parallel/mappings.py  ``_gather_along_first_dim``, ``_reduce_scatter_along_first_dim``,
     ``_gather_along_last_dim``, ``all_to_all``-style helpers: outputs on
     ``torch.cuda.current_device()`` (sequence parallel).
   - tensor_parallel/layers.py, tensor_parallel/utils.py  SP all-gather buffers.
   - transformer/dot_product_attention.py  ``DotProductAttention.__init__``/``forward`` and
     transformer/utils.py ``get_default_causal_mask``: causal mask on ``"cuda"``.
   - models/common/embeddings/rotary_pos_embedding.py  ``RotaryEmbedding.get_emb`` moves
     ``inv_freq`` to ``torch.cuda.current_device()``.
   - dist_checkpointing/exchange_utils.py, strategies/state_dict_saver.py: exchange buffers and
     the save-verification flag on ``"cuda"``.

2. ``_STANDINS``: CPU replacements for ``torch.cuda`` functions that raise without CUDA:

   - ``current_device`` -> ``torch.device("cpu")``, not an index: most allocations above pass
     ``device=torch.cuda.current_device()``, and this way they are CPU ones even where the mode
     is not active — on other threads, and during backward: a mode is suspended while it
     handles a call, and ``torch.autograd.backward`` is one, so autograd functions' backward
     (tensor_parallel/layers.py ``LinearWithGradAccumulationAndAsyncCommunication``,
     mappings.py gathers under sequence parallelism) never see it.
   - ``synchronize``: p2p_communication.py ``_communicate`` after ``batch_isend_irecv``;
     distributed_data_parallel.py ``offload/restore_grad_buffers``; parallel_state.py
     ``update_pg_timeout``; dist_checkpointing fully_parallel / filesystem_async.
   - ``Stream`` / ``stream`` / ``default_stream`` / ``current_stream``: param_and_grad_buffer.py
     ``_ParamAndGradBucketGroup.start_grad_sync`` / ``finish_grad_sync`` and
     distributed_data_parallel.py ``DistributedDataParallel.__init__`` (multi-instance DistOpt
     communication stream). CPU ops are synchronous, so waits are no-ops.
   - ``set_device`` / ``device_count``: dist_checkpointing/strategies/async_utils.py worker setup.
   - ``get_rng_state`` / ``set_rng_state`` / ``manual_seed`` / ``manual_seed_all`` (also under
     ``torch.cuda.random``): tensor_parallel/random.py ``_get_cuda_rng_state``,
     ``CudaRNGStatesTracker.add``, ``model_parallel_cuda_manual_seed``; rerun_state_machine.py
     RNG save/restore. The "CUDA" generator IS the CPU default generator, since that is the
     one CPU dropout and init draw from: forking the tracker then really forks dropout.
   - megatron's own ``tensor_parallel.random._set_cuda_rng_state``: it queues the state change
     with ``torch.cuda._lazy_call``, which never runs without CUDA, so ``CudaRNGStatesTracker.fork``
     (dropout in TP regions, local ``DotProductAttention.forward``) would silently not restore.

3. Sequence parallelism with the local layer spec. Without apex (GPU-only), the local spec's
   norms (gpt_layer_specs.py / backends.py ``LNImpl``, transformer_block.py final layernorm) are
   transformer/torch_norm.py ``WrappedTorchNorm``, which asserts ``not sequence_parallel``.
   apex's ``FusedLayerNorm`` (and TE's norms) instead tag their weights ``sequence_parallel``
   so that distributed/finalize_model_grads.py ``_allreduce_non_tensor_model_parallel_grads``
   sums their grads over TP; ``_sp_torch_norm`` does exactly that around the torch norm.

``torch.cuda.empty_cache`` and ``torch.cuda.is_available`` need nothing: the former is already a
no-op before CUDA initialises, and megatron's own CPU branches key on the latter.

The mode is thread-local: enable it on the thread that runs megatron (the main one).

Version shims
-------------
megatron-core 0.16.x is what resolves on Python 3.11; 0.19.x on Python 3.12 (the GPU machines).
"""

import contextlib
import inspect
import logging

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "cpu_compat",
    "cpu_compat_enabled",
    "disable_cpu_compat",
    "enable_cpu_compat",
    "get_batch_on_this_cp_rank",
    "quiet_gpt_model_deprecation",
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
    """Stand-in for ``torch.cuda.Stream``/``Event``: CPU kernels run synchronously."""

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


def _set_rng_state(new_state, device="cuda", *args, **kwargs):
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


# ---------------------------------------------------------------------------------------------
# Version shims
# ---------------------------------------------------------------------------------------------


def get_batch_on_this_cp_rank(batch: dict, cp_group=None) -> dict:
    """megatron's zigzag CP slicing of a ``[b, s, ...]`` batch, on any supported version.

    0.16: ``(batch, cp_group=None)``; 0.19: ``(batch, is_hybrid_cp, cp_group=None, ...)`` whose
    per-sequence path calls ``get_world_size(cp_group)``, i.e. the WORLD size when the group is
    None — so the CP group is always passed explicitly.
    """
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank as mcore_fn

    if cp_group is None:
        cp_group = parallel_state.get_context_parallel_group()
    if "is_hybrid_cp" in inspect.signature(mcore_fn).parameters:
        return mcore_fn(batch, is_hybrid_cp=False, cp_group=cp_group)
    return mcore_fn(batch, cp_group=cp_group)


class _DropGPTModelDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "GPTModel IS DEPRECATED" not in record.getMessage()


def quiet_gpt_model_deprecation() -> None:
    """0.19 logs a deprecation warning (pointing at HybridModel) for every GPTModel built;
    GPTModel still works and is what megarope builds on. Idempotent."""
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    if not any(isinstance(f, _DropGPTModelDeprecation) for f in logger.filters):
        logger.addFilter(_DropGPTModelDeprecation())

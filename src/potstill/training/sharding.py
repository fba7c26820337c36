"""How the student and a local teacher are spread over the processes: ``train.strategy``.

``ddp``   every process holds the whole student, its gradients and AdamW state, and the whole
          teacher; Accelerate wraps the student in DistributedDataParallel, which all-reduces
          the gradients once per optimizer step (after the last micro-batch).
``fsdp``  PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``): the student is sharded per
          decoder layer and at the root (embeddings, final norm, head), so each process keeps
          1/N of its weights, gradients and AdamW state; a layer's weights are gathered for its
          forward (and again for its backward) and its gradient reduce-scattered back to the
          shards. A local teacher is sharded the same way and only runs forwards, each layer
          gathering the next one's weights ahead of time.

The loop calls the same methods whichever is chosen (:class:`Strategy`); nothing else in the
run knows which it is, except the checkpoint format (full safetensors for DDP, one shard per
process with ``torch.distributed.checkpoint`` for FSDP: :mod:`potstill.training.checkpoint`).

Why the chunked loss works unchanged under FSDP: FSDP2 does not reshard the root after its
forward, so right after the student's forward its head weight is the gathered, full tensor
registered on the module; the chunked loss reads it then (:func:`potstill.models.heads.head_params`
at call time, never a reference kept from before sharding), computes the head gradient into it,
and FSDP's end-of-backward callback reduce-scatters it back to the shards with every other root
parameter. No ``B x T x V`` logits, no extra copy. A sharded teacher's root is resharded as soon
as the loss has used its head (:meth:`Strategy.release_teacher`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Iterable

import torch
from torch import nn

from ..config import DistillConfig
from ..errors import ConfigError

log = logging.getLogger("potstill")


class Strategy:
    """DDP through Accelerate (the default). Subclasses change how models are placed, how
    gradients are synchronized and clipped, and whether evaluation must run in lock step."""

    name = "ddp"
    #: every process must run the same number of forwards (FSDP gathers weights collectively)
    lockstep = False
    #: checkpoints hold one shard per process (torch.distributed.checkpoint) instead of full files
    sharded_checkpoints = False
    #: this process builds its models on the meta device and receives its shards from the main one
    meta_init = False

    def __init__(self, cfg: DistillConfig, accelerator):
        self.cfg, self.accelerator = cfg, accelerator

    def place_teacher(self, teacher: nn.Module | None) -> None:
        """Put a local teacher model on the device; DDP keeps it whole."""
        if teacher is not None:
            teacher.to(self.accelerator.device)

    def prepare(self, student: nn.Module, optimizer: torch.optim.Optimizer):
        """(the student to call, the student itself, the optimizer): DDP-wrapped by Accelerate."""
        wrapped, optimizer = self.accelerator.prepare(student, optimizer)
        return wrapped, self.accelerator.unwrap_model(wrapped), optimizer

    def place_student(self, student: nn.Module) -> nn.Module:
        """The student on the device, as the optimizer must see it (sharded under FSDP)."""
        return student.to(self.accelerator.device)

    def gradient_sync(self, model: nn.Module, sync: bool):
        """The context of one micro-batch's forward and backward: DDP all-reduces on the last one only."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def clip_grad_norm(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        """Clip the gradients of ``parameters`` to ``max_norm`` in total; returns the norm before clipping."""
        return float(self.accelerator.clip_grad_norm_(parameters, max_norm))

    def release_teacher(self, teacher: nn.Module | None) -> None:
        """The loss has used the teacher's signal for this micro-batch: free what it held gathered."""

    def full_student_state(self, student: nn.Module) -> dict[str, torch.Tensor] | None:
        """The student's whole state dict on the main process, to save it as one plain folder;
        None where the model itself holds it (DDP). Every process must call it."""
        return None


class FSDPStrategy(Strategy):
    """FSDP2 over all processes (one mesh dimension); see the module docstring."""

    name = "fsdp"
    lockstep = True
    sharded_checkpoints = True

    def __init__(self, cfg: DistillConfig, accelerator):
        super().__init__(cfg, accelerator)
        from torch.distributed.device_mesh import init_device_mesh

        device = accelerator.device
        if not torch.distributed.is_initialized():
            # One process: FSDP still needs a process group (of one). Gloo on CPU, NCCL on CUDA.
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                                 store=torch.distributed.HashStore())
        self.mesh = init_device_mesh(device.type, (accelerator.num_processes,))
        # Only the main process reads the weights from disk; the others build empty (meta) models and
        # get their shards from it (_fill_from_main), so a node holds one whole model in memory, not N.
        self.broadcast = accelerator.num_processes > 1
        self.meta_init = self.broadcast and not accelerator.is_main_process
        fc = cfg.train.fsdp
        self.mixed_precision = fsdp_mixed_precision(fc.mixed_precision, cfg.train.precision)
        self.offload = fc.cpu_offload and device.type == "cuda"
        if fc.cpu_offload and device.type != "cuda":
            log.info("train.fsdp.cpu_offload has no effect here: the parameters are already in CPU memory")

    def _shard(self, model: nn.Module, *, reshard_after_forward: bool, trained: bool) -> list[nn.Module]:
        """fully_shard every decoder layer, then the root; returns the layers, in order."""
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        kwargs = {"mesh": self.mesh}
        if trained and self.mixed_precision is not None:
            kwargs["mp_policy"] = self.mixed_precision
        if trained and self.offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        layers = decoder_layers(model)
        for layer in layers:
            fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
        fully_shard(model, **kwargs)
        return layers

    # fully_shard moves each unit's weights to the device as it shards them, one decoder layer at a
    # time: the device never holds a whole model (models load on the CPU).
    def place_teacher(self, teacher: nn.Module | None) -> None:
        if teacher is None:
            return
        if self.cfg.teacher.quantization != "none":
            log.info("teacher: quantized weights are kept whole on every process (FSDP shards floating-point weights)")
            teacher.to(self.accelerator.device)
            return
        whole = self._whole_state(teacher)
        layers = self._shard(teacher, reshard_after_forward=True, trained=False)
        self._fill_from_main(teacher, whole)
        # The teacher only runs forwards: gather each next layer's weights while this one computes.
        for layer, following in zip(layers, layers[1:]):
            layer.set_modules_to_forward_prefetch([following])

    def place_student(self, student: nn.Module) -> nn.Module:
        whole = self._whole_state(student)
        self._shard(student, reshard_after_forward=self.cfg.train.fsdp.reshard_after_forward, trained=True)
        self._fill_from_main(student, whole)
        return student

    def _whole_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The main process's whole weights, kept (by reference) until the others have their shards."""
        return model.state_dict() if self.broadcast and self.accelerator.is_main_process else None

    def _fill_from_main(self, model: nn.Module, whole: dict[str, torch.Tensor] | None) -> None:
        """Every process's shards from the main process's ``whole`` weights (sent one tensor at a time),
        and its buffers (rotary tables, ...: not all are in a state dict) likewise. A process that built
        ``model`` on the meta device allocates its shards first."""
        if not self.broadcast:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        device = self.accelerator.device
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            model.to_empty(device=device)
        set_model_state_dict(model, whole if whole is not None else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)

    def prepare(self, student: nn.Module, optimizer: torch.optim.Optimizer):
        # Already sharded (place_student); Accelerate must not wrap it in DDP too.
        return student, student, optimizer

    def gradient_sync(self, model: nn.Module, sync: bool):
        # Reduce-scatter after every micro-batch: keeping unsharded gradients across micro-batches
        # would hold a full copy of them, which is what FSDP is for avoiding.
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in parameters if p.grad is not None]
        sharded = [g for g in grads if isinstance(g, DTensor)]
        whole = [g for g in grads if not isinstance(g, DTensor)]  # feature projectors: already averaged
        squares = 0.0
        if sharded:
            norm = torch.nn.utils.get_total_norm(sharded, 2.0)
            squares += float(norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
        if whole:
            squares += float(torch.nn.utils.get_total_norm(whole, 2.0)) ** 2
        total = math.sqrt(squares)
        if max_norm != float("inf") and math.isfinite(total) and total > max_norm:
            scale = max_norm / (total + 1e-6)
            for g in grads:
                g.mul_(scale)
        return total

    def full_student_state(self, student: nn.Module) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Gathered layer by layer into CPU memory of the main process only (the others get {}).
        return get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def release_teacher(self, teacher: nn.Module | None) -> None:
        reshard = getattr(teacher, "reshard", None)
        if callable(reshard):
            reshard()  # the root group (embeddings, norm, head) stays gathered after a forward otherwise


# Accelerate's process setups under which potstill places the models itself.
PLAIN_LAUNCHES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_HPU", "MULTI_MLU", "MULTI_SDAA",
                  "MULTI_MUSA", "MULTI_NEURON")


def make_strategy(cfg: DistillConfig, accelerator) -> Strategy:
    """The strategy ``train.strategy`` names, after the checks that need the processes."""
    launch = accelerator.distributed_type.name
    # The launcher's settings, also where Accelerate drops them (its FSDP plugin is ignored on CPUs).
    for name, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(name, "false").lower() in ("1", "true", "yes"):
            launch = what
    if launch not in PLAIN_LAUNCHES:
        # Accelerate would wrap the student its own way (FSDP1/2, DeepSpeed, Megatron) under potstill's loop.
        raise ConfigError(f"launched with Accelerate's {launch} setup: potstill shards with FSDP2 itself; launch "
                          "with torchrun, or `accelerate launch` without an FSDP or DeepSpeed config (e.g. "
                          "--multi_gpu --num_processes N), and set train.strategy=fsdp")
    if cfg.train.strategy == "ddp":
        return Strategy(cfg, accelerator)
    check_fsdp(cfg)
    return FSDPStrategy(cfg, accelerator)


def check_fsdp(cfg: DistillConfig) -> None:
    """Refuse, in one line each, what FSDP here cannot do."""
    from ..models.precision import resolve_precision

    if resolve_precision(cfg.train.precision) == "fp16":
        raise ConfigError("train.strategy=fsdp with train.precision=fp16: fp16 needs a loss scaler that sharded "
                          "gradients do not get here; use train.precision=bf16 (or fp32)")


def fsdp_mixed_precision(enabled: bool | str, precision: str):
    """FSDP2's MixedPrecisionPolicy for ``train.fsdp.mixed_precision``: gather and compute in bf16,
    reduce gradients in fp32, fp32 master weights; None (autocast, as DDP) when off.

    ``auto`` turns it on whenever the run computes in bf16: under FSDP, autocast's per-layer casts
    of the gathered fp32 weights made the student's forward and backward about twice as slow on
    this project's CPU (bench/fsdp.py, 2 processes: 2.3 s a step with the policy, 3.6 s with
    autocast, 1.8 s for DDP with autocast), and the policy also halves the all-gather traffic."""
    from ..models.precision import resolve_precision
    from torch.distributed.fsdp import MixedPrecisionPolicy

    bf16 = resolve_precision(precision) == "bf16"
    if enabled == "auto":
        enabled = bf16
    if not enabled:
        return None
    if not bf16:
        raise ConfigError(f"train.fsdp.mixed_precision needs train.precision=bf16 (it is {precision}): the policy "
                          "computes in bf16 and keeps fp32 master weights")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the largest ``nn.ModuleList`` of the model
    (``model.model.layers`` for Llama, Qwen, Mistral, Gemma; ``transformer.h`` for GPT-2)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(f"train.strategy=fsdp: {type(model).__name__} has no list of decoder layers to shard; "
                          "use train.strategy=ddp")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this process holds for ``tensors`` (a DTensor counts its local shard only)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total

"""Reaching a model's LM head from inside its forward: the backbone/head split every integration shares.

Fused losses never call ``lm_head``: they read ``lm_head.weight`` and hand it to a kernel. Under
distributed wrappers that read is only safe in the right place and in the right form:

* FSDP (1 and 2) unshards the root unit's parameters only while the root module's ``forward`` runs,
  and DeepSpeed ZeRO-3 arms its gradient hooks through module forwards. So the loss runs *inside* the
  model's forward: :func:`install` patches ``model.forward`` so that
  ``model(..., fastpref_fn=fn)`` runs the backbone and returns ``fn(hidden, weight, bias)``.
* FSDP2 with the head as its own ``fully_shard`` unit (or tensor parallelism) leaves ``weight`` a
  ``DTensor``: it is gathered with ``full_tensor()``; for FSDP the gradient of the full tensor is a
  per-rank partial, so it is declared ``Partial("avg")`` and reduce-scattered back with FSDP's mean.
* DeepSpeed ZeRO-3 partitions ``weight`` to an empty tensor outside ``lm_head``'s own forward: it is
  gathered with ``deepspeed.zero.GatheredParameters`` and copied through an autograd identity, so the
  op sees the full weight (forward and backward); in backward the parameter is gathered again while
  its full-shaped gradient is accumulated, where ZeRO-3's hooks reduce and partition it, as for any
  module. The copy (``V x d`` in the weight's dtype) lives until backward.
* FSDP1 with ``lm_head`` wrapped as its own unit exposes a flat shard: that is refused with a clear
  error (keep the head in the root unit, the default of the transformer auto-wrap policies).

``transformers`` is only needed for the models themselves; nothing here imports it at module level.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Iterator

import torch

_PREVIOUS = "_fastpref_previous_forward"  # instance key: the forward the patch falls back to
_INSTALLED = "_fastpref_forward"  # instance key: the patch itself, bound to the module


def logit_transform(model) -> dict:
    """``logit_scale`` and ``softcap`` of the model's head, read from its (text) config.

    Same conventions as the model code (and TRL's fused head): Gemma-2's ``final_logit_softcapping``,
    Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``, Granite/MiniCPM's ``logits_scaling``
    (a divisor).
    """
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        scale = scaling if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return {"logit_scale": 1.0 if scale is None else float(scale), "softcap": softcap}


def check_reference(policy, ref_model) -> None:
    """The reference's head must transform its logits as the policy's does: the fused pass applies the
    policy's :func:`logit_transform` to both."""
    mine, theirs = logit_transform(policy), logit_transform(ref_model)
    if mine != theirs:
        raise ValueError(f"fastpref: `ref_model` scales / soft-caps its logits as {theirs}, the policy as {mine}; the "
                         "fused loss applies one transform to both: use a reference of the policy's architecture")


def _is_fsdp2(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return isinstance(module, FSDPModule)


def _is_zero3(param) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


class _Identity(torch.autograd.Function):
    """A full copy of a ZeRO-3 parameter whose gradient goes straight to the parameter.

    Autograd accumulates a full-shaped gradient into the parameter, which only works while the
    parameter is gathered (a partitioned one has an empty ``data``): so the backward gathers it again,
    as ZeRO-3's pre-backward hooks do for a module, and releases it once the gradient is accumulated
    (after ZeRO-3's own reduce-and-partition hook, registered earlier, has consumed it).
    """

    @staticmethod
    def forward(ctx, param, full):
        ctx.param = param
        return full

    @staticmethod
    def backward(ctx, grad):
        param = ctx.param
        gathered = _zero3_gather([param])
        gathered.__enter__()

        def release(_):
            handle.remove()
            gathered.__exit__(None, None, None)

        handle = param.register_post_accumulate_grad_hook(release)
        return grad, None


def _zero3_gather(params: list) -> contextlib.AbstractContextManager:
    """ZeRO-3's gather context for the partitioned ``params`` (a null context when all are available)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    import deepspeed

    todo = {id(p): p for p in params if p is not None and p.ds_status != ZeroParamStatus.AVAILABLE}
    return deepspeed.zero.GatheredParameters(list(todo.values())) if todo else contextlib.nullcontext()


def _full(param, *, owner_is_fsdp: bool, grad: bool) -> torch.Tensor | None:
    """``param`` as a full, plain tensor connected to it by autograd (detached when ``grad`` is False)."""
    if param is None:
        return None
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # pragma: no cover
        DTensor = ()  # noqa: N806
    if isinstance(param, DTensor):
        if not grad:
            return param.detach().full_tensor()
        # FSDP shards over data-parallel ranks: each rank's gradient of the full tensor is a partial
        # contribution, averaged like FSDP's reduce-scatter. Tensor parallelism sees identical data on
        # every rank, so its gradient is replicated (the default).
        placements = [Partial("avg")] * len(param.placements) if owner_is_fsdp else None
        return param.full_tensor(grad_placements=placements)
    if _is_zero3(param):
        with _zero3_gather([param]):
            full = param.detach().clone()
            # Applied while gathered, so autograd records the parameter's full shape for its gradient.
            return _Identity.apply(param, full) if grad and param.requires_grad else full
    return param if grad else param.detach()


@contextlib.contextmanager
def gathered_head(
    model, *, grad: bool = True, copy: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(weight, bias)`` of ``model``'s output embeddings, full and plain, for the fused op.

    Use inside the model's forward (see :func:`install`). ``grad=False`` gives detached tensors (a
    reference head); ``copy=True`` also copies plain parameters, for a head that must outlive the
    forward of a sharded model (FSDP frees unsharded storage after it).
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"fastpref: {type(model).__name__} has no output embeddings (LM head) to fuse")
    tuner = getattr(sys.modules.get("peft.tuners.tuners_utils"), "BaseTunerLayer", None)
    if tuner is not None and isinstance(head, tuner):
        raise ValueError("fastpref: the LM head carries a PEFT adapter, which the fused loss would ignore (it reads "
                         "lm_head.weight): remove 'lm_head' from the adapter's target_modules")
    fsdp = _is_fsdp2(model) or _is_fsdp2(head)
    weight = _full(head.weight, owner_is_fsdp=fsdp, grad=grad)
    bias = _full(getattr(head, "bias", None), owner_is_fsdp=fsdp, grad=grad)
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(
            f"fastpref: lm_head.weight has shape {tuple(weight.shape)} inside the forward: it is sharded "
            "(FSDP1 with lm_head wrapped as its own unit?). Keep lm_head in the root FSDP unit, or use FSDP2."
        )
    if copy and not grad:
        weight = weight.clone() if _shares_storage(weight, head.weight) else weight
        bias = bias.clone() if bias is not None and _shares_storage(bias, head.bias) else bias
    yield weight, bias


def _shares_storage(x: torch.Tensor, param) -> bool:
    try:
        return x.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    except (RuntimeError, AttributeError):
        return False


def backbone(model):
    """The decoder without its head: ``model.base_model``, else ``model.get_decoder()``, else the child
    ``model.model`` (pre-v5 VLM wrappers; Llama4ForCausalLM, whose ``base_model_prefix`` names no child)."""
    for find in (lambda: getattr(model, "base_model", None), lambda: getattr(model, "get_decoder", lambda: None)(),
                 lambda: getattr(model, "model", None)):
        body = find()
        if isinstance(body, torch.nn.Module) and body is not model:
            return body
    raise ValueError(f"fastpref: cannot find the backbone of {type(model).__name__} "
                     "(no base_model, get_decoder() or child module 'model')")


def _fused_forward(self, *args, fastpref_fn=None, fastpref_grad=True, fastpref_copy=False, **kwargs):
    """The patched forward (see :func:`install`). Everything is looked up through ``self``, so a deep
    copy of a patched model runs its own weights, and FSDP/PEFT replacing modules later is seen."""
    if fastpref_fn is None:
        previous = self.__dict__.get(_PREVIOUS)
        if previous is None:
            return type(self).forward(self, *args, **kwargs)
        return previous(self, *args, **kwargs)
    kwargs["use_cache"] = False
    kwargs.pop("labels", None)
    kwargs.pop("num_items_in_batch", None)
    outputs = backbone(self)(*args, **kwargs)
    with gathered_head(self, grad=fastpref_grad, copy=fastpref_copy) as (weight, bias):
        return fastpref_fn(outputs.last_hidden_state, weight, bias)


@functools.cache
def _forward_for(cls: type):
    """:func:`_fused_forward` with the signature of ``cls.forward`` (one function per class, no state):
    the Trainer keeps dataset columns and ``generate`` checks model kwargs by that signature."""

    def forward(self, *args, **kwargs):
        return _fused_forward(self, *args, **kwargs)

    forward.__wrapped__ = cls.forward
    forward.__doc__ = cls.forward.__doc__
    forward.fastpref_patch = True
    return forward


def _previous_forward(target):
    """The forward the patch falls back to, as a function of the module (None: the class's own).

    A bound method of ``target`` (TRL's fused-head patch, accelerate's autocast wrapper) is kept as its
    function and called with the module, so a copy calls it with itself. Any other callable is called
    as it is (it is bound to whatever it closes over).
    """
    current = target.__dict__.get("forward")
    if current is None:
        return None
    if isinstance(current, types.MethodType) and current.__self__ is target:
        return current.__func__
    return lambda self, *args, **kwargs: current(*args, **kwargs)


def check_head(model) -> None:
    """Refuse a model whose logits are not what the fused loss computes: ``lm_head`` on the backbone's last
    hidden state, scaled and soft-capped as :func:`logit_transform` reads from the config.

    Catches parameters outside both the backbone and the head (BERT-style prediction transforms,
    RoBERTa / ModernBERT decoder heads) and config fields of a head the fused loss does not apply.
    """
    head = model.get_output_embeddings()
    try:
        body = backbone(model)
    except ValueError:
        return  # the forward raises the same error
    if head is None:
        return  # so does gathered_head
    inside = {id(p) for p in body.parameters()} | {id(p) for p in head.parameters()}
    extra = sorted({name.rsplit(".", 1)[0] for name, p in model.named_parameters() if id(p) not in inside})
    if extra:
        raise ValueError(
            f"fastpref: {type(model).__name__} computes its logits through modules besides its backbone and LM head "
            f"({', '.join(extra[:4])}), which the fused loss would skip: it applies lm_head.weight to the backbone's "
            "last hidden state"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    multiplier = getattr(config, "logits_mup_width_multiplier", None)
    unpadded = getattr(config, "unpadded_vocab_size", None)
    weight = getattr(head, "weight", None)
    rows = weight.shape[0] if weight is not None and weight.dim() == 2 else None
    if multiplier not in (None, 1, 1.0) or (unpadded is not None and rows is not None and unpadded < rows):
        raise ValueError(
            f"fastpref: {type(model).__name__}'s head divides the hidden states by logits_mup_width_multiplier="
            f"{multiplier} and / or keeps the first unpadded_vocab_size={unpadded} of {rows} logits, which the fused "
            "loss does not apply"
        )


def install(model) -> None:
    """Patch ``model.forward``: ``model(..., fastpref_fn=fn)`` runs the backbone and returns ``fn(...)``.

    ``fn(hidden, weight, bias)`` gets the backbone's last hidden states ``[B, T, d]`` (unshifted) and
    the full head from :func:`gathered_head` (with ``fastpref_grad=False``: detached;
    ``fastpref_copy=True``: copied). Without ``fastpref_fn`` the forward is the previous one, so
    generation and other trainers' patches keep working. Idempotent; patch the base model (not a PEFT
    wrapper), before or after TRL's own fused-head patch.

    The patch is a bound method of one stateless function per model class, so ``copy.deepcopy`` (TRL's
    ``create_reference_model``) gives a patched copy that runs its own weights. Pickling drops the patch
    (the unpickled model has its plain forward) and the next :func:`install` puts it back.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    installed = getattr(target.__dict__.get(_INSTALLED), "__func__", None)
    if getattr(installed, "fastpref_patch", False):
        return  # maybe wrapped since by accelerate (autocast), which must stay outermost
    check_head(target)
    target.__dict__[_PREVIOUS] = _previous_forward(target)
    target.forward = types.MethodType(_forward_for(type(target)), target)
    # A separate record of the patch: what an unpickled copy restores here is no longer the patch.
    target.__dict__[_INSTALLED] = target.forward

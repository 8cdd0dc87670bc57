"""The forward patch of ``fastpref.integrations._head``: copies and unpickled models run their own weights,
PEFT-wrapped models, TRL's own fused-head patch in either order, and the signature the Trainer reads.

Each check compares a patched model with an UNPATCHED Llama holding the same weights."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch

pytest.importorskip("transformers")

from integration_helpers import make_model  # noqa: E402

import fastpref  # noqa: E402
from fastpref.integrations import _head  # noqa: E402

VOCAB = 128


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 7), generator=g)


def _plain_twin(model):
    """An unpatched Llama with ``model``'s current weights."""
    twin = make_model(VOCAB, hidden=32)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def _grab(hidden, weight, bias):
    return hidden, weight


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _generate(model, ids):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          pad_token_id=0)


def _assert_runs_own_weights(model, ids):
    """Plain forward, generate and the fused path of ``model`` equal an unpatched model with its weights."""
    twin = _plain_twin(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, twin(ids).logits, rtol=0, atol=1e-6)
        assert torch.equal(_generate(model, ids), _generate(twin, ids))
        hidden, weight = model(ids, fastpref_fn=_grab)
        assert weight is model.lm_head.weight
        torch.testing.assert_close(hidden @ weight.T, twin(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("clone", ["deepcopy", "pickle", "create_reference_model"])
def test_copy_of_patched_model_runs_its_own_weights(clone):
    model = make_model(VOCAB, hidden=32).eval()
    _head.install(model)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    if clone == "deepcopy":
        other = copy.deepcopy(model)
    elif clone == "pickle":
        other = pickle.loads(pickle.dumps(model))
        assert other.forward.__func__ is type(other).forward  # the patch is not pickled...
        _head.install(other)  # ...and every fastpref entry point installs it
    else:
        trl_utils = pytest.importorskip("trl.experimental.utils")
        other = trl_utils.create_reference_model(model)
    _perturb(other)
    _assert_runs_own_weights(other, ids)
    _assert_runs_own_weights(model, ids)
    with torch.no_grad():
        assert not torch.allclose(other(ids).logits, before, atol=1e-2)  # the perturbation shows
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_install_is_idempotent_and_keeps_the_signature():
    model = make_model(VOCAB, hidden=32)
    _head.install(model)
    patched = model.forward
    _head.install(model)
    assert model.forward is patched
    # transformers' Trainer keeps dataset columns, and generate checks kwargs, by the forward's signature
    assert list(inspect.signature(model.forward).parameters) == list(
        inspect.signature(type(model).forward.__get__(model)).parameters)


def test_peft_model_copy_runs_its_own_adapters():
    peft = pytest.importorskip("peft")
    model = make_model(VOCAB, hidden=32)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0)).eval()
    _head.install(wrapped)
    assert "forward" in wrapped.get_base_model().__dict__  # the base model is patched, not the wrapper
    ids = _ids()
    other = copy.deepcopy(wrapped)
    with torch.no_grad():
        before = wrapped(input_ids=ids).logits
        for name, p in other.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
        moved = other(input_ids=ids).logits
        assert not torch.allclose(moved, before, atol=1e-2)  # the copy's adapters act on the copy
        torch.testing.assert_close(wrapped(input_ids=ids).logits, before, rtol=0, atol=0)
        # the fused path of the copy sees the copy's adapters too
        hidden, weight = other(input_ids=ids, fastpref_fn=_grab)
        torch.testing.assert_close(hidden @ weight.T, moved, rtol=0, atol=1e-5)
        with other.disable_adapter():
            hidden, weight = other(input_ids=ids, fastpref_fn=_grab)
        # LoRA's B starts at zero: without adapters the copy is the initial model
        torch.testing.assert_close(hidden @ weight.T, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", ["trl_first", "fastpref_first"])
def test_coexists_with_trl_fused_head(order):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model = make_model(VOCAB, hidden=32).eval()
    if order == "trl_first":
        trl_utils.add_fused_lm_head(model)
        _head.install(model)
    else:
        _head.install(model)
        trl_utils.add_fused_lm_head(model)
    ids = _ids()
    labels = ids.clone()
    labels[:, :2] = -100
    twin = _plain_twin(model)
    with torch.no_grad():
        logits = twin(ids).logits
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=1e-6)
        hidden, weight = model(ids, fastpref_fn=_grab)
        torch.testing.assert_close(hidden @ weight.T, logits, rtol=0, atol=1e-5)
        fused = model(ids, labels=labels, fused_lm_head=True)
        want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = labels[:, 1:] != -100
        torch.testing.assert_close(fused.log_probs[mask], want[mask], rtol=0, atol=1e-5)


def _tiny(model_type: str, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64, **config)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type, config", [("bert", {"is_decoder": True}), ("roberta", {"is_decoder": True})])
def test_heads_with_modules_between_backbone_and_lm_head_are_refused(model_type, config):
    """BERT / RoBERTa causal-LM heads run a dense + layer norm before the decoder: fusing lm_head.weight onto the
    backbone's output scored other logits (log-probs off by ~0.3-0.9 nats per token) without a word."""
    model = _tiny(model_type, **config)
    ids = _ids()
    with torch.no_grad():
        hidden, weight = model.base_model(ids).last_hidden_state, model.get_output_embeddings().weight
        assert not torch.allclose(hidden @ weight.T + model.get_output_embeddings().bias, model(ids).logits, atol=1e-2)
    with pytest.raises(ValueError, match="modules besides its backbone and LM head"):
        _head.install(model)


def test_head_config_fields_the_fused_loss_does_not_apply_are_refused():
    model = make_model(VOCAB, hidden=32)
    model.config.logits_mup_width_multiplier = 24.0  # Inkling: lm_head(hidden / multiplier)
    with pytest.raises(ValueError, match="logits_mup_width_multiplier=24.0"):
        _head.install(model)
    model = make_model(VOCAB, hidden=32)
    model.config.unpadded_vocab_size = VOCAB - 8  # Inkling: logits[..., :unpadded_vocab_size]
    with pytest.raises(ValueError, match=f"unpadded_vocab_size={VOCAB - 8} of {VOCAB}"):
        _head.install(model)


def test_lora_on_the_lm_head_is_refused():
    """The fused loss reads lm_head.weight: an adapter on the head would never act nor train."""
    peft = pytest.importorskip("peft")
    model = make_model(VOCAB, hidden=32)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0))
    _head.install(wrapped)
    with pytest.raises(ValueError, match="LM head carries a PEFT adapter"):
        wrapped(input_ids=_ids(), fastpref_fn=_grab)


# Decoder families (tiny configs): the patched forward finds each backbone and head, and the fused
# log-probs with the config's logit transform equal log_softmax of the model's own logits.
FAMILIES = [
    ("llama", {}),
    ("qwen2", {}),
    ("mistral", {}),
    ("phi3", {}),
    ("gemma2", {"final_logit_softcapping": 5.0, "head_dim": 8}),  # soft-capped logits
    ("cohere", {"logit_scale": 0.5}),  # scaled logits
    ("granite", {"logits_scaling": 4.0}),  # a divisor
    ("llama4_text", {"intermediate_size_mlp": 64, "num_local_experts": 2, "head_dim": 8}),  # base_model_prefix names no child
]


@pytest.mark.parametrize("model_type, config", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_decoder_families_fused_logps_equal_their_logits(model_type, config):
    model = _tiny(model_type, num_key_value_heads=2, pad_token_id=0, **config)
    _head.install(model)
    ids = _ids()
    labels = fastpref.shift_labels(ids)

    def logps(hidden, weight, bias):
        return fastpref.token_stats(hidden, weight, labels, bias=bias, **_head.logit_transform(model)).logp

    with torch.no_grad():
        got = model(input_ids=ids, fastpref_fn=logps)
        logits = model(input_ids=ids).logits.double()
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got[:, :-1].double(), want, rtol=0, atol=2e-5)

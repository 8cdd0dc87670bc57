"""Level 1 arguments: every wrong value refused by name, NaN checks that look only at what is used, and the
inputs users bring (float64, autocast, a ZeRO-3 partitioned head)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastpref
from oracle import make_head, make_labels, rel_err, token_oracle


def _call(**overrides):
    head = make_head(2, 5, 8, 30, ref=True)
    args = dict(hidden=head["hidden"], weight=head["weight"], labels=make_labels(2, 5, 30, prompt=1))
    args.update(overrides)
    return fastpref.token_stats(**args)


@pytest.mark.parametrize("arg, value", [
    ("hidden", [[0.0] * 8] * 5),
    ("weight", torch.zeros(0, 8)),
    ("weight", torch.zeros(30)),
    ("chunk_size", True),
    ("chunk_size", 0),
    ("chunk_size", 2.0),
    ("logits_budget", True),
    ("logits_budget", -1),
    ("logit_scale", float("nan")),
    ("logit_scale", 0.0),
    ("logit_scale", -1.0),
    ("logit_scale", "2"),
    ("temperature", float("inf")),
    ("temperature", 0),
    ("softcap", float("nan")),
    ("softcap", -3.0),
    ("softcap", True),
    ("entropy", "yes"),
    ("is_top1", "no"),
    ("detach_entropy", None),
    ("detach_entropy", True),  # without entropy=True: nothing to detach
    ("ignore_index", True),
    ("backend", "gpu"),
    ("backend", object()),
])
def test_wrong_values_are_refused_by_name(arg, value):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        _call(**{arg: value})


def test_zero3_partitioned_weight_names_zero3_and_the_fix():
    weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves outside the module's forward
    weight.ds_id, weight.ds_status = 7, "NOT_AVAILABLE"
    with pytest.raises(ValueError, match="ZeRO-3.*GatheredParameters"):
        _call(weight=weight)


def test_float64_backend_must_be_torch():
    head = make_head(1, 4, 8, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match="`backend`.*float64"):
        fastpref.token_stats(head["hidden"], head["weight"], make_labels(1, 4, 20), backend="cpp")


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_float64_inputs_match_the_oracle_in_float64(budget):
    head = make_head(2, 6, 16, 97, dtype=torch.float64, bias=True, ref=True)
    labels = make_labels(2, 6, 97, prompt=2)
    h = head["hidden"].clone().requires_grad_()
    w = head["weight"].clone().requires_grad_()
    stats = fastpref.token_stats(h, w, labels, bias=head["bias"], entropy=True, ref_hidden=head["ref_hidden"],
                                 ref_weight=head["ref_weight"], kl=True, chunk_size=4, logits_budget=budget)
    assert stats.logp.dtype == torch.float64
    ref, h64 = token_oracle(head, labels, entropy=True, kl=True)
    for name in ("logp", "entropy", "ref_logp", "kl"):
        assert rel_err(getattr(stats, name), getattr(ref, name)) < 1e-12, name
    gh, gw = torch.autograd.grad((stats.logp + stats.entropy + stats.kl).sum(), [h, w])
    rh, rw = torch.autograd.grad((ref.logp + ref.entropy + ref.kl).sum(), [h64["hidden"], h64["weight"]])
    assert rel_err(gh, rh) < 1e-12 and rel_err(gw, rw) < 1e-12


def test_autocast_runs_the_head_in_its_dtype_like_f_linear():
    head = make_head(2, 6, 16, 97)
    labels = make_labels(2, 6, 97, prompt=1)
    w = head["weight"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = fastpref.token_stats(head["hidden"], w, labels)
        logits = torch.nn.functional.linear(head["hidden"], w)  # what the model's own head would give
    assert logits.dtype == torch.bfloat16 and stats.logp.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    expected = expected.masked_fill(labels == -100, 0)
    assert (stats.logp - expected).abs().max() < 1e-5  # the same bf16 logits, fp32 statistics
    (g,) = torch.autograd.grad(stats.logp.sum(), [w])
    assert g.dtype == torch.float32 and torch.isfinite(g).all()  # back through the cast to the fp32 weight


def test_nan_at_an_ignored_position_is_not_an_error():
    head = make_head(2, 5, 8, 30)
    labels = make_labels(2, 5, 30, prompt=2)
    hidden = head["hidden"].clone()
    hidden[:, 0] = float("nan")  # prompt positions: never read
    stats = fastpref.token_stats(hidden, head["weight"], labels)
    assert torch.isfinite(stats.logp).all()
    hidden[1, 3] = float("nan")
    with pytest.raises(ValueError, match="`hidden` contains NaN or Inf"):
        fastpref.token_stats(hidden, head["weight"], labels)


@pytest.mark.parametrize("arg", ["weight", "bias", "ref_hidden", "ref_weight", "ref_bias"])
def test_non_finite_head_and_reference_are_named(arg):
    head = make_head(2, 5, 8, 30, bias=True, ref=True)
    head["ref_bias"] = head["bias"].clone()
    head[arg] = head[arg].clone()
    head[arg].view(-1)[-1] = float("inf") if arg.endswith("bias") else float("nan")  # a used position
    labels = make_labels(2, 5, 30, prompt=1)
    with pytest.raises(ValueError, match=f"`{arg}` contains NaN or Inf"):
        fastpref.token_stats(labels=labels, kl=True, **head)


def test_large_finite_bf16_values_are_not_a_false_alarm():
    """An fp32 sum of these bf16 tensors overflows to inf; their logits are finite."""
    head = make_head(2, 5, 8, 30, dtype=torch.bfloat16)
    labels = make_labels(2, 5, 30, prompt=2)
    hidden, weight = head["hidden"].clone(), head["weight"].clone()
    hidden[:, :2] = 3e38  # ignored positions
    weight[:, -1] = 3e38
    hidden[..., -1] = 0  # meets the huge column with zeros: finite logits
    stats = fastpref.token_stats(hidden, weight, labels)
    assert torch.isfinite(stats.logp).all()


def test_overflowing_logits_are_reported():
    head = make_head(1, 3, 8, 30, dtype=torch.bfloat16)
    hidden = head["hidden"].clone()
    hidden[0, 1] = 3e38  # finite, but h @ W.T overflows bf16
    with pytest.raises(ValueError, match="overflows"):
        fastpref.token_stats(hidden, head["weight"].abs() + 1, make_labels(1, 3, 30))


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_backends_says_triton_only_where_it_can_run():
    """Without CUDA and without Triton's interpreter, triton is reported unavailable, and refused by name."""
    code = (
        "import torch, fastpref\n"
        "ok = fastpref.backends()\n"
        "try:\n"
        "    fastpref.token_stats(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), backend='triton')\n"
        "    err = ''\n"
        "except ValueError as e:\n"
        "    err = str(e)\n"
        "print(ok['triton'] or torch.cuda.is_available(), '`backend`' in err or torch.cuda.is_available())\n"
    )
    assert _python(code) == "False True"


def test_importing_and_calling_fastpref_does_not_import_dynamo():
    """Level 1 is a torch.library op: no 2-3 s import of torch._dynamo on the first call."""
    code = (
        "import sys, torch, fastpref\n"
        "h = torch.randn(3, 8, requires_grad=True)\n"
        "fastpref.token_stats(h, torch.randn(11, 8), torch.tensor([1, -100, 4])).logp.sum().backward()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    assert _python(code) == "False"


def test_reference_head_defaults_to_the_policy_head_with_its_bias():
    """Without ref_weight the reference is the policy's head; its bias used to be dropped (ref_bias None)."""
    head = make_head(2, 5, 8, 30, bias=True)
    labels = make_labels(2, 5, 30, prompt=1)
    h, w, b = head["hidden"], head["weight"], head["bias"]
    same = fastpref.token_stats(h, w, labels, bias=b, ref_hidden=h, backend="torch")
    assert torch.equal(same.ref_logp, same.logp)
    own = fastpref.token_stats(h, w, labels, bias=b, ref_hidden=h, ref_bias=torch.zeros_like(b), backend="torch")
    assert torch.equal(own.ref_logp, fastpref.token_stats(h, w, labels, backend="torch").logp)  # an explicit one wins
    out = fastpref.preference_loss(h, w, labels, bias=b, ref_hidden=h, backend="torch")  # DPO against itself
    assert abs(out.metrics["rewards/margins"].item()) < 1e-6


def test_reduce_tokens_refuses_stats_of_other_labels():
    """Stats of [R, T'] positions reduced with [R, T] labels summed the wrong columns without a word."""
    head = make_head(2, 5, 8, 30)
    labels = make_labels(2, 5, 30, prompt=1)
    stats = fastpref.token_stats(head["hidden"], head["weight"], labels, backend="torch")
    with pytest.raises(ValueError, match="`stats`"):
        fastpref.reduce_tokens(stats, labels[:, :4])
    assert torch.allclose(fastpref.reduce_tokens(stats, labels).sum_logp, stats.logp.sum(-1))


def test_autocast_leaves_fp64_as_f_linear_does():
    """Under autocast fp64 inputs were cast to bf16 (F.linear keeps fp64), and fp64 with fp32 was accepted."""
    head = make_head(2, 6, 16, 97)
    labels = make_labels(2, 6, 97, prompt=1)
    h64, w64 = head["hidden"].double(), head["weight"].double()
    plain = fastpref.token_stats(h64, w64, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(h64, w64).dtype == torch.float64
        stats = fastpref.token_stats(h64, w64, labels)
        with pytest.raises(ValueError, match="dtype"):
            fastpref.token_stats(h64, head["weight"], labels)
    assert stats.logp.dtype == torch.float64 and torch.equal(stats.logp, plain.logp)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_double_backward_is_refused(frozen):
    """With a frozen head, create_graph=True gave a constant gradient: a gradient penalty silently trained on the
    first-order part only (a trainable head failed with an obscure out= error)."""
    head = make_head(2, 6, 16, 97)
    labels = make_labels(2, 6, 97, prompt=1)
    h = head["hidden"].clone().requires_grad_()
    w = head["weight"].clone().requires_grad_(not frozen)
    stats = fastpref.token_stats(h, w, labels)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(stats.logp.sum(), h, create_graph=True)
    (g,) = torch.autograd.grad(fastpref.token_stats(h, w, labels).logp.sum(), h)  # the first derivative is fine
    assert torch.isfinite(g).all()

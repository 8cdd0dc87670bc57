"""Level 1 is a torch.library custom op (fake implementation + autograd formula): a DPO step over a tiny
Llama compiles with ``fullgraph=True`` and gives the eager step's loss and gradients."""

from __future__ import annotations

import pytest
import torch

import fastpref
from integration_helpers import make_model

pytestmark = pytest.mark.slow

VOCAB = 256


def _batch(seed=0, pairs=2, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2 * pairs, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[0, -3:] = -100  # a shorter response
    ref = -torch.rand(2 * pairs, generator=g) * 20
    return ids, fastpref.shift_labels(labels), ref


def _dpo_step(model, ids, labels, ref, *, entropy: bool, budget: int):
    hidden = model.model(input_ids=ids).last_hidden_state
    stats = fastpref.token_stats(hidden, model.lm_head.weight, labels, entropy=entropy, logits_budget=budget,
                                 chunk_size=8)
    seq = stats.logp.sum(-1)
    half = ids.shape[0] // 2
    loss, _, _ = fastpref.dpo_loss(seq[:half], seq[half:], ref[:half], ref[half:], beta=0.1)
    if entropy:
        loss = loss + 1e-3 * stats.entropy.sum()
    return loss


# inductor (what users run) for one; AOTAutograd alone for the other (it exercises the same fake
# implementation and autograd formula, without inductor's CPU code generation time).
@pytest.mark.parametrize("entropy, budget, backend", [(False, 0, "inductor"), (True, 1 << 30, "aot_eager")],
                         ids=["recompute-inductor", "entropy+kept-aot_eager"])
def test_compiled_dpo_step_equals_eager(entropy, budget, backend):
    ids, labels, ref = _batch()
    model = make_model(VOCAB, hidden=32)
    eager = _dpo_step(model, ids, labels, ref, entropy=entropy, budget=budget)
    eager.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(_dpo_step, fullgraph=True, backend=backend)(model, ids, labels, ref, entropy=entropy, budget=budget)
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, eager_grads[name], rtol=1e-4, atol=1e-6), name


def test_no_graph_break():
    import torch._dynamo

    ids, labels, ref = _batch(1)
    model = make_model(VOCAB, hidden=32)
    explained = torch._dynamo.explain(_dpo_step)(model, ids, labels, ref, entropy=True, budget=0)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


_COMPILED_FIRST = """
import sys
if sys.argv[1] == "unbuilt":
    sys.modules["fastpref.ops._cpu_rows"] = None  # the C++ extension missing: CPU falls back to 'torch'
import warnings
import torch, fastpref
def loss(h, w, y):
    return fastpref.token_stats(h, w, y, entropy=True).logp.sum()
h = torch.randn(2, 5, 16, requires_grad=True)
w = torch.randn(32, 16, requires_grad=True)
y = torch.randint(0, 32, (2, 5))
compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(h, w, y)
compiled.backward()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    eager = loss(h.detach(), w.detach(), y)
assert torch.allclose(compiled, eager, rtol=1e-5), (compiled, eager)
print("compiled first:", compiled.item(), "| eager warned:", [str(c.message)[:40] for c in caught])
"""


@pytest.mark.parametrize("extension", ["built", "unbuilt"])
def test_first_call_can_be_compiled(extension):
    """The process's first fastpref call inside ``fullgraph=True``: choosing (and so loading) the backend
    traces without a graph break (an eager call before would hide one), also when the C++ extension is
    missing; the fallback's warning then comes with the first eager call (dynamo cannot trace warnings)."""
    import subprocess
    import sys

    if extension == "built" and not fastpref.backends()["cpp"]:
        pytest.skip("the C++ extension is not built here")
    out = subprocess.run([sys.executable, "-c", _COMPILED_FIRST, extension], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "compiled first" in out.stdout, out.stderr[-3000:]
    warned = "the 'cpp' backend is not avail" in out.stdout
    assert warned == (extension == "unbuilt"), out.stdout


def test_dynamic_shapes_compile_without_a_break():
    """dynamic=True made the option checks' floats symbolic: math.isfinite broke the graph (fullgraph failed)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(30, 6, generator=g, requires_grad=True)

    def loss(hidden, labels):
        return fastpref.token_stats(hidden, weight, labels, entropy=True, logit_scale=0.5).logp.sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (10, 17):
        hidden, labels = torch.randn(n, 6, generator=g), torch.randint(0, 30, (n,), generator=g)
        assert torch.allclose(compiled(hidden, labels), loss(hidden, labels), atol=1e-5)

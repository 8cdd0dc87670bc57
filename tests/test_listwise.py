"""Listwise losses (PRO, MPPO x8, LiPO-lambda, List-MLE / DPO-Plackett-Luce) and the "groups" layout.

Expected values are computed here with explicit Python loops over the formulas (docs/losses.md,
sections ``pro``, ``mppo_*``, ``lipo_lambda``, ``dpo_plackett_luce``), never by calling the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastpref
from oracle import assert_close, leaves, logsigmoid, make_batch, pack, sequence_oracle, softplus

# Two prompts: 4 responses, and 3 responses (+1 padding column); scores with a tie in the second list.
LOGPS = [[-1.3, -0.4, -2.2, -0.9], [-0.7, -1.6, -0.2, 0.0]]
REF = [[-1.0, -0.8, -1.5, -1.1], [-0.9, -1.2, -0.6, 0.0]]
SCORES = [[0.2, 0.9, 0.5, 0.1], [0.6, 0.6, 0.3, 0.0]]
SIZES = [4, 3]


def _tensors(dtype=torch.float64):
    logps = torch.tensor(LOGPS, dtype=dtype, requires_grad=True)
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    return logps, torch.tensor(REF, dtype=dtype), torch.tensor(SCORES, dtype=dtype), mask


def _order(b: int) -> list[int]:
    """Indices of list b, best first (stable: ties keep the given order)."""
    return sorted(range(SIZES[b]), key=lambda i: -SCORES[b][i])


# ---------------------------------------------------------------- hand-computed values


def test_pro_hand_computed():
    mean_logps, _, scores, mask = _tensors()
    sums = mean_logps * 5  # as if every response had 5 tokens
    loss, rewards = fastpref.pro_loss(mean_logps, scores * 10, sums, mask=mask, sft_weight=0.05, reduction="none")
    for b in range(2):
        o = _order(b)
        s = [LOGPS[b][i] for i in o]
        r = [10 * SCORES[b][i] for i in o]
        n = len(o)
        expected = 0.0
        for k in range(n - 1):
            temps = {j: r[k] - r[j] for j in range(k + 1, n)}
            t_kk = max(temps.values())
            inner = 1e-10 + math.exp(s[k] * t_kk) + sum(math.exp(s[j] * t) for j, t in temps.items())
            expected += math.log(inner) - s[k] * t_kk
        expected += 0.05 * (n - 1) ** 2 * -(5 * s[0])
        assert_close(loss[b], expected)
    assert_close(rewards, torch.tensor(LOGPS) * mask)
    loss.sum().backward()
    assert mean_logps.grad[1, 3] == 0  # padding gets no gradient


def test_list_mle_and_dpo_plackett_luce_hand_computed():
    logps, ref, scores, mask = _tensors()
    beta = 0.3
    loss, rewards = fastpref.dpo_plackett_luce_loss(logps, ref, scores, mask=mask, beta=beta, reduction="none")
    mle, _ = fastpref.list_mle_loss(beta * (logps - ref), scores, mask=mask, reduction="none")
    for b in range(2):
        s = [beta * (LOGPS[b][i] - REF[b][i]) for i in _order(b)]
        expected = -sum(s[i] - math.log(sum(math.exp(x) for x in s[i:])) for i in range(len(s)))
        assert_close(loss[b], expected)
        assert_close(mle[b], expected)
    assert_close(rewards, beta * (torch.tensor(LOGPS) - torch.tensor(REF)) * mask)


def test_lipo_lambda_hand_computed():
    logps, ref, scores, mask = _tensors()
    beta = 0.5
    loss, _ = fastpref.lipo_lambda_loss(logps, ref, scores, mask=mask, beta=beta, reduction="none")
    total, pairs, per_list = 0.0, 0, []
    for b in range(2):
        k = SIZES[b]
        s = [beta * (LOGPS[b][i] - REF[b][i]) for i in range(k)]
        by_score = sorted(range(k), key=lambda i: -s[i])
        rank = {i: by_score.index(i) + 1 for i in range(k)}
        list_sum = 0.0
        for i in range(k):
            for j in range(k):
                if SCORES[b][i] > SCORES[b][j]:
                    gain = abs((2 ** SCORES[b][i] - 1) - (2 ** SCORES[b][j] - 1))
                    disc = abs(1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j]))
                    list_sum += k * gain * disc * softplus(-(s[i] - s[j]))
                    pairs += 1
        per_list.append(list_sum)
        total += list_sum
    assert_close(loss.mean(), total / pairs)
    assert_close(loss, [x * 2 / pairs for x in per_list])
    mean, _ = fastpref.lipo_lambda_loss(logps, ref, scores, mask=mask, beta=beta)
    assert_close(mean, total / pairs)


def _mppo_expected(name: str, b: int, negative: int | None = None) -> float:
    o = _order(b)
    p = [math.exp(LOGPS[b][i]) for i in o]
    s = [SCORES[b][i] for i in o]
    n = len(o)
    if name == "point_ce":
        terms = []
        for i in range(n):
            a = math.log(p[i])
            terms.append(-(s[i] * a + (1 - s[i]) * math.log(1 - p[i])))
        return sum(terms) / n
    if name == "point_mse":
        return sum((s[i] - p[i]) ** 2 for i in range(n)) / n
    if name == "pair_single":
        return -logsigmoid(p[0] - p[negative])
    if name == "pair_mns":
        return -sum(logsigmoid(p[0] - p[i]) for i in range(1, n))
    if name == "pair_mnm":
        return -logsigmoid((n - 1) * p[0] - sum(p[1:]))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if s[i] > s[j]]
    if name == "pair_mcs":
        return -sum(logsigmoid(p[i] - p[j]) for i, j in pairs)
    if name == "pair_mcm":
        return -logsigmoid(sum(p[i] - p[j] for i, j in pairs))
    if name == "list_mle":
        return -sum(p[i] - math.log(sum(math.exp(x) for x in p[i:])) for i in range(n))
    raise AssertionError(name)


MPPO = ["point_ce", "point_mse", "pair_single", "pair_mns", "pair_mnm", "pair_mcs", "pair_mcm", "list_mle"]


@pytest.mark.parametrize("name", MPPO)
def test_mppo_hand_computed(name):
    logps, _, scores, mask = _tensors()
    fn = getattr(fastpref, f"mppo_{name}_loss")
    kwargs = {"negative": "worst"} if name == "pair_single" else {}
    loss, rewards = fn(logps, scores, mask=mask, reduction="none", **kwargs)
    for b in range(2):
        assert_close(loss[b], _mppo_expected(name, b, negative=SIZES[b] - 1))
    assert_close(rewards, torch.tensor(LOGPS).exp() * mask)
    loss.sum().backward()
    assert torch.isfinite(logps.grad).all() and logps.grad[1, 3] == 0


def test_mppo_pair_single_random_negative_is_seeded_and_valid():
    logps, _, scores, mask = _tensors()
    possible = [{_mppo_expected("pair_single", b, j) for j in range(1, SIZES[b])} for b in range(2)]
    draws = []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        loss, _ = fastpref.mppo_pair_single_loss(logps, scores, mask=mask, generator=g, reduction="none")
        for b in range(2):
            assert any(abs(loss[b].item() - v) < 1e-9 for v in possible[b])
        draws.append(loss.tolist())
    again, _ = fastpref.mppo_pair_single_loss(logps, scores, mask=mask, generator=torch.Generator().manual_seed(5),
                                              reduction="none")
    assert again.tolist() == draws[5]
    assert len({tuple(d) for d in draws}) > 1  # the negative does change with the seed


# ---------------------------------------------------------------- consistency


def _pair(seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, generator=g, dtype=torch.float64) - 3 for _ in range(4)]


def test_dpo_plackett_luce_k2_is_dpo():
    pc, pr, rc, rr = _pair()
    expected, _, _ = fastpref.dpo_loss(pc, pr, rc, rr, beta=0.2, reduction="none")
    got, _ = fastpref.dpo_plackett_luce_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), beta=0.2,
                                             reduction="none")
    assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_lipo_k2_binary_labels_is_lambda_times_dpo():
    pc, pr, rc, rr = _pair()
    expected, _, _ = fastpref.dpo_loss(pc, pr, rc, rr, beta=0.05, reduction="none")
    labels = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(5, 2)
    got, _ = fastpref.lipo_lambda_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), labels, reduction="none")
    lam = 2 * (1 - 1 / math.log2(3))
    assert_close(got, lam * expected, rtol=1e-12, atol=1e-12)


def test_pro_k2_is_reference_free_dpo_with_reward_gap_as_beta():
    pc, pr, _, _ = _pair()
    expected, _, _ = fastpref.dpo_loss(pc / 10, pr / 10, beta=1.5, reduction="none")
    rewards = torch.tensor([[2.0, 0.5]], dtype=torch.float64).expand(5, 2)
    got, _ = fastpref.pro_loss(torch.stack([pc, pr], 1) / 10, rewards, sft_weight=0.0, reduction="none")
    assert_close(got, expected, rtol=1e-8, atol=1e-8)  # PRO's eps = 1e-10 inside the log


def test_mppo_pair_variants_agree_for_one_negative():
    pc, pr, _, _ = _pair()
    logps = torch.stack([pc, pr], 1) / 20
    single, _ = fastpref.mppo_pair_single_loss(logps, reduction="none")
    expected = -torch.nn.functional.logsigmoid(logps[:, 0].exp() - logps[:, 1].exp())
    assert_close(single, expected, rtol=1e-12, atol=1e-12)
    for name in ("pair_mns", "pair_mnm", "pair_mcs", "pair_mcm"):
        got, _ = getattr(fastpref, f"mppo_{name}_loss")(logps, reduction="none")
        assert_close(got, single, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["pro", "dpo_plackett_luce", "lipo_lambda"] + [f"mppo_{m}" for m in MPPO])
def test_scores_sort_the_lists_and_padding_is_inert(name):
    """Shuffled columns with scores == the same list best first; a padded list == the list alone."""
    logps, ref, scores, mask = _tensors()
    fn = getattr(fastpref, f"{name}_loss")
    kwargs = {"negative": "worst"} if name == "mppo_pair_single" else {}
    scores = scores * 10 if name == "pro" else scores

    def run(lp, rf, sc, mk):
        args = (lp, rf, sc) if name in ("dpo_plackett_luce", "lipo_lambda") else (lp, sc)
        args = (lp, sc, lp * 5) if name == "pro" else args
        return fn(*args, mask=mk, reduction="none", **kwargs)[0]

    full = run(logps, ref, scores, mask)
    alone = run(logps[1:, :3], ref[1:, :3], scores[1:, :3], None)
    if name != "lipo_lambda":  # LiPO's per-list values are scaled by the batch's pair count
        assert_close(full[1], alone[0], rtol=1e-12, atol=1e-12)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = run(logps[:, perm], ref[:, perm], scores[:, perm], mask[:, perm])
    assert_close(shuffled, full, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- fused front door, "groups" layout


def _front_door_expected(name, o, sizes, scores, beta):
    """The same loss built from the oracle's per-row sums, padded to [B, K] here."""
    k = max(sizes)
    index, mask = [], []
    start = 0
    for n in sizes:
        index.append([start + min(i, n - 1) for i in range(k)])
        mask.append([i < n for i in range(k)])
        start += n
    index, mask = torch.tensor(index), torch.tensor(mask)

    def pad(x):
        return x[index]

    sc = pad(scores.double())
    if name == "pro":
        return fastpref.pro_loss(pad(o["mean_logp"]), sc, pad(o["sum_logp"]), mask=mask)[0]
    if name == "lipo_lambda":
        return fastpref.lipo_lambda_loss(pad(o["sum_logp"]), pad(o["ref_sum_logp"]), sc, mask=mask, beta=beta)[0]
    if name == "dpo_plackett_luce":
        return fastpref.dpo_plackett_luce_loss(pad(o["sum_logp"]), pad(o["ref_sum_logp"]), sc, mask=mask, beta=beta)[0]
    return getattr(fastpref, f"{name}_loss")(pad(o["mean_logp"]), sc, mask=mask)[0]


@pytest.mark.parametrize("name", ["pro", "lipo_lambda", "dpo_plackett_luce", "mppo_pair_mnm", "mppo_point_ce"])
@pytest.mark.parametrize("packed", [False, True])
def test_front_door_groups_matches_oracle(name, packed):
    sizes = [4, 2, 3]
    hidden, weight, labels, ref_hidden = make_batch(sum(sizes), seed=1)
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.2, 0.7, 0.4, 0.4, 0.8])
    uses_ref = name in ("lipo_lambda", "dpo_plackett_luce")
    hparams = {"beta": 0.5} if uses_ref else {}
    if packed:
        h, y, r, cu = pack(hidden, labels, ref_hidden)
        out = fastpref.preference_loss(h, weight, y, loss=name, ref_hidden=r if uses_ref else None, cu_seqlens=cu,
                                       group_sizes=sizes, scores=scores, backend="torch", **hparams)
    else:
        out = fastpref.preference_loss(hidden, weight, labels, loss=name, ref_hidden=ref_hidden if uses_ref else None,
                                       group_sizes=torch.tensor(sizes), scores=scores, backend="torch", **hparams)
    h64, w64 = leaves(hidden, weight)
    o = sequence_oracle(h64, w64, labels, ref_hidden)
    expected = _front_door_expected(name, o, sizes, scores, hparams.get("beta"))
    assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    expected.backward()
    assert_close(weight.grad, w64.grad, rtol=1e-4, atol=1e-6)
    assert_close(hidden.grad, h64.grad, rtol=1e-4, atol=1e-6)


def test_front_door_group_metrics():
    sizes = [3, 2]
    hidden, weight, labels, _ = make_batch(5, seed=2)
    scores = torch.tensor([0.2, 0.9, 0.5, 0.3, 0.3])  # best of prompt 0 is row 1; prompt 1 is a tie
    out = fastpref.preference_loss(hidden, weight, labels, loss="mppo_pair_mcs", group_sizes=sizes, scores=scores,
                                   backend="torch")
    o = sequence_oracle(*leaves(hidden, weight), labels)
    p = o["mean_logp"].exp()
    lp = o["sum_logp"]
    assert_close(out.metrics["rewards/chosen"], (p[1] + p[3]) / 2, rtol=1e-5)
    assert_close(out.metrics["rewards/rejected"], ((p[0] + p[2]) / 2 + p[4]) / 2, rtol=1e-5)
    assert_close(out.metrics["logps/chosen"], (lp[1] + lp[3]) / 2, rtol=1e-5)
    # ordered pairs with distinct scores: (1,2), (1,0), (2,0); the tied prompt has none
    correct = [p[1] > p[2], p[1] > p[0], p[2] > p[0]]
    assert_close(out.metrics["rewards/accuracies"], sum(float(c) for c in correct) / 3)
    assert_close(out.metrics["rewards/margins"], out.metrics["rewards/chosen"] - out.metrics["rewards/rejected"])


def test_front_door_pro_metrics_and_rank_order_without_scores():
    hidden, weight, labels, _ = make_batch(6, seed=3)
    out = fastpref.preference_loss(hidden, weight, labels, loss="mppo_list_mle", group_sizes=[3, 3], backend="torch")
    o = sequence_oracle(*leaves(hidden, weight), labels)
    p = o["mean_logp"].exp().view(2, 3)
    expected = sum(-sum(p[b, i] - torch.logsumexp(p[b, i:], 0) for i in range(3)) for b in range(2)) / 2
    assert_close(out.loss, expected, rtol=1e-5)
    scores = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 0.0])
    out = fastpref.preference_loss(hidden, weight, labels, loss="pro", group_sizes=[3, 3], scores=scores,
                                   backend="torch", sft_weight=0.0)
    assert set(out.metrics) >= {"rank_1_loss", "rank_2_loss", "sft_loss", "rewards/accuracies"}
    assert_close(out.loss, out.metrics["rank_1_loss"] + out.metrics["rank_2_loss"], rtol=1e-6)


def test_precomputed_ref_logps_per_sequence():
    """``ref_logps [S]`` (one per sequence) == the reference head, for lists and for pairs."""
    hidden, weight, labels, ref_hidden = make_batch(5, seed=4)
    ref = fastpref.sequence_logps(ref_hidden, weight.detach(), labels, backend="torch").sum_logp
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.2])
    kwargs = dict(loss="lipo_lambda", group_sizes=[3, 2], scores=scores, backend="torch")
    head = fastpref.preference_loss(hidden, weight, labels, ref_hidden=ref_hidden, **kwargs)
    pre = fastpref.preference_loss(hidden, weight, labels, ref_logps=ref, **kwargs)
    assert_close(pre.loss, head.loss, rtol=1e-6)
    split = fastpref.preference_loss(hidden[:4], weight, labels[:4], ref_chosen_logps=ref[:2],
                                     ref_rejected_logps=ref[2:4], backend="torch")
    joint = fastpref.preference_loss(hidden[:4], weight, labels[:4], ref_logps=ref[:4], backend="torch")
    assert_close(joint.loss, split.loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="`ref_logps`"):
        fastpref.preference_loss(hidden[:4], weight, labels[:4], ref_logps=ref[:3], backend="torch")
    with pytest.raises(ValueError, match="`ref_logps`"):
        fastpref.preference_loss(hidden, weight, labels, **kwargs)  # neither precomputed nor a reference head


# ---------------------------------------------------------------- errors


def _front(loss="pro", rows=5, **kwargs):
    hidden, weight, labels, ref_hidden = make_batch(rows)
    ref = {} if fastpref.get_loss(loss).reference == "none" else {"ref_hidden": ref_hidden}
    return fastpref.preference_loss(hidden, weight, labels, loss=loss, backend="torch", **ref, **kwargs)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(group_sizes=[4, 1], scores=torch.rand(5)), "group_sizes"),         # K = 1
    (dict(group_sizes=[2, 2], scores=torch.rand(5)), "group_sizes"),         # does not sum to the rows
    (dict(group_sizes=torch.tensor([[5]]), scores=torch.rand(5)), "group_sizes"),
    (dict(scores=torch.rand(5)), "group_sizes"),                             # missing
    (dict(group_sizes=[3, 2], scores=torch.rand(4)), "scores"),              # wrong length
    (dict(group_sizes=[3, 2], scores=torch.tensor([0.1, float("nan"), 0.2, 0.3, 0.4])), "scores"),
    (dict(group_sizes=[3, 2]), "scores"),                                    # PRO needs scores
    (dict(group_sizes=[3, 2], scores=torch.rand(5), ref_chosen_logps=torch.zeros(2)), "ref_chosen_logps"),
    (dict(group_sizes=[3, 2], scores=torch.rand(5), use_weighting=True), "use_weighting"),
])
def test_group_errors_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        _front(**kwargs)


def test_pair_loss_rejects_group_arguments():
    with pytest.raises(ValueError, match="`group_sizes`"):
        _front("dpo", rows=4, group_sizes=[2, 2])


def test_list_functions_validate_inputs():
    logps, ref, scores, mask = _tensors()
    with pytest.raises(ValueError, match="`policy_logps`"):
        fastpref.mppo_pair_mnm_loss(logps[:, :1])
    with pytest.raises(ValueError, match="`mask`"):
        fastpref.mppo_pair_mnm_loss(logps, mask=torch.tensor([[True, True, False, False], [True, False, False, False]]))
    with pytest.raises(ValueError, match="`scores`"):
        fastpref.lipo_lambda_loss(logps, ref, None)
    with pytest.raises(ValueError, match="`scores`"):
        fastpref.mppo_point_mse_loss(logps, scores[:, :3])
    with pytest.raises(ValueError, match="`negative`"):
        fastpref.mppo_pair_single_loss(logps, negative="best")
    with pytest.raises(ValueError, match="`policy_sum_logps`"):
        fastpref.pro_loss(logps, scores)

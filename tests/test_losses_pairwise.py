"""Level 3, pairwise losses: each one against its formula (docs/losses.md) written out with scalar math."""

import math

import pytest
import torch

import fastpref

# Four pairs of hand-picked per-pair log-probs (policy chosen / rejected, reference chosen / rejected).
PC = [-12.0, -30.5, -8.25, -40.0]
PR = [-15.0, -29.0, -20.0, -41.5]
RC = [-13.0, -31.0, -9.0, -39.0]
RR = [-14.0, -30.0, -18.0, -42.0]
NW = [6, 15, 4, 20]  # completion tokens
NL = [7, 12, 10, 21]


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def pairs():
    return zip(PC, PR, RC, RR, NW, NL)


def expected_dpo(loss_type, beta=0.1, eps=0.0, tau=0.05):
    """TRL's per-pair formulas (docs/losses.md, section ``dpo``), one pair at a time."""
    out = []
    for pc, pr, rc, rr, nw, nl in pairs():
        cw, cl = pc - rc, pr - rr
        u = beta * (cw - cl)
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * logsig(u) - eps * logsig(-u))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - u))
        elif loss_type == "ipo":
            out.append((cw / nw - cl / nl - 1 / (2 * beta)) ** 2)
        elif loss_type == "sigmoid_norm":
            out.append(-logsig(beta * (cw / nw - cl / nl)))
        elif loss_type == "exo_pair":
            out.append(sig(u) * (logsig(u) - math.log(1 - eps)) + sig(-u) * (logsig(-u) - math.log(eps)))
        elif loss_type == "nca_pair":
            out.append(-logsig(beta * cw) - 0.5 * logsig(-beta * cw) - 0.5 * logsig(-beta * cl))
        elif loss_type == "robust":
            out.append((-(1 - eps) * logsig(u) + eps * logsig(-u)) / (1 - 2 * eps))
        elif loss_type == "bco_pair":
            out.append(-logsig(beta * cw) - logsig(-beta * cl))
        elif loss_type == "sppo_hard":
            out.append((cw - 0.5 / beta) ** 2 + (cl + 0.5 / beta) ** 2)
        elif loss_type == "apo_zero":
            out.append(1 - sig(beta * cw) + sig(beta * cl))
        elif loss_type == "apo_down":
            out.append(sig(beta * cw) + 1 - sig(beta * (cw - cl)))
        elif loss_type == "discopop":
            m = sig(u / tau)
            out.append(-logsig(u) * (1 - m) + math.exp(-u) * m)
        elif loss_type == "sft":
            out.append(-sum(PC) / sum(NW))
    return out


SIMPLE_TYPES = ["sigmoid", "hinge", "ipo", "sigmoid_norm", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                "apo_down", "discopop", "sft"]


@pytest.mark.parametrize("loss_type", SIMPLE_TYPES)
def test_dpo_loss_types(loss_type):
    losses, cr, rr = fastpref.dpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type=loss_type, beta=0.1,
                                       chosen_num_tokens=torch.tensor(NW), rejected_num_tokens=torch.tensor(NL),
                                       reduction="none")
    assert torch.allclose(losses, t(expected_dpo(loss_type)), rtol=1e-12, atol=1e-12)
    assert torch.allclose(cr, 0.1 * (t(PC) - t(RC))) and torch.allclose(rr, 0.1 * (t(PR) - t(RR)))
    assert not cr.requires_grad


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.1), ("exo_pair", 1e-3), ("robust", 0.2)])
def test_dpo_label_smoothing(loss_type, eps):
    losses, _, _ = fastpref.dpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type=loss_type, label_smoothing=eps,
                                     reduction="none")
    assert torch.allclose(losses, t(expected_dpo(loss_type, eps=eps)), rtol=1e-12)


def test_ipo_without_token_counts_takes_inputs_as_means():
    mean = [p / n for p, n in zip(PC, NW)], [p / n for p, n in zip(PR, NL)]
    rmean = [p / n for p, n in zip(RC, NW)], [p / n for p, n in zip(RR, NL)]
    losses, _, _ = fastpref.dpo_loss(t(mean[0]), t(mean[1]), t(rmean[0]), t(rmean[1]), loss_type="ipo",
                                     reduction="none")
    assert torch.allclose(losses, t(expected_dpo("ipo")), rtol=1e-12)


def test_aot_sorts_over_the_batch():
    beta = 0.1
    a = sorted(pc - pr for pc, pr in zip(PC, PR))
    b = sorted(rc - rr for rc, rr in zip(RC, RR))
    want = [-logsig(beta * (x - y)) for x, y in zip(a, b)]
    losses, _, _ = fastpref.dpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type="aot", reduction="none")
    assert torch.allclose(losses, t(want), rtol=1e-12)
    a = sorted(pc - rc for pc, rc in zip(PC, RC))
    b = sorted(pr - rr for pr, rr in zip(PR, RR))
    want = [-logsig(beta * (x - y)) for x, y in zip(a, b)]
    losses, _, _ = fastpref.dpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type="aot_unpaired", reduction="none")
    assert torch.allclose(losses, t(want), rtol=1e-12)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_scores(kind):
    alpha = 0.3

    def fprime(lr):
        if kind == "forward_kl":
            return 1 - math.exp(-lr)
        if kind == "js_divergence":
            return math.log(2 * math.exp(lr) / (math.exp(lr) + 1))
        return (math.exp((alpha - 1) * lr) - 1) / (alpha - 1)

    want = [-logsig(0.1 * (fprime(pc - rc) - fprime(pr - rr))) for pc, pr, rc, rr, _, _ in pairs()]
    coef = {"f_alpha_divergence_coef": alpha} if kind == "alpha_divergence" else {}  # refused by the others
    losses, cr, _ = fastpref.dpo_loss(t(PC), t(PR), t(RC), t(RR), f_divergence_type=kind, reduction="none", **coef)
    assert torch.allclose(losses, t(want), rtol=1e-10)
    assert torch.allclose(cr, 0.1 * (t(PC) - t(RC)))  # rewards use raw log-ratios


def test_loss_type_list_sums_weighted_means():
    mean_loss, _, _ = fastpref.dpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type=["sigmoid", "hinge"],
                                        loss_weights=[1.0, 0.5])
    want = sum(expected_dpo("sigmoid")) / 4 + 0.5 * sum(expected_dpo("hinge")) / 4
    assert abs(mean_loss.item() - want) < 1e-12


def test_reductions_and_reference_free():
    none, _, _ = fastpref.dpo_loss(t(PC), t(PR), reduction="none")
    want = [-logsig(0.1 * (pc - pr)) for pc, pr in zip(PC, PR)]
    assert torch.allclose(none, t(want))
    assert torch.allclose(fastpref.dpo_loss(t(PC), t(PR), reduction="sum")[0], t(want).sum())
    assert torch.allclose(fastpref.dpo_loss(t(PC), t(PR))[0], t(want).mean())


def test_dpop():
    beta, lam = 0.3, 50.0
    want = [-logsig(beta * ((pc - rc) - (pr - rr) - lam * max(0.0, rc - pc))) for pc, pr, rc, rr, _, _ in pairs()]
    losses, _, _ = fastpref.dpop_loss(t(PC), t(PR), t(RC), t(RR), reduction="none")
    assert torch.allclose(losses, t(want), rtol=1e-12)


def test_mmpo_soft_labels_and_bradley_terry():
    beta = 0.01
    p = [0.9, 0.6, 1.0, 0.3]
    want = []
    for (pc, pr, rc, rr, _, _), pi in zip(pairs(), p):
        u = beta * ((pc - rc) - (pr - rr))
        want.append(-pi * logsig(u) - (1 - pi) * logsig(-u))
    losses, _, _ = fastpref.mmpo_loss(t(PC), t(PR), t(RC), t(RR), soft_labels=t(p), reduction="none")
    assert torch.allclose(losses, t(want), rtol=1e-12)
    sw, sl = [8.0, 5.0, 9.0, 2.0], [6.0, 5.0, 1.0, 4.0]
    p_bt = t([sig(0.7 * (a - b)) for a, b in zip(sw, sl)])
    bt, _, _ = fastpref.mmpo_loss(t(PC), t(PR), t(RC), t(RR), chosen_scores=t(sw), rejected_scores=t(sl),
                                  bt_beta=0.7, reduction="none")
    soft, _, _ = fastpref.mmpo_loss(t(PC), t(PR), t(RC), t(RR), soft_labels=p_bt, reduction="none")
    assert torch.allclose(bt, soft)
    plain, _, _ = fastpref.mmpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, reduction="none")
    assert torch.allclose(plain, fastpref.dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, reduction="none")[0])


def test_todo_ties():
    beta, alpha = 0.01, 0.5
    ties = [0, 1, 0, 1]
    want = []
    for (pc, pr, rc, rr, _, _), tie in zip(pairs(), ties):
        u = beta * ((pc - rc) - (pr - rr))
        if tie:
            want.append(-math.log((math.exp(2 * alpha) - 1) * sig(u - alpha) * sig(-u - alpha)))
        else:
            want.append(-logsig(u - alpha))
    losses, _, _ = fastpref.todo_loss(t(PC), t(PR), t(RC), t(RR), ties=torch.tensor(ties), reduction="none")
    assert torch.allclose(losses, t(want), rtol=1e-10)


def test_simpo():
    beta, ratio = 2.0, 0.25
    am = [p / n for p, n in zip(PC, NW)]
    al = [p / n for p, n in zip(PR, NL)]
    want = [-logsig(beta * (a - b) - beta * ratio) for a, b in zip(am, al)]
    losses, cr, _ = fastpref.simpo_loss(t(am), t(al), reduction="none")
    assert torch.allclose(losses, t(want), rtol=1e-12)
    assert torch.allclose(cr, beta * t(am))
    hinge, _, _ = fastpref.simpo_loss(t(am), t(al), loss_type="hinge", reduction="none")
    assert torch.allclose(hinge, t([max(0.0, 1 - beta * (a - b - ratio)) for a, b in zip(am, al)]))


def test_cpo_variants():
    beta, nll = 0.1, torch.tensor(2.5, dtype=torch.float64)
    want = [-logsig(beta * (pc - pr)) + 1.0 * 2.5 for pc, pr in zip(PC, PR)]
    losses, _, _ = fastpref.cpo_loss(t(PC), t(PR), policy_nll_loss=nll, reduction="none")
    assert torch.allclose(losses, t(want), rtol=1e-12)
    # AlphaPO reward r = (1 - p^-alpha) / alpha with p = exp(logp), on mean log-probs
    am, al = t([-1.2, -0.4]), t([-1.5, -0.3])
    a = 0.25
    rw = [(1 - math.exp(x) ** -a) / a for x in am.tolist()]
    rl = [(1 - math.exp(x) ** -a) / a for x in al.tolist()]
    want = [-logsig(beta * (x - y) - 0.5) for x, y in zip(rw, rl)]
    losses, cr, _ = fastpref.cpo_loss(am, al, loss_type="simpo", alpha=a, cpo_alpha=0.0, reduction="none")
    assert torch.allclose(losses, t(want), rtol=1e-10)
    assert torch.allclose(cr, beta * t(rw))


def test_orpo():
    beta, nll = 0.1, torch.tensor(1.75, dtype=torch.float64)
    am, al = [-0.5, -1.2, -0.01, -3.0], [-0.9, -0.8, -0.02, -2.0]
    want = []
    for a, b in zip(am, al):
        log_odds = (a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b)))
        want.append(-beta * logsig(log_odds) + 1.75)
    losses, _, _ = fastpref.orpo_loss(t(am), t(al), policy_nll_loss=nll, reduction="none")
    assert torch.allclose(losses, t(want), rtol=1e-10)


def test_orpo_gradient_is_finite_near_certainty():
    am = torch.tensor([-1e-9, -0.7, -0.69], dtype=torch.float64, requires_grad=True)
    al = torch.tensor([-0.5, -0.6931471805599453, -2.0], dtype=torch.float64)
    loss, _, _ = fastpref.orpo_loss(am, al, nll_weight=0.0)
    (g,) = torch.autograd.grad(loss, [am])
    assert torch.isfinite(g).all()


def test_dpo_gradient_matches_formula():
    pc, pr = t(PC).requires_grad_(), t(PR).requires_grad_()
    loss, _, _ = fastpref.dpo_loss(pc, pr, t(RC), t(RR))
    loss.backward()
    # d/d pc of mean -logsig(beta (pc - rc - pr + rr)) = -beta sigma(-u) / B
    want = [-0.1 * sig(-0.1 * ((a - c) - (b - d))) / 4 for a, b, c, d, _, _ in pairs()]
    assert torch.allclose(pc.grad, t(want), rtol=1e-12)

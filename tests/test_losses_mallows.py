"""MallowsPO family (docs/losses.md, sections ``mallows_*``): formulas written out with scalar math."""

import math

import pytest
import torch

import fastpref

AW = [-0.8, -1.5, -0.2, -2.4]  # mean log-probs (MallowsPO's default length normalisation)
AL = [-1.1, -1.2, -0.9, -2.0]
RW = [-0.9, -1.4, -0.3, -2.2]
RL = [-1.0, -1.3, -0.7, -2.1]
PSI = [0.5, 1.0, 2.0, 0.8]


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def margin(i, gamma=0.0, mix=None, ref=True):
    h = AW[i] - AL[i]
    if mix is None:
        return h - (RW[i] - RL[i] if ref else 0.0) - gamma
    return h - mix * (RW[i] - RL[i]) - (1 - mix) * gamma


def test_psi_one_is_exactly_dpo():
    for beta in (0.1, 10.0):
        mallows, cr, rr = fastpref.mallows_dpo_loss(t(AW), t(AL), t(RW), t(RL), neg_log_dispersion=1.0, beta=beta,
                                                    reduction="none")
        dpo, dcr, drr = fastpref.dpo_loss(t(AW), t(AL), t(RW), t(RL), beta=beta, reduction="none")
        assert torch.equal(mallows, dpo) and torch.equal(cr, dcr) and torch.equal(rr, drr)


@pytest.mark.parametrize("gamma,mix,eps", [(0.0, None, 0.0), (0.1, 0.25, 0.0), (0.3, None, 0.1)])
def test_mallows_dpo_formula(gamma, mix, eps):
    beta = 10.0
    want = []
    for i in range(4):
        u = beta * margin(i, gamma, mix) * PSI[i]
        want.append(-(1 - eps) * logsig(u) - eps * logsig(-u))
    losses, cr, _ = fastpref.mallows_dpo_loss(t(AW), t(AL), t(RW), t(RL), neg_log_dispersion=t(PSI),
                                              home_advantage=gamma, mixing_alpha=mix, label_smoothing=eps,
                                              reduction="none")
    assert torch.allclose(losses, t(want), rtol=1e-12)
    assert torch.allclose(cr, beta * (t(AW) - t(RW)))  # official metric: no psi


def test_mallows_simpo_is_reference_free_and_adds_sft():
    beta, gamma = 10.0, 0.05
    want = [-logsig(beta * PSI[i] * margin(i, gamma, ref=False)) - 0.5 * AW[i] for i in range(4)]
    losses, cr, _ = fastpref.mallows_dpo_loss(t(AW), t(AL), neg_log_dispersion=t(PSI), home_advantage=gamma,
                                              add_sft_loss=True, reduction="none")
    assert torch.allclose(losses, t(want), rtol=1e-12)
    assert torch.allclose(cr, beta * t(AW))


@pytest.mark.parametrize("form", ["mallowspo", "rainbowpo", "rainbowpo_modified"])
def test_mallows_ipo_forms(form):
    beta = 0.5
    want = []
    for i in range(4):
        h, psi = margin(i), PSI[i]
        if form == "mallowspo":
            want.append((psi * h - 1 / (2 * beta)) ** 2)
        elif form == "rainbowpo":
            want.append((beta * psi * h - 0.5) ** 2)
        else:
            want.append(max(0.0, 0.5 - beta * psi * h) ** 2)
    losses, _, _ = fastpref.mallows_ipo_loss(t(AW), t(AL), t(RW), t(RL), neg_log_dispersion=t(PSI), beta=beta,
                                             form=form, reduction="none")
    assert torch.allclose(losses, t(want), rtol=1e-12)


def test_mallows_ipo_psi_one_is_trl_ipo():
    beta = 0.1
    ipo, _, _ = fastpref.dpo_loss(t(AW), t(AL), t(RW), t(RL), beta=beta, loss_type="ipo", reduction="none")
    mallows, _, _ = fastpref.mallows_ipo_loss(t(AW), t(AL), t(RW), t(RL), neg_log_dispersion=1.0, beta=beta,
                                              reduction="none")
    assert torch.allclose(ipo, mallows, rtol=1e-14)


@pytest.mark.parametrize("dispersion", ["mean", "paper_sum"])
def test_neg_log_dispersion(dispersion):
    vocab, c = 32000, 0.29
    hw, hl = [0.3, 1.2, 2.0], [0.5, 0.9, 1.1]  # mean entropies (nats), or sums for paper_sum
    if dispersion == "paper_sum":
        hw, hl = [3.0, 12.0, 8.0], [5.0, 7.0, 11.0]  # sums below log V each: psi > 0
    want = [-c * math.log((a + b) / (2 * math.log(vocab))) for a, b in zip(hw, hl)]
    psi = fastpref.neg_log_dispersion(t(hw).requires_grad_(), t(hl), vocab_size=vocab, dispersion=dispersion)
    assert torch.allclose(psi.double(), t(want), rtol=1e-6) and not psi.requires_grad


def test_calibrate_dispersion_c_makes_mean_psi_one():
    g = torch.Generator().manual_seed(0)
    hw, hl = torch.rand(50, generator=g) * 2 + 0.1, torch.rand(50, generator=g) * 2 + 0.1
    c = fastpref.calibrate_dispersion_c(hw, hl, vocab_size=128256)
    assert abs(fastpref.neg_log_dispersion(hw, hl, vocab_size=128256, c=c).mean().item() - 1) < 1e-5
    batches = [(hw[:20], hl[:20]), (hw[20:], hl[20:])]
    assert abs(fastpref.calibrate_dispersion_c(batches, vocab_size=128256) - c) < 1e-9


def kendall_g(d, phi):
    """Exact Mallows-phi pairwise marginal at an integer rank gap d >= 1 (docs/losses.md, ``mallows_phi_dpo``)."""
    return (d + 1) / (1 - phi ** (d + 1)) - d / (1 - phi**d)


def brute_force_pairwise(n, phi, i, j):
    """P(item i ranked above item j) under Mallows-phi (Kendall) with central ranking 0 < 1 < ... < n-1."""
    import itertools

    num = den = 0.0
    for perm in itertools.permutations(range(n)):
        pos = {item: k for k, item in enumerate(perm)}
        discordant = sum(1 for a in range(n) for b in range(a + 1, n) if pos[a] > pos[b])
        w = phi**discordant
        den += w
        num += w if pos[i] < pos[j] else 0.0
    return num / den


@pytest.mark.parametrize("phi", [0.3, 0.7])
def test_kendall_link_matches_brute_force_mallows(phi):
    psi = -math.log(phi)
    for d in (1, 2, 3):
        exact = brute_force_pairwise(5, phi, 0, d)
        assert abs(exact - kendall_g(d, phi)) < 1e-12
        log_g, log_1mg = fastpref.kendall_link(t([float(d), -float(d)]), psi)
        assert abs(math.exp(log_g[0].item()) - exact) < 1e-12
        assert abs(math.exp(log_g[1].item()) - (1 - exact)) < 1e-12
        assert abs(math.exp(log_1mg[0].item()) - (1 - exact)) < 1e-12


@pytest.mark.parametrize("phi", [0.05, 0.5, 0.99])
def test_kendall_link_is_smooth_odd_and_half_at_zero(phi):
    psi = -math.log(phi)
    s = torch.linspace(-4, 4, 801, dtype=torch.float64, requires_grad=True)
    log_g, _ = fastpref.kendall_link(s, psi)
    g = log_g.exp()
    (dg,) = torch.autograd.grad(g.sum(), [s])
    assert abs(g[400].item() - 0.5) < 1e-12  # s = 0
    assert torch.allclose(g + g.flip(0), torch.ones_like(g), atol=1e-12)  # g(-s) = 1 - g(s)
    assert torch.all(dg >= 0) and torch.isfinite(dg).all()  # monotone, no NaN gradient anywhere
    for edge in (-1.0, 1.0):  # C^1 at +-s0
        e = torch.tensor([edge - 1e-7, edge + 1e-7], dtype=torch.float64, requires_grad=True)
        val = fastpref.kendall_link(e, psi)[0].exp()
        (slope,) = torch.autograd.grad(val.sum(), [e])
        assert abs(val[1] - val[0]).item() < 1e-6 and abs(slope[1] - slope[0]).item() < 1e-5


def test_mallows_phi_links():
    beta = 2.0
    sig_loss, _, _ = fastpref.mallows_phi_dpo_loss(t(AW), t(AL), t(RW), t(RL), neg_log_dispersion=t(PSI), beta=beta,
                                                   link="sigmoid", reduction="none")
    theta, _, _ = fastpref.mallows_dpo_loss(t(AW), t(AL), t(RW), t(RL), neg_log_dispersion=t(PSI), beta=beta,
                                            reduction="none")
    assert torch.allclose(sig_loss, theta)
    kendall, _, _ = fastpref.mallows_phi_dpo_loss(t(AW), t(AL), t(RW), t(RL), neg_log_dispersion=t(PSI), beta=beta,
                                                  reduction="none")
    want = [-fastpref.kendall_link(t([beta * margin(i)]), PSI[i])[0].item() for i in range(4)]
    assert torch.allclose(kendall, t(want))
    # at an integer scaled margin the loss is exactly -log g_phi(d)
    pc = torch.tensor([1.5], dtype=torch.float64)
    loss, _, _ = fastpref.mallows_phi_dpo_loss(pc, torch.zeros(1, dtype=torch.float64), neg_log_dispersion=0.4,
                                               beta=2.0)
    assert abs(loss.item() + math.log(kendall_g(3, math.exp(-0.4)))) < 1e-12

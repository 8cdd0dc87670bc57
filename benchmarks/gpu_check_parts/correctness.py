"""Part correctness: the Triton backend against the fp64 oracle, in every dtype, mode and statistic."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import KEEP_ALL, Case, Config, fastpref, free_device_memory, reference_token_stats

FP32_TOL = 1e-5
HALF_STAT_BOUND = 2 * 2**-8  # times (max|z| + 1)
HALF_GRAD_TOL = 3e-2
STAT_NAMES = fastpref.TokenStats._fields if fastpref else ()
DIFFERENTIABLE = ("logp", "entropy", "kl")
ALL_STATS = dict(entropy=True, kl=True, ref_entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True)
SOFTCAP = dict(softcap=5.0, logit_scale=1.3, temperature=0.7)


def check(what: str, value: float, bound: float) -> dict:
    """One accuracy check: ``value <= bound`` (NaN fails)."""
    return {"what": what, "value": float(value), "bound": float(bound), "ok": bool(value <= bound)}


def checks_result(checks: list[dict], **extra) -> dict:
    worst = max(checks, key=lambda c: math.inf if not c["ok"] else c["value"] / c["bound"] if c["bound"] else 0)
    return {"status": "ok" if all(c["ok"] for c in checks) else "failed", "checks": checks,
            "worst": f"{worst['what']}: {worst['value']:.3g} (bound {worst['bound']:.3g})", **extra}


def random_head(n: int, seq: int, d: int, vocab: int, *, dtype: torch.dtype, device: str, bias: bool = False,
                ref: bool = False, seed: int = 0) -> dict:
    """hidden [n, seq, d], weight [V, d] (O(1)-O(10) logits), optional bias and a nearby reference head."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g)

    hidden = randn(n, seq, d)
    weight = randn(vocab, d) * (3 / d**0.5)
    head = {"hidden": hidden, "weight": weight}
    if bias:
        head["bias"] = randn(vocab) * 0.5
    if ref:
        head["ref_hidden"] = hidden + 0.3 * randn(n, seq, d)
        head["ref_weight"] = weight + (0.1 / d**0.5) * randn(vocab, d)
    return {k: v.to(dtype) for k, v in head.items()}


def random_labels(n: int, seq: int, vocab: int, *, device: str, prompt: int = 0, pad=(), seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed + 1)
    labels = torch.randint(0, vocab, (n, seq), device=device, generator=g)
    labels[:, :prompt] = -100
    for row, p in enumerate(pad):
        if p:
            labels[row, seq - p:] = -100
    return labels


def upstream(labels: torch.Tensor, names, seed: int = 3) -> dict:
    """Random fp64 upstream gradients for the differentiable statistics (zero where ignored)."""
    g = torch.Generator(device=labels.device).manual_seed(seed)
    valid = labels != -100
    return {k: torch.randn(labels.shape, device=labels.device, generator=g, dtype=torch.float64) * valid
            for k in names}


def _stat_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in ("logits_budget", "chunk_size", "backend")}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: a norm-wise relative error."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def fused(head: dict, labels: torch.Tensor, up: dict, *, frozen: bool = False, **options):
    """fastpref.token_stats on the Triton backend; flattened stats and the gradients of sum(up * stat)."""
    leaves = {k: v.detach().clone().requires_grad_(k == "hidden" or (not frozen and k in ("weight", "bias")))
              for k, v in head.items()}
    stats = fastpref.token_stats(labels=labels, backend="triton", **leaves, **options)
    loss = sum((getattr(stats, k).double() * g).sum() for k, g in up.items() if getattr(stats, k) is not None)
    names = [k for k, v in leaves.items() if v.requires_grad]
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))
    flat = {k: None if v is None else v.reshape(-1) for k, v in stats._asdict().items()}
    return flat, {k: v.reshape(-1, v.shape[-1]) if k == "hidden" else v for k, v in grads.items()}


def oracle(head: dict, labels: torch.Tensor, up: dict, *, frozen: bool = False, rows: torch.Tensor | None = None,
           block: int = 2048, **options) -> dict:
    """fp64 materialising oracle over blocks of tokens (the loss is a sum over tokens, so grad_W adds up).

    ``rows``: only these flattened tokens (their upstream gradient must hold all of it). Returns
    ``{"stats", "grads", "zmax"}``: zmax = max|z| over the valid tokens, z the logits the softmax sees
    before any soft-cap (the scale of a low-precision rounding error).
    """
    options = _stat_options(options)
    d = head["hidden"].shape[-1]
    flat = {k: v.reshape(-1, d) if k in ("hidden", "ref_hidden") else v for k, v in head.items()}
    y = labels.reshape(-1)
    g = {k: v.reshape(-1) for k, v in up.items()}
    index = torch.arange(y.numel(), device=y.device) if rows is None else rows
    shared = {k: flat[k].detach().double().requires_grad_(not frozen and k in ("weight", "bias"))
              for k in ("weight", "bias", "ref_weight") if k in flat}
    stats: dict[str, list] = {k: [] for k in STAT_NAMES}
    grad_h, grads, zmax = [], {k: None for k, v in shared.items() if v.requires_grad}, 0.0
    scale = options.get("logit_scale", 1.0) / options.get("temperature", 1.0)
    for s in range(0, index.numel(), block):
        idx = index[s:s + block]
        h = flat["hidden"].index_select(0, idx).detach().double().requires_grad_(True)
        extra = {"ref_hidden": flat["ref_hidden"].index_select(0, idx).double()} if "ref_hidden" in flat else {}
        out = reference_token_stats(h, shared["weight"], y[idx], bias=shared.get("bias"),
                                    ref_weight=shared.get("ref_weight"),
                                    compute_dtype=torch.float64, **extra, **options)
        loss = sum((getattr(out, k) * g[k][idx]).sum() for k in g if getattr(out, k) is not None)
        targets = [h] + [shared[k] for k in grads]
        if isinstance(loss, torch.Tensor):
            got = torch.autograd.grad(loss, targets)
        else:  # no upstream gradient: statistics only
            got = [torch.zeros_like(t) for t in targets]
        grad_h.append(got[0])
        for k, v in zip(grads, got[1:]):
            grads[k] = v if grads[k] is None else grads[k] + v
        for k in STAT_NAMES:
            x = getattr(out, k)
            stats[k].append(None if x is None else x.detach())
        with torch.no_grad():
            z = h @ shared["weight"].T + (shared["bias"] if "bias" in shared else 0)
            live = (y[idx] != -100)[:, None]
            zmax = max(zmax, (z.abs() * live).max().item() * scale)
            del z
    stats_cat = {k: None if v[0] is None else torch.cat(v) for k, v in stats.items()}
    return {"stats": stats_cat, "grads": {"hidden": torch.cat(grad_h), **grads}, "zmax": zmax + 1.0}


def compare(got_stats: dict, got_grads: dict, want: dict, labels: torch.Tensor, dtype: torch.dtype, *,
            rows: torch.Tensor | None = None, prefix: str = "") -> list[dict]:
    """Checks of fused stats / gradients against the oracle (``rows``: the oracle's subset of tokens)."""
    y = labels.reshape(-1)
    index = torch.arange(y.numel(), device=y.device) if rows is None else rows
    valid = y[index] != -100
    half = dtype != torch.float32
    stat_bound = HALF_STAT_BOUND * want["zmax"]
    out = [check(prefix + "statistics returned == asked",
                 sum((got_stats[k] is None) != (want["stats"][k] is None) for k in STAT_NAMES), 0)]
    for name in STAT_NAMES:
        got, ref = got_stats[name], want["stats"][name]
        if got is None or ref is None:
            continue
        out.append(check(prefix + f"{name} zero where ignored", got[y == -100].double().abs().sum().item(), 0))
        got = got[index]
        if name == "is_top1":
            out.append(check(prefix + "is_top1 mismatches", (got != ref).sum().item(),
                             max(1, int(0.02 * valid.sum().item())) if half else 1))
        elif half:
            out.append(check(prefix + f"{name} max abs err", (got.double() - ref).abs().max().item(), stat_bound))
        else:
            out.append(check(prefix + f"{name} rel err", rel_err(got, ref), FP32_TOL))
    for name, ref in want["grads"].items():
        got = got_grads[name]
        out.append(check(prefix + f"grad_{name} dtype is {dtype}".replace("torch.", ""), int(got.dtype != dtype), 0))
        sub = got[index] if name == "hidden" else got
        out.append(check(prefix + f"grad_{name} rel err", rel_err(sub, ref), HALF_GRAD_TOL if half else FP32_TOL))
    if rows is not None:  # every other token had a zero upstream gradient: its grad_hidden row must be exactly 0
        others = torch.ones(y.numel(), dtype=torch.bool, device=y.device)
        others[index] = False
        out.append(check(prefix + "grad_hidden zero outside the checked tokens",
                         got_grads["hidden"][others].double().abs().max().item() if others.any() else 0.0, 0))
    return out


HEAD_MODES = ("recompute", "keep", "partly kept", "frozen")


def _budget(mode: str, chunk_rows: int, vocab: int, dtype: torch.dtype, kl: bool) -> int:
    """The logits budget of a head mode (``partly kept``: exactly the first chunk's logits)."""
    per_row = vocab * torch.tensor([], dtype=dtype).element_size() * (2 if kl else 1)
    return {"recompute": 0, "frozen": 0, "keep": KEEP_ALL, "partly kept": chunk_rows * per_row}[mode]


def sweep_case(dtype_name: str, mode: str, stats_on: str, transform: str) -> Callable[[Config], dict]:
    def run(cfg: Config) -> dict:
        dtype = getattr(torch, dtype_name)
        n, seq, d, vocab = cfg.sweep
        full = stats_on == "all"
        head = random_head(n, seq, d, vocab, dtype=dtype, device=cfg.device, bias=full, ref=full, seed=11)
        labels = random_labels(n, seq, vocab, device=cfg.device, prompt=2, pad=(1, 0, 2)[:n])
        stats = ALL_STATS if full else {}
        options = dict(stats, **(SOFTCAP if transform == "softcap" else {}))
        up = upstream(labels, DIFFERENTIABLE if full else ("logp",))
        budget = _budget(mode, cfg.chunk, vocab, dtype, full)
        got, grads = fused(head, labels, up, frozen=mode == "frozen", logits_budget=budget, chunk_size=cfg.chunk,
                           **options)
        want = oracle(head, labels, up, frozen=mode == "frozen", **options)
        return checks_result(compare(got, grads, want, labels, dtype), vocab=vocab,
                             valid_tokens=int((labels != -100).sum()))

    return run


def sequence_case(dtype_name: str) -> Callable[[Config], dict]:
    """sequence_logps: per-row sums, means and counts of the fused log-probs vs the oracle's."""

    def run(cfg: Config) -> dict:
        dtype = getattr(torch, dtype_name)
        _, seq, d, vocab = cfg.sweep
        head = random_head(4, seq, d, vocab, dtype=dtype, device=cfg.device, seed=21)
        labels = random_labels(4, seq, vocab, device=cfg.device, prompt=2, pad=(0, 1, 2, 0))
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in head.items()}
        out = fastpref.sequence_logps(leaves["hidden"], leaves["weight"], labels, backend="triton",
                                      chunk_size=cfg.chunk)
        g = torch.Generator(cfg.device).manual_seed(5)
        coef = torch.randn(2, 4, device=cfg.device, dtype=torch.float64, generator=g)
        loss = (coef[0] * out.sum_logp.double()).sum() + (coef[1] * out.mean_logp.double()).sum()
        grads = torch.autograd.grad(loss, [leaves["hidden"], leaves["weight"]])
        # The oracle: sum(a_i sum_t logp + b_i mean_t logp) = sum_t (a_i + b_i / n_i) logp_t per row i.
        valid = labels != -100
        count = valid.sum(-1)
        up = {"logp": ((coef[0] + coef[1] / count)[:, None] * valid).double()}
        want = oracle(head, labels, up)
        logp = want["stats"]["logp"].view(labels.shape)
        sums, half = logp.sum(-1), dtype != torch.float32
        bound = HALF_STAT_BOUND * want["zmax"] * count.max().item()
        checks = [check("num_tokens exact", (out.num_tokens.cpu() != count.cpu()).sum().item(), 0)]
        if half:
            checks += [check("sum_logp max abs err", (out.sum_logp.double() - sums).abs().max().item(), bound),
                       check("mean_logp max abs err", (out.mean_logp.double() - sums / count).abs().max().item(),
                             HALF_STAT_BOUND * want["zmax"])]
        else:
            checks += [check("sum_logp rel err", rel_err(out.sum_logp, sums), FP32_TOL),
                       check("mean_logp rel err", rel_err(out.mean_logp, sums / count), FP32_TOL)]
        tol = HALF_GRAD_TOL if half else FP32_TOL
        checks += [check("grad_hidden rel err", rel_err(grads[0].reshape(-1, d), want["grads"]["hidden"]), tol),
                   check("grad_weight rel err", rel_err(grads[1], want["grads"]["weight"]), tol)]
        return checks_result(checks)

    return run


def dpo_formula(chosen, rejected, ref_chosen, ref_rejected, beta):
    """Sigmoid DPO written out: mean_i -log sigmoid(beta ((c_i - rc_i) - (r_i - rr_i)))."""
    return -torch.nn.functional.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def preference_case(dtype_name: str, reference: str) -> Callable[[Config], dict]:
    """preference_loss("dpo") with precomputed reference log-probs or a reference head in the same pass."""

    def run(cfg: Config) -> dict:
        dtype = getattr(torch, dtype_name)
        _, seq, d, vocab = cfg.sweep
        pairs, beta = 2, 0.1
        head = random_head(2 * pairs, seq, d, vocab, dtype=dtype, device=cfg.device, ref=reference == "head", seed=31)
        labels = random_labels(2 * pairs, seq, vocab, device=cfg.device, prompt=2, pad=(1, 0, 2, 0))
        valid = labels != -100
        policy = {k: head[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight")}
        kwargs = {}
        g = torch.Generator(cfg.device).manual_seed(9)
        if reference == "head":
            kwargs = {"ref_hidden": head["ref_hidden"], "ref_weight": head["ref_weight"]}
            ref_head = {"hidden": head["ref_hidden"], "weight": head["ref_weight"]}
            ref_oracle = oracle(ref_head, labels, {})
            ref_sums = ref_oracle["stats"]["logp"].view(labels.shape).sum(-1)
        else:
            ref_sums = -torch.rand(2 * pairs, device=cfg.device, generator=g, dtype=torch.float64) * seq * 3
            kwargs = {"ref_chosen_logps": ref_sums[:pairs].float(), "ref_rejected_logps": ref_sums[pairs:].float()}
        out = fastpref.preference_loss(policy["hidden"], policy["weight"], labels, loss="dpo", beta=beta,
                                       backend="triton", chunk_size=cfg.chunk, **kwargs)
        grads = torch.autograd.grad(out.loss, [policy["hidden"], policy["weight"]])
        # fp64 oracle: the formula on oracle sums, its gradient through the oracle's token log-probs.
        h64 = policy["hidden"].detach().double().requires_grad_(True)
        w64 = policy["weight"].detach().double().requires_grad_(True)
        logp = reference_token_stats(h64, w64, labels, compute_dtype=torch.float64).logp
        sums = logp.sum(-1)
        want = dpo_formula(sums[:pairs], sums[pairs:], ref_sums[:pairs], ref_sums[pairs:], beta)
        want_grads = torch.autograd.grad(want, [h64, w64])
        zmax = (h64.detach() @ w64.detach().T).abs().max().item() + 1
        if reference == "head":
            zmax = max(zmax, ref_oracle["zmax"])
        half = dtype != torch.float32
        # |d loss / d margin| <= 1: the margin's error is beta times four sums' errors at most.
        loss_bound = beta * 4 * HALF_STAT_BOUND * zmax * valid.sum(-1).max().item() if half else FP32_TOL
        loss_err = abs(out.loss.item() - want.item()) / (1 if half else abs(want.item()))
        tol = HALF_GRAD_TOL if half else FP32_TOL
        margins = beta * ((sums[:pairs] - ref_sums[:pairs]) - (sums[pairs:] - ref_sums[pairs:]))
        margin_err = (out.metrics["rewards/margins"].double() - margins.mean()).abs().item()
        checks = [check("loss " + ("abs" if half else "rel") + " err", loss_err, loss_bound),
                  check("rewards/margins abs err", margin_err,
                        loss_bound if half else FP32_TOL * max(1, margins.abs().max().item())),
                  check("grad_hidden rel err", rel_err(grads[0], want_grads[0]), tol),
                  check("grad_weight rel err", rel_err(grads[1], want_grads[1]), tol)]
        return checks_result(checks, loss=out.loss.item())

    return run


def one_row_chunks_case(dtype_name: str, mode: str) -> Callable[[Config], dict]:
    """chunk_size=1 at a Llama-3 vocabulary: one-row GEMMs and launches, every statistic, reference head."""

    def run(cfg: Config) -> dict:
        dtype = getattr(torch, dtype_name)
        vocab = cfg.one_row_vocab
        n, seq, d, _ = cfg.sweep
        head = random_head(n, seq, d, vocab, dtype=dtype, device=cfg.device, bias=True, ref=True, seed=41)
        labels = random_labels(n, seq, vocab, device=cfg.device, prompt=2, pad=(2, 0, 1)[:n])
        up = upstream(labels, DIFFERENTIABLE)
        budget = _budget(mode, 1, vocab, dtype, True)
        got, grads = fused(head, labels, up, logits_budget=budget, chunk_size=1, **ALL_STATS)
        want = oracle(head, labels, up, **ALL_STATS)
        return checks_result(compare(got, grads, want, labels, dtype), vocab=vocab)

    return run


def int64_case(mode: str) -> Callable[[Config], dict]:
    """One chunk of N·V > 2**31 bf16 logits (policy and reference): the kernels' row offsets need int64.

    The oracle runs on tokens at the start, on both sides of the 2**31-element boundary and at the end;
    every other token gets a zero upstream gradient, so grad_W is the oracle's and their grad_hidden is 0.
    """

    def run(cfg: Config) -> dict:
        rows, d, vocab = cfg.int64
        dtype = torch.bfloat16
        head = random_head(1, rows, d, vocab, dtype=dtype, device=cfg.device, ref=True, seed=51)
        labels = random_labels(1, rows, vocab, device=cfg.device)
        boundary = 2**31 // vocab
        picks = {*range(0, 16), *range(boundary - 16, boundary + 16), *range(rows - 16, rows)}
        index = torch.tensor(sorted(i for i in picks if 0 <= i < rows), device=cfg.device)
        mask = torch.zeros(labels.numel(), dtype=torch.bool, device=cfg.device)
        mask[index] = True
        up = {k: v * mask.view(labels.shape) for k, v in upstream(labels, DIFFERENTIABLE).items()}
        options = dict(entropy=True, kl=True, ref_entropy=True)
        budget = 0 if mode == "recompute" else KEEP_ALL
        got, grads = fused(head, labels, up, logits_budget=budget, chunk_size=rows, **options)
        finite = sum(int(not torch.isfinite(v).all()) for k, v in got.items() if v is not None and k != "is_top1")
        want = oracle(head, labels, up, rows=index, **options)
        checks = [check("non-finite statistics", finite, 0)] + compare(got, grads, want, labels, dtype, rows=index)
        return checks_result(checks, elements=rows * vocab, int64_exercised=rows * vocab > 2**31)

    return run


def large_case(cfg: Config) -> dict:
    """The target shape in bf16: logp + entropy, recompute and keep, against one blocked fp64 oracle."""
    tokens, d, vocab = cfg.large
    dtype = torch.bfloat16
    head = random_head(1, tokens, d, vocab, dtype=dtype, device=cfg.device, seed=61)
    labels = random_labels(1, tokens, vocab, device=cfg.device)
    up = upstream(labels, ("logp", "entropy"))
    want = oracle(head, labels, up, entropy=True)
    checks = []
    for mode, budget in (("recompute", 0), ("keep", KEEP_ALL)):
        got, grads = fused(head, labels, up, logits_budget=budget, entropy=True)
        checks += compare(got, grads, want, labels, dtype, prefix=f"{mode}: ")
        del got, grads
        free_device_memory()
    return checks_result(checks, shape=f"M={tokens}, d={d}, V={vocab}", zmax=want["zmax"])


# --dry runs one case of each kind (the interpreter is slow); the GPU runs them all.
DRY_CORRECTNESS = ("oracle float32 recompute all softcap", "oracle float32 partly kept all plain",
                   "oracle bfloat16 frozen all softcap", "oracle bfloat16 keep logp plain", "sequence_logps float32",
                   "preference_loss dpo bfloat16 ref head", "chunk of one row", "N*V > 2^31 bf16 keep",
                   "target shape bf16 bounds")


def correctness_cases(cfg: Config) -> list[Case]:
    # The full-size cases first: they need a GPU most, and the sweep's many small compiles come after.
    cases = [Case("target shape bf16 bounds", large_case, 120)]
    cases += [Case(f"N*V > 2^31 bf16 {mode}", int64_case(mode), 120) for mode in ("keep", "recompute")]
    cases += [Case(f"chunk of one row V={cfg.one_row_vocab} {dt} {mode}", one_row_chunks_case(dt, mode))
              for dt in ("float32", "bfloat16") for mode in ("recompute", "keep")]
    cases += [Case(f"preference_loss dpo {dt} ref {ref}", preference_case(dt, ref))
              for dt in ("float32", "bfloat16") for ref in ("precomputed", "head")]
    cases += [Case(f"sequence_logps {dt}", sequence_case(dt)) for dt in ("float32", "bfloat16")]
    cases += [Case(f"oracle {dt} {mode} {stats} {tf}", sweep_case(dt, mode, stats, tf))
              for dt in ("float32", "bfloat16", "float16") for mode in HEAD_MODES for stats in ("logp", "all")
              for tf in ("plain", "softcap")]
    if cfg.dry:  # the first case of each prefix
        cases = [next(c for c in cases if c.name.startswith(prefix)) for prefix in DRY_CORRECTNESS]
    return cases

"""Group 2 of the framework (k > 1 outputs, iterative or transport-based): OTK, k-means, Slot attention.

Each module has ``pool_all(x, return_attention=False) -> (B, k, d)`` (tokens or maps; with attention also
(B, k, N) or (B, k, H, W), each output's weights over locations summing to 1). ``forward`` reduces the k outputs
to one vector per sample according to ``reduce``:

- ``"mean"``: the mean of the k outputs, (B, d);
- ``"flatten"``: the k outputs concatenated, (B, k·d) — the output width changes (``module.out_dim``);
- ``"project"``: the concatenation mapped back to d by a learned linear layer, (B, d).

The attention that ``forward(..., return_attention=True)`` returns is the mean over the k outputs of their
weights over locations, (B, N), summing to 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Pooling, check_choice, check_int, check_positive, register_pooling, to_tokens

REDUCE = ("mean", "flatten", "project")


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


class MultiOutputPooling(Pooling):
    """Shared plumbing of the k > 1 poolings: ``pool_all`` and the reduction of the k outputs."""

    def _setup_outputs(self, dim: int, k: int, reduce: str) -> None:
        check_int("k", k)
        check_choice("reduce", reduce, REDUCE)
        self.dim, self.k, self.reduce = dim, k, reduce
        self.out_dim = k * dim if reduce == "flatten" else dim
        self.out_proj = nn.Linear(k * dim, dim) if reduce == "project" else None

    def _pool_all(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d) -> (outputs (B, k, d), weights over locations (B, k, N), rows summing to 1)."""
        raise NotImplementedError

    def pool_all(self, x: torch.Tensor, return_attention: bool = False):
        """All k outputs, (B, k, d), for tokens (B, N, d) or maps (B, d, H, W)."""
        tokens, grid = to_tokens(x)
        self._check_tokens(tokens, grid is not None)
        z, a = self._pool_all(tokens)
        if not return_attention:
            return z
        return z, (a if grid is None else a.reshape(a.shape[0], a.shape[1], *grid))

    def pool(self, tokens):
        z, a = self._pool_all(tokens)
        if self.reduce == "mean":
            out = z.mean(dim=1)
        elif self.reduce == "flatten":
            out = z.flatten(1)
        else:
            out = self.out_proj(z.flatten(1))
        w = a.sum(dim=1)  # mean over the k outputs, renormalised (k-means: over its non-empty clusters)
        return out, w / w.sum(dim=-1, keepdim=True)


@register_pooling("otk")
class OTK(MultiOutputPooling):
    """Optimal Transport Kernel embedding (Mialon et al., ICLR 2021). Framework row: U^0 = U (k learned
    references); φ_Q = U; φ_K = X; s = −‖x − y‖² (on L2-normalised features and references, i.e. 2xᵀy − 2);
    A = SINKHORN(e^{S/ε}), the entropic transport plan between the k references (mass 1/k each) and the p locations
    (mass 1/p each), ``iters`` log-domain Sinkhorn steps; φ_V = ψ(X), a learned d→d linear feature embedding
    (stands in for OTK's Nyström kernel embedding); f = f_{−1}; φ_X = –; φ_U = Z; k outputs.

    Output j is the plan-weighted mean of ψ(X) (plan row j normalised over locations). **Default
    ``reduce="project"``**: (B, d) = a learned linear map of the flattened (B, k·d) outputs. The plain mean is not
    the default because the plan's location marginals are uniform, so the mean over the k outputs is, up to Sinkhorn
    convergence, just GAP(ψ(X)) — and, for the same reason, the returned attention (mean over the k rows) is close
    to uniform; per-reference plans come from ``pool_all(x, return_attention=True)``.
    """

    def __init__(self, dim: int, k: int = 4, eps: float = 0.1, iters: int = 10, reduce: str = "project"):
        super().__init__()
        self._setup_outputs(dim, k, reduce)
        check_positive("eps", eps)
        check_int("iters", iters)
        self.eps, self.iters = float(eps), iters
        self.references = nn.Parameter(torch.randn(k, dim))
        self.psi = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, k={self.k}, eps={self.eps}, iters={self.iters}, reduce={self.reduce!r}"

    def transport_plan(self, tokens: torch.Tensor) -> torch.Tensor:
        """The (B, k, N) entropic OT plan, in fp32: columns sum to 1/N, rows to ≈ 1/k."""
        b, n, _ = tokens.shape
        with _no_autocast(tokens):
            x = F.normalize(tokens.float(), dim=-1)
            u = F.normalize(self.references.float(), dim=-1)
            log_k = (2.0 * torch.einsum("kd,bnd->bkn", u, x) - 2.0) / self.eps  # S/ε with S = −‖x − u‖²
            f = log_k.new_zeros(b, self.k, 1)
            g = log_k.new_zeros(b, 1, n)
            for _ in range(self.iters):
                f = -math.log(self.k) - torch.logsumexp(log_k + g, dim=2, keepdim=True)
                g = -math.log(n) - torch.logsumexp(log_k + f, dim=1, keepdim=True)
            return (log_k + f + g).exp()

    def _pool_all(self, tokens):
        plan = self.transport_plan(tokens)
        a = plan / plan.sum(dim=-1, keepdim=True).clamp(min=1e-30)  # each reference's weights over locations
        # ψ is affine and each row of `a` sums to 1, so Σ_i a_ji ψ(x_i) = ψ(Σ_i a_ji x_i): embed k vectors, not N.
        z = self.psi(torch.einsum("bkn,bnd->bkd", a.to(tokens.dtype), tokens))
        return z, a.to(tokens.dtype)


@register_pooling("kmeans")
class KMeans(MultiOutputPooling):
    """k-means pooling. Framework row: U^0 = k initial centroids; φ_Q = U; φ_K = X; s = −‖x − y‖²;
    A = η_2(argmax_1(S)), the hard assignment of each location to its nearest centroid, normalised per cluster;
    φ_V = X; f = f_{−1}; φ_X = X; φ_U = Z, iterated ``iters`` times (Lloyd steps); k outputs.

    The paper's random U^0 is replaced by a deterministic, per-sample initialisation so that the output is
    deterministic and independent of the rest of the batch: farthest-point (maximin) seeding, starting from the
    location nearest to the sample's mean. An emptied cluster keeps its previous centroid. Assignments carry no
    gradient (argmax); gradients reach X through the cluster means. No parameters (unless ``reduce="project"``).
    **Default ``reduce="mean"``**: the (B, d) mean of the k cluster centroids (clusters weighted equally, unlike
    GAP). The attention is the mean over clusters of their (uniform-within-cluster) weights; with an empty
    cluster it is renormalised over the non-empty ones.
    """

    def __init__(self, dim: int, k: int = 4, iters: int = 3, reduce: str = "mean"):
        super().__init__()
        self._setup_outputs(dim, k, reduce)
        check_int("iters", iters)
        self.iters = iters

    def extra_repr(self) -> str:
        return f"dim={self.dim}, k={self.k}, iters={self.iters}, reduce={self.reduce!r}"

    @torch.no_grad()
    def _seed(self, x: torch.Tensor) -> torch.Tensor:
        """Indices (B, k) of the farthest-point seeds."""
        center = x.mean(dim=1, keepdim=True)
        first = ((x - center) ** 2).sum(-1).argmin(dim=1)  # (B,)
        idx = [first]
        gather = lambda i: x[torch.arange(x.shape[0], device=x.device), i].unsqueeze(1)  # noqa: E731
        mind = ((x - gather(first)) ** 2).sum(-1)  # (B, N)
        for _ in range(1, self.k):
            nxt = mind.argmax(dim=1)
            idx.append(nxt)
            mind = torch.minimum(mind, ((x - gather(nxt)) ** 2).sum(-1))
        return torch.stack(idx, dim=1)

    def _pool_all(self, tokens):
        b, n, d = tokens.shape
        with _no_autocast(tokens):
            x = tokens.float()
            idx = self._seed(x.detach())
            centroids = torch.gather(x, 1, idx.unsqueeze(-1).expand(b, self.k, d))  # (B, k, d)
            for _ in range(self.iters):
                with torch.no_grad():
                    c = centroids.detach()
                    # argmin_j ‖x − c_j‖² = argmin_j (‖c_j‖² − 2 xᵀc_j)
                    dist = (c * c).sum(-1).unsqueeze(1) - 2.0 * (x.detach() @ c.transpose(1, 2))  # (B, N, k)
                    onehot = F.one_hot(dist.argmin(dim=-1), self.k).transpose(1, 2).float()  # (B, k, N)
                    counts = onehot.sum(dim=-1, keepdim=True)
                    a = onehot / counts.clamp(min=1.0)
                new = a @ x
                centroids = torch.where(counts > 0, new, centroids)
            return centroids.to(tokens.dtype), a.to(tokens.dtype)  # rows of emptied clusters are zero


class _GRUCell(nn.Module):
    """A GRU cell from two linear layers (autocast-friendly, unlike nn.GRUCell on CPU)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ih = nn.Linear(dim, 3 * dim)
        self.hh = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        ir, iz, in_ = self.ih(x).chunk(3, dim=-1)
        hr, hz, hn = self.hh(h).chunk(3, dim=-1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h


@register_pooling("slot")
class SlotAttention(MultiOutputPooling):
    """Slot attention (Locatello et al., NeurIPS 2020). Framework row: U^0 = U (k slots, learned);
    φ_Q = W_Q LN(U); φ_K = W_K LN(X); s = xᵀy; A = σ_2(S/√d): softmax over the k slots (+ eps), then each slot's
    weights normalised over locations; φ_V = W_V LN(X); f = f_{−1}; φ_X = –; φ_U = U + MLP(LN(GRU(Z, U))),
    iterated ``iters`` times; k outputs.

    Deterministic and batch-independent: the initial slots are k learned vectors (``slots_mu``), not samples.
    ``train_noise=True`` adds the paper's learned-σ Gaussian noise to them in training mode only (eval stays
    deterministic). **Default ``reduce="mean"``**: the (B, d) mean of the k slots. The attention is the mean over
    slots of the last iteration's location-normalised weights.
    """

    def __init__(self, dim: int, k: int = 4, iters: int = 3, hidden_dim: int | None = None, eps: float = 1e-8,
                 train_noise: bool = False, reduce: str = "mean"):
        super().__init__()
        self._setup_outputs(dim, k, reduce)
        check_int("iters", iters)
        check_positive("eps", eps)
        hidden = dim if hidden_dim is None else hidden_dim
        check_int("hidden_dim", hidden)
        self.iters, self.eps, self.scale = iters, float(eps), dim ** -0.5
        self.slots_mu = nn.Parameter(torch.randn(k, dim) * dim ** -0.5)
        self.slots_log_sigma = nn.Parameter(torch.full((k, dim), -2.0)) if train_noise else None
        self.norm_inputs = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.gru = _GRUCell(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, k={self.k}, iters={self.iters}, reduce={self.reduce!r}"

    def _pool_all(self, tokens):
        b = tokens.shape[0]
        x = self.norm_inputs(tokens)  # keys W_K x and values W_V x are never materialised (both maps are linear):
        # q·(W_K x) = (W_Kᵀ q)·x and Σ_i a_i W_V x_i = W_V (Σ_i a_i x_i).
        slots = self.slots_mu.unsqueeze(0).expand(b, -1, -1)
        if self.slots_log_sigma is not None and self.training:
            slots = slots + self.slots_log_sigma.exp() * torch.randn_like(slots)
        attn = None
        for _ in range(self.iters):
            prev = slots
            q = self.to_q(self.norm_slots(slots))  # (B, k, d)
            qk = q @ self.to_k.weight.to(q.dtype)  # (B, k, d) = W_Kᵀ q
            logits = (qk @ x.transpose(1, 2).to(qk.dtype)).float() * self.scale  # (B, k, N)
            attn = logits.softmax(dim=1) + self.eps  # competition between slots
            attn = attn / attn.sum(dim=-1, keepdim=True)  # weighted mean over locations
            updates = self.to_v(attn.to(x.dtype) @ x)
            slots = self.gru(updates, prev)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn.to(tokens.dtype)


__all__ = ["OTK", "KMeans", "SlotAttention", "MultiOutputPooling", "REDUCE"]

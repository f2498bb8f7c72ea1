"""Losses that couple samples, computed over the global batch (every rank's rows) with gradients.

Two patterns. A loss that is a mean of per-anchor terms against the whole pool (InfoNCE, the neighbourhood form
of the global term) gathers the other ranks' rows with `gather_with_grad` and returns the mean over this rank's
anchors; with equal row counts per rank the trainer's convention (objective = mean over ranks of each rank's
loss, see darec_dist/distributed/collectives.py) then equals the one-process loss over the whole batch. A loss
that is not (the uniformity's log of a mean, the global similarity in Gram form, the centres' statistics) is
split into this rank's partial sums (`*_sums`, `similarity_gram`, `centre_statistics`), which the caller sums
over ranks with one differentiable all-reduce, and a function of the global sums (`*_from_*`) that gives the
same value on every rank. Per-row terms (orthogonality, the soft assignments' KL) need no collective. Where the
ranks hold different numbers of anchors (RLMRec-Gen's masked nodes), `info_nce_to_frozen` weights each rank's sum so
that the mean over ranks is still the mean over all masked nodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from darec_dist.distributed.collectives import gather, gather_with_grad, rank, world_size
from darec_dist.models.aligners.base import distinct_rows


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over local anchors of -log softmax of cos(anchor, its positive) among cos(anchor, p) / tau for every
    rank's positives p (in-batch negatives, gathered). With `ids` (a node key per row) each node is one column, its
    first row's positive (rows of one node have one positive: a projected profile, an LLM row): otherwise a node on
    k rows (an active user, a node masked on two rows) is k columns, k - 1 of them false negatives as close as the
    anchor's own positive."""
    # The n x N logits are the step's cost (RLMRec-Con on Amazon-book: 4,096 x 8,192 per group): 1/tau scales the
    # n x d anchors instead, and cross-entropy's fused log-softmax passes over the logits fewer times than logsumexp.
    a = F.normalize(anchors, dim=-1) / temperature
    everyone = gather_with_grad(F.normalize(positives, dim=-1))
    own = rank() * anchors.shape[0] + torch.arange(anchors.shape[0], device=anchors.device)
    if ids is None:
        return F.cross_entropy(a @ everyone.T, own)
    first, node = distinct_rows(gather(ids))  # the same columns, in the same order, for every world size
    return F.cross_entropy(a @ everyone[first].T, node[own])


def info_nce_to_frozen(anchors: torch.Tensor, targets: torch.Tensor, temperature: float, ids: torch.Tensor) -> torch.Tensor:
    """InfoNCE of each node against every rank's targets, like `info_nce` with ids, where ranks hold different
    numbers of anchors (RLMRec-Gen's masked nodes) and the targets are frozen (LLM rows). The rows of one node (on
    any rank) hold one anchor and count once, as RLMRec's masked seeds do: an active user on k rows would otherwise
    weigh k times. The targets need no gradient, so they are gathered plainly, padded to the largest rank's count.
    Returns this rank's share, each row's term / (its node's rows) summed x W / (all ranks' nodes): the mean over
    ranks is the mean over the nodes."""
    if targets.requires_grad:
        raise ValueError("info_nce_to_frozen gathers its targets without gradient: pass frozen rows")
    counts = gather(torch.tensor([anchors.shape[0]], device=anchors.device))
    most, total = int(counts.max()), int(counts.sum())
    if total == 0:
        return anchors.sum()  # zero, and a gradient (of zeros) for every parameter that made the anchors
    pad = most - anchors.shape[0]
    everyone = gather(F.pad(F.normalize(targets, dim=-1), (0, 0, 0, pad)))
    keys = gather(F.pad(ids, (0, pad), value=-1))  # node keys are >= 0: -1 marks padding
    real = keys >= 0
    first, node = distinct_rows(keys[real])  # the same columns, in the same order, for every world size
    position = torch.cumsum(real, 0) - 1  # a gathered row's index among the real ones
    own = position[rank() * most + torch.arange(anchors.shape[0], device=anchors.device)]
    logits = (F.normalize(anchors, dim=-1) / temperature) @ everyone[real][first].T
    terms = F.cross_entropy(logits, node[own], reduction="none")
    rows_of_node = torch.bincount(node, minlength=len(first))
    return (terms / rows_of_node[node[own]]).sum() * world_size() / len(first)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean of per-row values, where row i stands for weight[i] rows (a node repeated in the sample)."""
    return values.mean() if weight is None else (values * weight).sum() / weight.sum()


def similarity_gram(collab: torch.Tensor, llm: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of the global similarity loss: the Gram matrix of its rows [C | L] (2d x 2d), summed over
    ranks; row i counted weight[i] times when given. In float64: the loss is the small difference of the Gram's
    squared entries (near collapse, 1e-7 of them), which float32 entries have already lost."""
    both = torch.cat([F.normalize(collab.double(), dim=-1), F.normalize(llm.double(), dim=-1)], dim=1)
    return both.T @ (both if weight is None else both * weight[:, None])


def similarity_from_gram(gram: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mean((S_C - S_L)^2) over the n x n cosine-similarity matrices S = Z Z^T, from the global Gram of [C | L].

    ||C C^T - L L^T||_F^2 = ||C^T C||_F^2 - 2 ||C^T L||_F^2 + ||L^T L||_F^2, the blocks of the Gram:
    O(N d^2) instead of O(N^2 d), exact, and only a 2d x 2d matrix crosses the network, so N can span
    the whole global batch. The Gram is float64 (similarity_gram) because the three terms are of similar
    size and their difference is the loss; the loss returns in the model's dtype.
    """
    d = gram.shape[0] // 2
    squared = gram[:d, :d].square().sum() - 2 * gram[:d, d:].square().sum() + gram[d:, d:].square().sum()
    return (squared / (n * n)).to(dtype)


def cross_view_sums(collab: torch.Tensor, llm: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """This rank's share of the cross-view term's same-node sums (float64, summed over ranks): over the pairs (i, j)
    of global sample rows that hold the same node, [sum of (1 - S_ij)^2, sum of S_ij^2, count], S_ij = cos(c_i, l_j).
    Row i of this rank stands for weight[i] sample rows, each paired with the counts[i] rows of its node in the
    global sample."""
    cosine = (F.normalize(collab.double(), dim=-1) * F.normalize(llm.double(), dim=-1)).sum(-1)
    pairs = (weight * counts).double()
    return torch.stack([(pairs * (1 - cosine).square()).sum(), (pairs * cosine.square()).sum(), pairs.sum()])


def cross_view_from_sums(gram: torch.Tensor, same_node: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The cross-view similarity S_ij = cos(c_i, l_j) of the n global sample rows made to agree with the identity of
    nodes: the mean of (1 - S_ij)^2 over pairs of rows that hold the same node plus the mean of S_ij^2 over the other
    pairs, the two halves weighted alike (the pairs of one node are a few among n^2: in a plain mean((S - I)^2)
    their pull is lost). From the Gram of [C | L]: sum_ij S_ij^2 = <C^T C, L^T L>_F, so no n x n matrix either."""
    d = gram.shape[0] // 2
    pull, same_squared, same = same_node
    other = n * n - same
    spread = (gram[:d, :d] * gram[d:, d:]).sum() - same_squared
    return (pull / same + (spread / other if other > 0 else 0.0)).to(dtype)


def global_counts(keys: torch.Tensor) -> torch.Tensor:
    """For every row, how many rows of every rank (all gathered, equal counts per rank) hold its node key."""
    distinct, count = torch.unique(gather(keys), return_counts=True)
    return count[torch.searchsorted(distinct, keys)]


def neighbourhood_loss(collab: torch.Tensor, llm: torch.Tensor, anchors: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over this rank's anchor rows of the symmetric KL between the two sides' neighbourhoods: each side's
    softmax over cos(anchor, every other row of the global pool) / tau.

    `collab` and `llm` are this rank's share of the pool (equal row counts on every rank, gathered), `anchors`
    the positions of its anchor rows in that share. A structure term like the Gram-form similarity loss (a
    rotation of one side changes neither side's neighbourhoods), but it weighs each anchor's nearest rows
    where the MSE of two cosine matrices weighs every pair alike.
    """
    d = collab.shape[1]
    local = torch.cat([F.normalize(collab, dim=-1), F.normalize(llm, dim=-1)], dim=1)
    pool = gather_with_grad(local)
    own = torch.zeros(anchors.shape[0], pool.shape[0], dtype=torch.bool, device=pool.device)
    own[torch.arange(anchors.shape[0], device=pool.device), rank() * collab.shape[0] + anchors] = True

    def log_neighbourhood(side: slice) -> torch.Tensor:
        # A finite fill: exp underflows to exactly 0, so the anchor itself adds nothing and no 0 * inf appears.
        logits = (local[anchors, side] @ pool[:, side].T / temperature).masked_fill(own, -1e4)
        return torch.log_softmax(logits, dim=-1)

    log_c, log_l = log_neighbourhood(slice(0, d)), log_neighbourhood(slice(d, None))
    return ((log_c.exp() - log_l.exp()) * (log_c - log_l)).sum(-1).mean()


def uniformity_sums(*parts: torch.Tensor, t: float = 2.0) -> tuple[torch.Tensor, int]:
    """This rank's share of the uniformity of each part, sum_{local i, global j != i} exp(-t ||z_i - z_j||^2),
    and the global row count. Rows are l2-normalised; all parts (same row count) travel in one gather."""
    local = torch.stack([F.normalize(z, dim=-1) for z in parts])  # parts x rows x dim
    everyone = gather_with_grad(local.transpose(0, 1).contiguous()).transpose(0, 1)
    # ||a - b||^2 = 2 - 2 a.b on the unit sphere: exp(2t (a.b - 1)), the affine part fused into the product.
    kernel = torch.baddbmm(local.new_full((1, 1, 1), -2.0 * t), local, everyone.transpose(1, 2), alpha=2.0 * t).exp()
    # The pairs i == j (each local row with itself) leave the mean; subtracting them is cheaper than masking.
    own = torch.exp(2.0 * t * ((local * local).sum(-1) - 1.0))
    return kernel.sum((1, 2)) - own.sum(1), everyone.shape[1]


def uniformity_from_sums(sums: torch.Tensor, n: int) -> torch.Tensor:
    """Sum over parts of log mean_{i != j} exp(-t ||z_i - z_j||^2) (Wang and Isola), from the global sums."""
    return torch.log(sums / (n * (n - 1))).sum()


def orthogonality_loss(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean_v cos(a_v, b_v)^2 over local rows (weighted by weight when given)."""
    return weighted_mean(F.cosine_similarity(a, b, dim=-1).pow(2), weight)


def log_soft_assignments(x: torch.Tensor, centres: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(F.normalize(x, dim=-1) @ F.normalize(centres, dim=-1).T / temperature, dim=-1)


def soft_assignments(x: torch.Tensor, centres: torch.Tensor, temperature: float) -> torch.Tensor:
    return log_soft_assignments(x, centres, temperature).exp()


def cluster_alignment_loss(
    collab: torch.Tensor, llm: torch.Tensor, centres: torch.Tensor, temperature: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric KL between the two sides' soft assignments to the shared preference centres, mean over local rows
    (weighted by weight when given)."""
    # KL(q_c || q_l) + KL(q_l || q_c) = sum (q_c - q_l)(log q_c - log q_l), from log-probabilities: the log of a
    # softmax underflows at low temperatures (a clamp there capped the loss and cut its gradient).
    log_c = log_soft_assignments(collab, centres, temperature)
    log_l = log_soft_assignments(llm, centres, temperature)
    return weighted_mean(((log_c.exp() - log_l.exp()) * (log_c - log_l)).sum(-1), weight)


def centre_statistics(x: torch.Tensor, centres: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per centre, the (weighted) sum of the unit rows of x nearest to it by cosine, and their weight: K x (d + 1).

    Sums over ranks give the global statistics of one k-means step."""
    unit = F.normalize(x, dim=-1)
    nearest = (unit @ F.normalize(centres, dim=-1).T).argmax(-1)
    member = F.one_hot(nearest, centres.shape[0]).to(unit.dtype)
    if weight is not None:
        member = member * weight[:, None]
    return torch.cat([member.T @ unit, member.sum(0)[:, None]], dim=1)


def moving_centres(centres: torch.Tensor, statistics: torch.Tensor, momentum: float) -> torch.Tensor:
    """Unit centres moved toward the direction of their members' mean (spherical k-means with momentum);
    a centre without members stays."""
    sums, counts = statistics[:, :-1], statistics[:, -1:]
    moved = F.normalize(momentum * F.normalize(centres, dim=-1) + (1.0 - momentum) * F.normalize(sums, dim=-1), dim=-1)
    return torch.where(counts > 0, moved, centres)


def matched_centre_loss(collab_statistics: torch.Tensor, llm_statistics: torch.Tensor, collab_centres: torch.Tensor, llm_centres: torch.Tensor) -> torch.Tensor:
    """Mean over matched cluster pairs of 1 - cos(collab cluster mean, LLM cluster mean).

    Each side has its own K centres; they are paired one to one by the largest total cosine (Hungarian
    matching on the centres, the same on every rank), and each collaborative cluster's mean (from the
    global statistics, with gradient) is pulled toward its partner's. Pairs with an empty side are skipped.
    """
    similarity = F.normalize(collab_centres, dim=-1) @ F.normalize(llm_centres, dim=-1).T
    _, partner = linear_sum_assignment(similarity.detach().cpu().numpy(), maximize=True)
    partner = torch.as_tensor(partner, device=llm_statistics.device)
    collab_sums, collab_counts = collab_statistics[:, :-1], collab_statistics[:, -1]
    llm_sums, llm_counts = llm_statistics[partner, :-1], llm_statistics[partner, -1]
    present = ((collab_counts > 0) & (llm_counts > 0)).to(collab_sums.dtype)
    # The cosine of two sums is the cosine of the two means.
    gap = 1.0 - F.cosine_similarity(collab_sums, llm_sums, dim=-1)
    return (gap * present).sum() / present.sum().clamp_min(1.0)


def centre_separation_loss(centres: torch.Tensor) -> torch.Tensor:
    """mean over centre pairs of cos^2: keeps the K preference centres apart (parameters only, same on all ranks)."""
    k = centres.shape[0]
    if k < 2:
        return centres.sum() * 0.0
    unit = F.normalize(centres, dim=-1)
    cos = unit @ unit.T
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=centres.device)
    return cos[off_diagonal].pow(2).mean()


def kmeans(points: torch.Tensor, k: int, iterations: int, seed: int) -> torch.Tensor:
    """Spherical k-means (cosine) with a seeded start; used once to initialise the centres from gathered l_sh.

    Points are first put in a canonical order (by a fixed random projection), so the result does not
    depend on how ranks ordered the gathered rows.
    """
    unit = F.normalize(points, dim=-1)
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(unit.shape[1], generator=generator, dtype=unit.dtype)
    unit = unit[torch.argsort(unit.cpu() @ projection).to(unit.device)]
    # Start on k distinct points: an active user or a popular item fills several rows, and two centres started on
    # one node's rows stay equal (the separation term has no gradient at cos = 1), leaving K - 1 centres in use.
    order = torch.randperm(unit.shape[0], generator=generator).to(unit.device)
    _, inverse = torch.unique(unit[order], dim=0, return_inverse=True)
    first, _ = distinct_rows(inverse)
    is_first = torch.zeros(len(order), dtype=torch.bool, device=unit.device)
    is_first[first] = True
    centres = unit[torch.cat([order[is_first], order[~is_first]])[:k]].clone()  # repeats only when too few points are distinct
    for _ in range(iterations):
        assign = (unit @ centres.T).argmax(-1)
        for c in range(k):
            members = unit[assign == c]
            if len(members):
                centres[c] = F.normalize(members.mean(0), dim=-1)
    return centres


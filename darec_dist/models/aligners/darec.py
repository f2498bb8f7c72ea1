"""DaRec: disentangle c and l into shared and specific parts, align only the shared parts by structure.

Components (Yang et al., ICDE 2025, as far as public summaries state them; every open choice is a config key):
four projections f_C_sp, f_C_sh, f_L_sp, f_L_sh; orthogonality of specific and
shared parts on each side and uniformity of the specific parts (weight beta);
global structure alignment of the shared parts' cosine-similarity matrices (or of
each node's softmax neighbourhood in them, or of the cross-view matrix cos(c_sh, l_sh)
against the identity of nodes) over a sample of N nodes spanning all
ranks, and local structure alignment through K shared preference centres
initialised by k-means on l_sh, learned or following l_sh, or K centres per side
paired by matching (weight lambda).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from darec_dist.config import ConfigError
from darec_dist.distributed.collectives import gather_with_grad, rank, sum_many_with_grad, world_size
from darec_dist.models.aligners.base import Aligner, AlignInputs, distinct_rows, projector
from darec_dist.models.aligners.coupled_losses import (
    centre_separation_loss,
    centre_statistics,
    cluster_alignment_loss,
    cross_view_from_sums,
    cross_view_sums,
    global_counts,
    kmeans,
    matched_centre_loss,
    moving_centres,
    neighbourhood_loss,
    orthogonality_loss,
    similarity_from_gram,
    similarity_gram,
    uniformity_from_sums,
    uniformity_sums,
)


@dataclass
class DaRecConfig:
    # lambda: weight of the structure alignment (the paper's best lies in [0.1, 1.0]).
    structure_weight: float = 0.1
    # beta: weight of the orthogonality and uniformity regularisers.
    regulariser_weight: float = 0.01
    # N: nodes in the structure sample, the users and positive items of the first N/2 interactions of
    # the (shuffled) global batch; capped by the batch. Every DaRec term is computed on this sample.
    sample_size: int = 4096
    # K: preference centres (the paper's best lies in [4, 8]).
    clusters: int = 4
    # Softmax temperature of the soft assignments to the centres that the local term compares (learned and ema
    # centres; matched ones compare cluster means): lower is sharper.
    cluster_temperature: float = 0.2
    # How the centres follow the data. "learned": parameters trained by the local loss (the method note's
    # default) plus a separation term. "ema": not trained; each step moves every centre toward the mean of
    # the l_sh rows nearest to it (global statistics, momentum below). Learned centres can turn
    # orthogonal to both sides, which makes every assignment uniform and the local term vanish
    # without aligning anything (measured: docs/results.md). "matched": each side has its own K centres,
    # moved like "ema" by its own shared rows; the sides' centres are paired by Hungarian matching, and
    # each collaborative cluster's mean is pulled toward its partner's (the method note's "k-means
    # centres per side with matching"; unlike the other two, it aligns positions, not only structure).
    centres: Literal["learned", "ema", "matched"] = "learned"
    centre_momentum: float = 0.9
    # "learned" only: weight of the mean cos^2 between centre pairs added to the local term, which keeps them apart.
    separation_weight: float = 1.0
    # Spherical k-means iterations that start the centres from the first step's gathered shared rows (once).
    kmeans_iterations: int = 20
    # Uniformity on the specific parts (the method note's reading) or on shared and specific parts
    # (also keeps the shared projections from collapsing to a constant, which would align trivially).
    uniformity_on: Literal["specific", "all"] = "specific"
    # Nodes of the global sample whose pairs estimate the uniformity term (every stride-th row): its
    # cost is quadratic in this, unlike the other terms, which are linear in N (the whole sample read no better on
    # validation: docs/results.md, "The uniformity subsample").
    uniformity_sample: int = 512
    # Form of the global structure term. "similarity": mean((S_C - S_L)^2) of the N x N cosine matrices (the
    # method note's default). "neighbourhood": per anchor (the uniformity subsample's rows), the symmetric KL
    # between the two sides' softmax over cosines to the other N rows at this temperature: it weighs each
    # node's nearest neighbours, the part of the structure that ranking uses, where the MSE weighs all pairs alike.
    # "cross": the cross-view matrix S_ij = cos(c_sh_i, l_sh_j) made to agree with the identity of nodes (1 for two
    # rows of the same node, 0 otherwise; the two halves' means weighted alike), the form of the DaRec authors'
    # earlier cross-view correlation reduction (DCRN). Unlike the other two it is not invariant to a rotation of one
    # side: it aligns each node's shared parts as well as the structure.
    global_form: Literal["similarity", "neighbourhood", "cross"] = "similarity"
    neighbourhood_temperature: float = 0.2
    # Which pairs of the sample the global term ("similarity" and "cross" forms) compares. "all": every pair, user-item
    # pairs included (the method note's default). "same_kind": user-user and item-item pairs, each kind's
    # mean weighted alike. A text-side user-item cosine compares a user's profile with an item's
    # description, two kinds of text, while the collaborative user-item cosine is what BPR ranks by.
    global_pairs: Literal["all", "same_kind"] = "all"
    # Ablations.
    use_global: bool = True
    use_local: bool = True
    use_regularisers: bool = True
    # Shape of the two collaborative projections. "mlp": RLMRec's projector, like the LLM side. "linear":
    # c_sp and c_sh are bias-free linear maps of c, so the structure terms cannot be met inside a hidden
    # layer (or by a bias shared by every node) and must shape c itself.
    collab_projector: Literal["mlp", "linear"] = "mlp"
    # The same choice for the two LLM projections. A linear map of the frozen l can project the text's
    # structure but not bend it, so the structure terms cannot be met by reshaping the LLM side in a hidden
    # layer; about 4x fewer multiplications per LLM row than the MLP (no better on ML-100K: docs/results.md).
    llm_projector: Literal["mlp", "linear"] = "mlp"
    # Which vectors rank items: the backbone's c, or the concatenation [c_sp, c_sh].
    scoring: Literal["backbone", "concat"] = "backbone"

    def __post_init__(self) -> None:
        if self.sample_size < 2 or self.uniformity_sample < 2 or self.clusters < 1:
            raise ValueError("align.darec.sample_size and align.darec.uniformity_sample must be >= 2, align.darec.clusters >= 1")
        if self.clusters > self.sample_size:
            raise ValueError(f"align.darec.clusters ({self.clusters}) must be at most align.darec.sample_size ({self.sample_size})")
        if self.neighbourhood_temperature <= 0 or self.cluster_temperature <= 0:
            raise ValueError(f"align.darec.neighbourhood_temperature and cluster_temperature must be > 0, got "
                             f"{self.neighbourhood_temperature} and {self.cluster_temperature}")
        if min(self.structure_weight, self.regulariser_weight, self.separation_weight) < 0:  # a negative weight pushes apart
            raise ValueError("align.darec.structure_weight, regulariser_weight and separation_weight must be >= 0")
        if self.global_pairs == "same_kind" and self.global_form == "neighbourhood":
            raise ValueError("align.darec.global_pairs=same_kind needs align.darec.global_form=similarity or cross")
        if self.kmeans_iterations < 0:
            raise ValueError(f"align.darec.kmeans_iterations must be >= 0, got {self.kmeans_iterations}")
        if self.use_local and self.centres != "matched" and self.clusters < 2:
            # A softmax over one centre gives every node the assignment 1 on both sides: the local term is 0.
            raise ValueError(f"align.darec.clusters={self.clusters}: the local term compares soft assignments to the "
                             "centres, which need at least 2 (or align.darec.use_local=false)")
        if not 0.0 <= self.centre_momentum < 1.0:
            raise ValueError(f"align.darec.centre_momentum must lie in [0, 1), got {self.centre_momentum}")


def _projection(shape: str):
    """RLMRec's MLP projector, or a bias-free linear map (no bias that every node shares, so no constant
    output that meets the structure terms without aligning anything)."""
    if shape == "mlp":
        return projector
    return lambda d_in, d_out: nn.Linear(d_in, d_out, bias=False)


class DaRec(Aligner):
    llm_groups = ("user", "pos")

    def __init__(self, cfg: DaRecConfig, collab_dim: int, llm_dim: int, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        collab, llm = _projection(cfg.collab_projector), _projection(cfg.llm_projector)
        self.collab_specific = collab(collab_dim, collab_dim)
        self.collab_shared = collab(collab_dim, collab_dim)
        self.llm_specific = llm(llm_dim, collab_dim)
        self.llm_shared = llm(llm_dim, collab_dim)
        centres = torch.zeros(cfg.clusters, collab_dim)
        if cfg.centres == "learned":
            self.centres = nn.Parameter(centres)
        else:
            self.register_buffer("centres", centres)
        if cfg.centres == "matched":
            self.register_buffer("collab_centres", centres.clone())
        self.register_buffer("centres_ready", torch.zeros((), dtype=torch.bool))

    def llm_rows(self, local_batch: int, world: int) -> int:
        rows = min(local_batch, max(1, self.cfg.sample_size // (2 * world)))
        if self.cfg.use_local and 2 * rows * world < self.cfg.clusters:
            # k-means places the centres among the first step's sample rows (users and positives of all ranks).
            raise ConfigError(f"align.darec.clusters={self.cfg.clusters}: DaRec's sample holds {2 * rows * world} rows per step "
                              f"over {world} ranks, fewer than the centres; lower it, or raise loader.batch_size")
        return rows

    def forward(self, inputs: AlignInputs) -> dict[str, torch.Tensor]:
        rows = inputs.llm["user"].shape[0]
        c = torch.cat([inputs.collab["user"][:rows], inputs.collab["pos"][:rows]])
        l = torch.cat([inputs.llm["user"], inputs.llm["pos"]])
        # Only the same-kind global term asks which rows are items (the users' rows come first).
        is_item = torch.arange(2 * rows, device=c.device) >= rows if self.cfg.global_pairs == "same_kind" else None
        # An active user or a popular item fills several sample rows: project each distinct node once (without ids,
        # every row is its own node).
        if inputs.ids is None:
            keys = rank() * 2 * rows + torch.arange(2 * rows, device=c.device)
        else:
            keys = torch.cat([inputs.ids["user"][:rows], inputs.ids["pos"][:rows]])
        first, inverse = distinct_rows(keys)
        # Only the cross-view global term asks how many rows each node fills on every rank.
        counts = global_counts(keys)[first] if self.cfg.use_global and self.cfg.global_form == "cross" else None
        return self.losses(c[first], l[first], inverse, None if is_item is None else is_item[first], counts)

    def losses(
        self, c: torch.Tensor, l: torch.Tensor, rows: torch.Tensor, is_item: torch.Tensor | None = None, counts: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The DaRec losses of this rank's sample, whose rows are c[rows], l[rows] (c and l hold each distinct node
        once); coupled terms span every rank's sample. is_item marks c's item rows (needed by global_pairs=same_kind;
        the sample holds as many user rows as item rows). counts: each node's rows in every rank's sample (for
        global_form=cross; by default its rows here, as if no other rank's sample held it)."""
        cfg = self.cfg
        c_sp, c_sh = self.collab_specific(c), self.collab_shared(c)
        l_sp, l_sh = self.llm_specific(l), self.llm_shared(l)
        # A node that fills k sample rows counts k times in every mean and sum: the same losses as the
        # expanded sample, at the cost of the distinct nodes.
        sample_rows = rows.shape[0]
        weight = torch.bincount(rows, minlength=c.shape[0]).to(c.dtype)
        ema = cfg.use_local and cfg.centres == "ema"
        matched = cfg.use_local and cfg.centres == "matched"
        if cfg.use_local:
            self._init_centres(c_sh, l_sh, rows)
        # The rows whose pairs the pairwise terms estimate. A stride, not a prefix: each rank's sample is its users'
        # rows then its positives', so a stride that divides each rank's count of either takes the same set of rows
        # (all that these sums depend on) for every world size, where a prefix would take only users.
        stride = max(1, sample_rows // max(1, cfg.uniformity_sample // world_size()))
        anchors = torch.arange(0, sample_rows, stride, device=c.device)
        neighbourhood = cfg.use_global and cfg.global_form == "neighbourhood"
        # The global similarity's Gram, the uniformity's kernel sums and the centres' statistics are sums
        # over ranks: one all-reduce carries them all.
        shares = {}
        # The groups of rows whose pairs the global term compares (similarity and cross forms), each weighted alike;
        # all pairs are one group of every row (a slice: a view, no copy of the sample).
        pair_groups: dict[str, torch.Tensor | slice] = {}
        if cfg.use_global and cfg.global_pairs == "same_kind":
            if is_item is None:
                raise ValueError("DaRec.losses: global_pairs=same_kind needs is_item (which rows are items)")
            pair_groups = {"user": ~is_item, "item": is_item}
        elif cfg.use_global and not neighbourhood:
            pair_groups = {"all": slice(None)}
        if cfg.global_form == "cross" and counts is None:
            counts = weight
        for group, mask in pair_groups.items():
            shares[f"gram_{group}"] = similarity_gram(c_sh[mask], l_sh[mask], weight[mask])
            if cfg.global_form == "cross":
                shares[f"same_node_{group}"] = cross_view_sums(c_sh[mask], l_sh[mask], weight[mask], counts[mask])
        if cfg.use_regularisers:
            picked = rows[anchors]
            parts = [c_sp, l_sp] + ([c_sh, l_sh] if cfg.uniformity_on == "all" else [])
            shares["uniform"], uniform_rows = uniformity_sums(*(z[picked] for z in parts))
        if ema:
            shares["centres"] = centre_statistics(l_sh.detach(), self.centres, weight)
        if matched:  # with gradient: the loss compares the clusters' global means
            shares["centres"] = centre_statistics(l_sh, self.centres, weight)
            shares["collab_centres"] = centre_statistics(c_sh, self.collab_centres, weight)
        totals = sum_many_with_grad(shares)
        out = {}
        if neighbourhood:
            out["darec_global"] = cfg.structure_weight * neighbourhood_loss(c_sh[rows], l_sh[rows], anchors, cfg.neighbourhood_temperature)
        elif pair_groups:
            group_rows = sample_rows * world_size() // len(pair_groups)  # the sample holds as many user rows as item rows

            def global_term(group: str) -> torch.Tensor:
                if cfg.global_form == "cross":
                    return cross_view_from_sums(totals[f"gram_{group}"], totals[f"same_node_{group}"], group_rows, c.dtype)
                return similarity_from_gram(totals[f"gram_{group}"], group_rows, c.dtype)

            out["darec_global"] = cfg.structure_weight * sum(global_term(group) for group in pair_groups) / len(pair_groups)
        if matched:
            local = matched_centre_loss(totals["collab_centres"], totals["centres"], self.collab_centres, self.centres)
            out["darec_local"] = cfg.structure_weight * local
        elif cfg.use_local:
            local = cluster_alignment_loss(c_sh, l_sh, self.centres, cfg.cluster_temperature, weight)
            if not ema:
                local = local + cfg.separation_weight * centre_separation_loss(self.centres)
            out["darec_local"] = cfg.structure_weight * local
        if cfg.use_regularisers:
            orthogonality = orthogonality_loss(c_sp, c_sh, weight) + orthogonality_loss(l_sp, l_sh, weight)
            out["darec_orth"] = cfg.regulariser_weight * orthogonality
            out["darec_uniform"] = cfg.regulariser_weight * uniformity_from_sums(totals["uniform"], uniform_rows)
        if ema or matched:  # after the loss has used this step's centres
            with torch.no_grad():
                self.centres.copy_(moving_centres(self.centres, totals["centres"].detach(), cfg.centre_momentum))
                if matched:
                    self.collab_centres.copy_(moving_centres(self.collab_centres, totals["collab_centres"].detach(), cfg.centre_momentum))
        return out

    @torch.no_grad()
    def _init_centres(self, c_shared: torch.Tensor, l_shared: torch.Tensor, rows: torch.Tensor) -> None:
        """k-means on the first step's gathered l_sh rows (and c_sh rows for per-side centres): the same on
        every rank and for every world size."""
        if bool(self.centres_ready):
            return
        sides = [(self.centres, l_shared)] + ([(self.collab_centres, c_shared)] if self.cfg.centres == "matched" else [])
        for centres, shared in sides:
            everyone = gather_with_grad(shared[rows].detach())
            centres.copy_(kmeans(everyone, self.cfg.clusters, self.cfg.kmeans_iterations, self.seed))
        self.centres_ready.fill_(True)

    def scoring_vectors(self, collab: torch.Tensor, kind: str) -> torch.Tensor:
        if self.cfg.scoring == "concat":
            return torch.cat([self.collab_specific(collab), self.collab_shared(collab)], dim=-1)
        return collab
